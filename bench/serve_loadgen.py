"""The load generator of bench/serve_load.py, and the statistics it reports.

``load_worker`` runs in a separate, spawned process: everything here must be importable and
picklable under "spawn", and imports nothing from the service. Each worker runs ``concurrency``
asyncio clients, each with its own keep-alive ``httpx.AsyncClient``, sending requests back to
back until the deadline, the request budget, or the stop file (the driver creates it to end an
open-ended phase). It returns one record per request:

    (start, latency_s, status, kind)

start is CLOCK_MONOTONIC, which is system-wide on Linux, so the driver can place requests against
the rebuild and outage windows it timed in its own process; status is the HTTP code (int) or the
httpx exception's name (str); kind is "healthz", "items" (a request carrying its items) or
"history" (a request with only a user_id).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from dataclasses import dataclass
from typing import Any

import httpx

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


async def _client(spec: LoadSpec, seed: int, deadline: float, state: dict[str, Any],
                  records: list[Record]) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=spec.base_url, timeout=spec.timeout_s, limits=limits,
                                 trust_env=False) as c:
        while not state["stop"] and time.perf_counter() < deadline and state["budget"] > 0:
            state["budget"] -= 1  # one event loop: a plain shared counter is enough
            kind = "healthz" if spec.kind == "healthz" else "items"
            if spec.kind == "mixed" and rng.random() < spec.history_share:
                kind = "history"
            if kind == "healthz":
                send = c.get("/healthz")
            elif kind == "history":
                send = c.post("/v1/recommend", json={"user_id": rng.choice(spec.users), "k": spec.k})
            else:  # a fresh random sequence, so the service's answer cache almost never hits
                seq = rng.sample(spec.items, rng.randint(MIN_LEN, MAX_LEN))
                send = c.post("/v1/recommend", json={"items": seq, "k": spec.k, "use_retrieval": True})
            start, t0 = now(), time.perf_counter()
            status: int | str
            try:
                status = (await send).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            records.append((start, time.perf_counter() - t0, status, kind))


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
    out = asyncio.run(_drive(spec))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return out
