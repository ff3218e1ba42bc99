"""The load generators of bench/serve_load.py, and the statistics they report.

Two generators, each run in a separate, spawned process. Closed loop (``load_worker``):
``concurrency`` clients, each sending its next request when the previous answer arrived, so a
slow server is offered less load. Open loop (``open_loop_worker``): requests are sent at the
times of a precomputed Poisson schedule whatever the server does, and each latency is counted
from the request's *scheduled* time, so time spent queued behind a slow answer counts
(no coordinated omission).

``load_worker`` runs in a separate, spawned process: everything here must be importable and
picklable under "spawn", and imports nothing from the service. Each worker runs ``concurrency``
asyncio clients, each on its own keep-alive raw HTTP/1.1 connection, sending requests back to
back until the deadline, the request budget, or the stop file (the driver creates it to end an
open-ended phase). It returns one record per request:

    (start, latency_s, status, kind)

start is CLOCK_MONOTONIC, which is system-wide on Linux, so the driver can place requests against
the rebuild and outage windows it timed in its own process; status is the HTTP code (int) or the
name of the exception that ended the exchange (str: a connection error, TimeoutError); kind is
"healthz", "items" (a request carrying its items) or "history" (a request with only a user_id).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

MIN_LEN, MAX_LEN = 5, 50  # items per recommend request
Record = tuple[float, float, int | str, str]


def now() -> float:
    """The clock of request start times and of the driver's windows (comparable across processes)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# ------------------------------------------------------------------------------------ statistics


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of an ascending list; NaN when empty."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(latencies_s: list[float], errors: int, elapsed_s: float) -> dict[str, Any]:
    xs = sorted(latencies_s)
    ms = [x * 1000 for x in xs]
    return {
        "ok": len(xs),
        "errors": errors,
        "elapsed_s": round(elapsed_s, 3),
        "rps": round(len(xs) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else float("nan"),
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else float("nan"),
    }


def status_counts(records: list[Record]) -> dict[str, int]:
    """{"200": n, "503": n, "ReadTimeout": n, ...} over ``records``."""
    counts: dict[str, int] = {}
    for _, _, status, _ in records:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items()))


def latency_summary(records: list[Record]) -> dict[str, Any]:
    """Count, statuses and p50/p99/max (ms, of the 200 answers) of a subset of a phase's records."""
    ms = sorted(lat * 1000 for _, lat, status, _ in records if status == 200)
    return {"requests": len(records), "statuses": status_counts(records),
            "errors": sum(1 for r in records if r[2] != 200),
            "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(ms[-1], 2) if ms else float("nan")}


def overlaps(record: Record, windows: list[tuple[float, float]]) -> bool:
    """Whether the request was in flight at some moment of one of the [start, end] windows."""
    start, lat = record[0], record[1]
    return any(start < w1 and start + lat > w0 for w0, w1 in windows)


def within(record: Record, w0: float, w1: float) -> bool:
    """Whether the request started and ended inside [w0, w1]."""
    return record[0] >= w0 and record[0] + record[1] <= w1


# ------------------------------------------------------------------------------------ load generator


@dataclass(frozen=True)
class LoadSpec:
    """What one load-generator process sends; picklable, so it crosses to the spawned worker."""

    base_url: str
    kind: str  # "healthz", "recommend" (items only) or "mixed" (items, or a user_id only)
    items: list[str]  # valid item ids: request sequences are drawn from them
    concurrency: int
    seconds: float  # deadline; an open-ended phase sets a cap here and ends through stop_file
    max_requests: int
    timeout_s: float
    k: int
    seed: int
    users: tuple[str, ...] = ()  # "mixed": users with stored events
    history_share: float = 0.5  # "mixed": share of requests that carry only a user_id
    stop_file: str | None = None  # the phase ends when this path exists


def _http(method: str, path: str, host: str, body: dict | None = None) -> bytes:
    """One complete HTTP/1.1 request (keep-alive), JSON body if any."""
    if body is None:
        return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _client(spec: LoadSpec, seed: int, deadline: float, state: dict[str, Any],
                  records: list[Record]) -> None:
    """One closed-loop client on one keep-alive connection, raw HTTP/1.1 like the open loop's
    (httpx cost ~1 ms of CPU per request here: the generator, not the server, set the pace)."""
    rng = random.Random(seed)
    url = urlsplit(spec.base_url)
    conn = _Connection(url.hostname or "127.0.0.1", url.port or 80)
    host = url.netloc
    try:
        while not state["stop"] and time.perf_counter() < deadline and state["budget"] > 0:
            state["budget"] -= 1  # one event loop: a plain shared counter is enough
            kind = "healthz" if spec.kind == "healthz" else "items"
            if spec.kind == "mixed" and rng.random() < spec.history_share:
                kind = "history"
            if kind == "healthz":
                request = _http("GET", "/healthz", host)
            elif kind == "history":
                request = _http("POST", "/v1/recommend", host, {"user_id": rng.choice(spec.users), "k": spec.k})
            else:  # a fresh random sequence, so the service's answer cache almost never hits
                seq = rng.sample(spec.items, rng.randint(MIN_LEN, MAX_LEN))
                request = _http("POST", "/v1/recommend", host, {"items": seq, "k": spec.k, "use_retrieval": True})
            start, t0 = now(), time.perf_counter()
            status: int | str
            try:
                status = await asyncio.wait_for(conn.exchange(request), spec.timeout_s)
            except (OSError, EOFError, ValueError, TimeoutError) as e:  # IncompleteReadError is an EOFError
                conn.close()
                status = type(e).__name__
            records.append((start, time.perf_counter() - t0, status, kind))
    finally:
        conn.close()


async def _watch_stop(path: str, state: dict[str, Any]) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.02)
    state["stop"] = True


async def _drive(spec: LoadSpec) -> dict[str, Any]:
    records: list[Record] = []
    state = {"budget": spec.max_requests, "stop": False}
    watcher = asyncio.create_task(_watch_stop(spec.stop_file, state)) if spec.stop_file else None
    start = time.perf_counter()
    deadline = start + spec.seconds
    await asyncio.gather(*(_client(spec, spec.seed * 1000 + i, deadline, state, records)
                           for i in range(spec.concurrency)))
    elapsed = time.perf_counter() - start
    if watcher is not None:
        watcher.cancel()
    return {"records": records, "elapsed_s": elapsed}


def load_worker(spec: LoadSpec) -> dict[str, Any]:
    """One load-generator process: its share of the clients, plus its own CPU time."""
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        out = runner.run(_drive(spec))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return out


# ------------------------------------------------------------------------------------ open loop
#
# One asyncio process offers 1,500 req/s from one core: raw HTTP/1.1 on keep-alive connections
# (no httpx, whose per-request cost is several times higher), request bytes made before the
# clock starts, uvloop when installed. A dispatcher hands each request to a queue at its
# scheduled time; ``connections`` connection loops take them in turn. When all connections are
# busy the request waits in the queue and that wait counts in its latency, as it would for a
# client that keeps to its schedule.

OpenRecord = tuple[float, float, int | str, float, float]  # (scheduled, latency_s, status, lag_s, queue_s)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def poisson_schedule(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Send times (s from the start, ascending, in [0, seconds)) of a Poisson process of ``rate``
    requests/s: exponential gaps of mean 1/rate."""
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be > 0, got {rate}, {seconds}")
    rng = np.random.default_rng(seed)
    n = int(rate * seconds + 6 * (rate * seconds) ** 0.5 + 16)  # enough gaps to pass ``seconds``
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while times[-1] < seconds:  # vanishingly rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return times[times < seconds]


def open_loop_summary(records: list[OpenRecord], seconds: float) -> dict[str, Any]:
    """Latency percentiles (ms, of the 200 answers, counted from each request's scheduled time),
    offered and achieved rates, errors, and the generator's own lag: ``dispatch_lag`` is how late
    the dispatcher queued a request (the generator's fault), ``queue_wait`` how long it then
    waited for a free connection (all busy: the server's)."""
    ok = sorted(r[1] * 1000 for r in records if r[2] == 200)
    lag = sorted(r[3] * 1000 for r in records)
    wait = sorted(r[4] * 1000 for r in records)
    errors = len(records) - len(ok)
    out = {
        "requests": len(records), "ok": len(ok), "errors": errors,
        "offered_rps": round(len(records) / seconds, 1) if seconds > 0 else 0.0,
        "rps": round(len(ok) / seconds, 1) if seconds > 0 else 0.0,  # achieved: answered 200 per second
        "elapsed_s": round(seconds, 3),
        "p50_ms": round(percentile(ok, 50), 2), "p90_ms": round(percentile(ok, 90), 2),
        "p99_ms": round(percentile(ok, 99), 2), "p999_ms": round(percentile(ok, 99.9), 2),
        "max_ms": round(ok[-1], 2) if ok else float("nan"),
        "mean_ms": round(sum(ok) / len(ok), 2) if ok else float("nan"),
        "dispatch_lag_p99_ms": round(percentile(lag, 99), 3),
        "queue_wait_p99_ms": round(percentile(wait, 99), 3),
    }
    out["error_kinds"] = {k: v for k, v in status_counts([(0.0, 0.0, r[2], "") for r in records]).items()
                          if k != "200"}
    return out


@dataclass(frozen=True)
class OpenLoopSpec:
    """What one open-loop generator process sends; picklable, so it crosses to the spawned worker."""

    base_url: str
    kind: str  # "healthz" or "recommend"
    items: list[str]
    rate: float  # requests/s of this process (a phase's rate split over the processes)
    seconds: float  # length of the schedule
    timeout_s: float  # per request; an unanswered request counts as an error "TimeoutError"
    k: int
    seed: int
    connections: int = 64  # keep-alive connections (the most requests in flight at once)


def request_bytes(spec: OpenLoopSpec, host: str, n: int, rng: random.Random) -> list[bytes]:
    """``n`` complete HTTP/1.1 requests; recommend bodies carry fresh random sequences (so the
    service's answer cache almost never hits), like the closed loop's."""
    if spec.kind == "healthz":
        return [f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()] * n
    out = []
    for _ in range(n):
        body = json.dumps({"items": rng.sample(spec.items, rng.randint(MIN_LEN, MAX_LEN)), "k": spec.k,
                           "use_retrieval": True}, separators=(",", ":")).encode()
        out.append(f"POST /v1/recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


class _Connection:
    """One keep-alive HTTP/1.1 connection, (re)opened on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> int:
        """Send one request, read the whole answer, return its status. A connection the server
        closed while idle (keep-alive timeout) fails before any byte arrives: retried once, fresh."""
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                await self.open()
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(request)
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                self.close()
                if fresh or attempt or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                    raise
                continue
            length = _CONTENT_LENGTH.search(head)
            if length is None:  # uvicorn sends Content-Length for every answer of this service
                self.close()
                raise ValueError("answer without Content-Length")
            await self.reader.readexactly(int(length[1]))
            if b"\r\nconnection: close" in head.lower():
                self.close()
            return int(head[9:12])
        raise AssertionError("unreachable")


async def _open_loop(spec: OpenLoopSpec, schedule: np.ndarray, requests: list[bytes]) -> dict[str, Any]:
    url = urlsplit(spec.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    conns = [_Connection(host, port) for _ in range(spec.connections)]
    await asyncio.gather(*(c.open() for c in conns))  # connect before the clock starts
    queue: asyncio.Queue[tuple[float, float, bytes] | None] = asyncio.Queue()
    records: list[OpenRecord] = []

    async def serve_queue(conn: _Connection) -> None:
        while (item := await queue.get()) is not None:
            scheduled, queued, request = item
            sent = now()
            status: int | str
            try:
                async with asyncio.timeout(spec.timeout_s):
                    status = await conn.exchange(request)
            except asyncio.CancelledError:  # the drain deadline passed (below)
                records.append((scheduled, now() - scheduled, "Cancelled", queued - scheduled, sent - queued))
                raise
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ValueError) as e:
                conn.close()
                status = type(e).__name__
            records.append((scheduled, now() - scheduled, status, queued - scheduled, sent - queued))

    workers = [asyncio.create_task(serve_queue(c)) for c in conns]
    start = now() + 0.01
    times = (start + schedule).tolist()
    i, n = 0, len(times)
    while i < n:
        t = now()
        while i < n and times[i] <= t:  # everything due by now, in order
            queue.put_nowait((times[i], t, requests[i]))
            i += 1
        if i < n:
            await asyncio.sleep(times[i] - now())
    for _ in workers:
        queue.put_nowait(None)
    # Bounded: what a saturated server has not answered timeout_s after the schedule ended is
    # counted as an error ("NotSent" if still queued, "Cancelled" if in flight), not waited for.
    _, pending = await asyncio.wait(workers, timeout=spec.timeout_s + 1.0)
    if pending:
        t = now()
        while not queue.empty():
            if (item := queue.get_nowait()) is not None:
                records.append((item[0], t - item[0], "NotSent", item[1] - item[0], t - item[1]))
        for w in pending:
            w.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for c in conns:
        c.close()
    return {"records": records, "start": start, "elapsed_s": now() - start}


def _loop_factory():
    try:
        import uvloop  # uvicorn[standard] brings it; a third less CPU per request here

        return uvloop.new_event_loop
    except ImportError:
        return None


def open_loop_worker(spec: OpenLoopSpec) -> dict[str, Any]:
    """One open-loop generator process: its schedule's records, plus its own CPU time."""
    schedule = poisson_schedule(spec.rate, spec.seconds, spec.seed)
    host = urlsplit(spec.base_url).netloc
    requests = request_bytes(spec, host, len(schedule), random.Random(spec.seed))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        out = runner.run(_open_loop(spec, schedule, requests))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out["seconds"] = spec.seconds
    return out
