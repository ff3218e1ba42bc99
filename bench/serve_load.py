"""HTTP load benchmark of the service over loopback: what issue #5 asks of it, in one run.

    python bench/serve_load.py --run runs/faithful-ra --concurrency 16 --seconds 15 \\
        --compare-batching --rebuild-cycles 3 --redis-outage 5 --json /tmp/serve_load_ra.json

The script starts ``ragrec serve`` itself (``python -m app.cli serve``, bench/serve_procs.py) on
a free loopback port, waits for /healthz, then drives it from a SEPARATE process
(``--client-procs`` processes, spawned; bench/serve_loadgen.py): ``--concurrency`` asyncio clients
with keep-alive connections send requests back to back. A recommend request carries a fresh random sequence of 5–50 distinct valid
item ids from the run's items.json (``use_retrieval`` true), so the answer cache almost never
hits. Every server start uses one index directory (``--index-dir``, default a temporary one, so
the run directory is never written): a retrieval run's first start builds the index (tens of
seconds on ML-100K), later starts load it. Phases, each after a short unrecorded warm-up:

  healthz                    GET /healthz (the ceiling: routing, middleware and HTTP, no model)
  recommend (batching on)    POST /v1/recommend, micro-batching as configured (default settings)
  recommend during rebuilds  with --rebuild-cycles N: the same load while the script runs N
                             rebuild-and-swap cycles one after another (POST /v1/index/rebuild
                             with the API key, poll GET /v1/jobs/{id}, check GET /v1/index serves
                             the new version). p99 of the requests in flight during a rebuild
                             window is compared with p99 of "recommend (batching on)".
  recommend (batching off)   with --compare-batching: a second server start with
                             RAGREC_BATCH_MAX_SIZE=1, RAGREC_BATCH_WAIT_MS=0
  mixed with redis outage    with --redis-outage S: a third start on a private redis-server
                             (loopback, free port, no persistence); events are posted for
                             --outage-users new users, then a load mixing item-carrying requests
                             and history-only ones ({"user_id"}) runs while Redis is stopped for
                             S seconds and started again on the same port. Redis comes back
                             empty: the script checks that history-only requests then answer 200
                             with the "popular" fallback, re-posts the events and checks that the
                             stored histories are used again.

  open loop R req/s          with --rate R [R ...]: after the phases above, on the same server, an
                             open-loop load per rate, lowest first (bench/serve_loadgen.py): POST
                             /v1/recommend at the times of a Poisson schedule of R requests/s for
                             --rate-seconds, whatever the server does, each latency counted from
                             the request's scheduled time (no coordinated omission). Reports
                             p50/p99/p99.9, offered and achieved rate, errors and the generator's
                             own lag; the series stops after the first rate whose p99 passes
                             --max-p99-ms (default 50) or that loses more than 1% of its requests.

    python bench/serve_load.py --run runs/vote-seed1 --pin --seconds 10 \\
        --rate 250 500 1000 1500 --json /tmp/serve_load_open.json

Reported per phase: requests/s, p50/p90/p99/max latency (client side, ms), errors (any answer
but 200, so the mixed phase counts its expected 503s), the CPU seconds the server (with its rebuild
subprocesses and, with --workers, all its workers) and the load generator used, the server's CPU
milliseconds per request (server_cpu_ms_per_request: its CPU seconds over the requests the phase
sent, the cost that does not depend on the load generator), the 1-minute load average at its
start, and for recommend the mean micro-batch size (from /metrics). After the recommend phase,
the resident memory of each server process (RSS, its anonymous and file-backed parts, PSS).

--pin puts the server (every process it starts, and Redis) on one CPU and the load generator and
this script on the others (2 CPUs: server on CPU 0, load generator on CPU 1), so neither takes
CPU time from the other; the report says which CPUs each had, or why pinning was not possible
(fewer than 2 usable CPUs: the run goes on unpinned). --workers N serves with ``ragrec serve
--workers N`` (N > 1: on a private redis-server the script starts, as the workers need one). Then each target of the issue with its
figure and PASS/MISS: p50 <= 5 ms, p99 <= 25 ms, throughput >= 40% of /healthz, zero failed
requests; >= 3 rebuild-and-swap cycles, p99 during swaps <= 2x baseline; during the outage,
item-carrying requests 200, history-only 503 (never 500), /readyz 503 "degraded" and 200 again
after. Client and server share the machine's cores, so on a small machine the load generator's
own CPU use caps the /healthz figure (the CPU columns show by how much), and other work on the
machine moves every figure: the load average before and after is reported.
Servers and redis-server are always stopped (try/finally, also on SIGTERM). Only loopback addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
from serve_loadgen import (
    MAX_LEN,
    MIN_LEN,
    LoadSpec,
    OpenLoopSpec,
    Record,
    latency_summary,
    load_worker,
    now,
    open_loop_summary,
    open_loop_worker,
    overlaps,
    status_counts,
    summarize,
    within,
)
from serve_procs import RedisServer, Server

BATCHING_OFF = {"RAGREC_BATCH_MAX_SIZE": "1", "RAGREC_BATCH_WAIT_MS": "0"}
TARGETS = {"p50_ms": 5.0, "p99_ms": 25.0, "throughput_ratio": 0.40,  # from issue #5
           "rebuild_cycles": 3, "swap_p99_ratio": 2.0,
           "pinned_p99_ms": 20.0,  # issue #14: pinned, concurrency 16
           "open_loop_rate": 1000.0, "open_loop_p99_ms": 10.0}  # issue #14: open loop at 1,000 req/s
BASELINE = "recommend (batching on)"  # the phase the rebuild phase's p99 is compared with


# ------------------------------------------------------------------------------------ phases


@contextlib.contextmanager
def serving(server: Server, args: argparse.Namespace, info: dict[str, Any], items: list[str]) -> Iterator[Server]:
    """Start ``server``, note its start time, index and a probe answer in ``info``; always stop it."""
    try:
        t0 = time.perf_counter()
        server.start(args.start_timeout)
        info["start_s"] = round(time.perf_counter() - t0, 1)
        with server.client() as c:
            info["index"] = c.get("/v1/index").json()
            r = c.post("/v1/recommend", json={"items": items[:MIN_LEN], "k": args.k, "use_retrieval": True})
            body = r.json()
            info["probe"] = {"status": r.status_code, "retrieval_used": body.get("retrieval_used"),
                             "index_version": body.get("index_version"), "fallback": body.get("fallback")}
        print(f"[{server.tag}] server up on {server.base_url} in {info['start_s']}s; index "
              f"{info['index'].get('version')} size {info['index'].get('size')}; probe {info['probe']}",
              file=sys.stderr)
        yield server
    finally:
        server.stop()


def run_phase(pool: ProcessPoolExecutor, server: Server, kind: str, items: list[str], args: argparse.Namespace,
              seed: int, *, users: tuple[str, ...] = (), during: Callable[[], Any] | None = None
              ) -> tuple[dict[str, Any], list[Record], Any]:
    """One measured load phase: (summary, per-request records, what ``during`` returned).

    Without ``during`` the load lasts --seconds; with it, the load runs until ``during()`` (called
    in this process while the load runs) returns, capped at --max-phase-seconds."""
    procs = args.client_procs
    shares = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    shares = [s for s in shares if s > 0]

    def specs(seconds: float, max_requests: int, seed0: int, stop_file: str | None = None) -> list[LoadSpec]:
        return [LoadSpec(server.base_url, kind, items, s, seconds, max_requests, args.timeout, args.k, seed0 + i,
                         users=users, history_share=args.history_share, stop_file=stop_file)
                for i, s in enumerate(shares)]

    if args.warmup > 0:  # unrecorded: connections, allocator, first batches
        for f in [pool.submit(load_worker, s) for s in specs(args.warmup, args.max_requests, seed + 99)]:
            f.result()
    stop_file = None
    if during is not None:
        stop_file = str(server.log_path.with_name(f"stop-{secrets.token_hex(4)}"))
    # /metrics is per process: with --workers N a scrape shows whichever worker took the connection
    recommend = kind != "healthz" and args.workers == 1
    cpu0, bs0, load0 = server.cpu_s(), server.batch_stats() if recommend else None, os.getloadavg()[0]
    seconds = args.seconds if during is None else args.max_phase_seconds
    futs = [pool.submit(load_worker, s)
            for s in specs(seconds, max(1, args.max_requests // len(shares)), seed, stop_file)]
    extra = None
    try:
        if during is not None:
            extra = during()
    finally:
        if stop_file is not None:
            Path(stop_file).touch()  # ends the load, also when during() failed
    parts = [f.result() for f in futs]
    cpu1, bs1 = server.cpu_s(), server.batch_stats() if recommend else None
    records = [r for p in parts for r in p["records"]]
    lat = [r[1] for r in records if r[2] == 200]
    res = summarize(lat, len(records) - len(lat), max(p["elapsed_s"] for p in parts))
    res["error_kinds"] = {s: n for s, n in status_counts(records).items() if s != "200"}
    res["server_cpu_s"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
    res["server_cpu_ms_per_request"] = cpu_ms_per_request(cpu0, cpu1, len(records))
    res["client_cpu_s"] = round(sum(p["cpu_s"] for p in parts), 2)
    res["loadavg_1m_at_start"] = round(load0, 2)
    if bs0 is not None and bs1 is not None and bs1[1] > bs0[1]:
        res["forward_passes"] = int(bs1[1] - bs0[1])
        res["mean_batch_size"] = round((bs1[0] - bs0[0]) / (bs1[1] - bs0[1]), 2)
    return res, records, extra


def cpu_ms_per_request(cpu0: float | None, cpu1: float | None, requests: int) -> float | None:
    """Server CPU milliseconds per request sent (answered or not). /proc counts CPU time in clock
    ticks (10 ms): over a phase of thousands of requests that rounding is far below 1%."""
    if cpu0 is None or cpu1 is None or requests == 0:
        return None
    return round((cpu1 - cpu0) * 1000 / requests, 3)


def open_loop_phase(pool: ProcessPoolExecutor, server: Server, items: list[str], args: argparse.Namespace
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The open-loop series: one load per rate of --rate, lowest first, until a rate fails the
    stop rule. Returns ({phase name: summary}, the series' report)."""
    procs = args.client_procs
    results: dict[str, dict[str, Any]] = {}
    series: dict[str, Any] = {"rates": [], "stopped_at_rate": None,
                              "stop_rule": f"p99 > {args.max_p99_ms:g} ms or errors > 1% of requests",
                              "seconds_per_rate": args.rate_seconds, "connections": args.connections,
                              "latency_from": "scheduled send time (Poisson arrivals)"}
    for i, rate in enumerate(sorted(args.rate)):
        specs = [OpenLoopSpec(server.base_url, "recommend", items, rate / procs, args.rate_seconds, args.timeout,
                              args.k, args.seed + 1000 * i + j, max(1, args.connections // procs))
                 for j in range(procs)]
        print(f"[open loop] {rate:g} req/s for {args.rate_seconds:g}s ...", file=sys.stderr)
        cpu0, load0 = server.cpu_s(), os.getloadavg()[0]
        parts = [f.result() for f in [pool.submit(open_loop_worker, s) for s in specs]]
        cpu1 = server.cpu_s()
        records = [r for p in parts for r in p["records"]]
        res = open_loop_summary(records, args.rate_seconds)
        res["rate"] = rate
        res["server_cpu_s"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
        res["server_cpu_ms_per_request"] = cpu_ms_per_request(cpu0, cpu1, len(records))
        res["client_cpu_s"] = round(sum(p["cpu_s"] for p in parts), 2)
        res["loadavg_1m_at_start"] = round(load0, 2)
        results[f"open loop {rate:g} req/s"] = res
        series["rates"].append(res)
        print(f"[open loop] {rate:g} req/s: achieved {res['rps']} req/s, p50 {res['p50_ms']} p99 {res['p99_ms']} "
              f"p99.9 {res['p999_ms']} ms, errors {res['errors']}, server CPU {res['server_cpu_ms_per_request']} "
              f"ms/request", file=sys.stderr)
        if not res["p99_ms"] <= args.max_p99_ms or res["errors"] > 0.01 * max(res["requests"], 1):
            series["stopped_at_rate"] = rate
            break
        time.sleep(1.0)  # let the last answers and the server's queues drain
    return results, series


def pin_plan(pin: bool, server_cpus: int) -> dict[str, Any]:
    """Which CPUs the server and the load generator get: the first ``server_cpus`` usable CPUs
    for the server, the rest for the generator (and this script)."""
    usable = sorted(os.sched_getaffinity(0))
    if not pin:
        return {"requested": False, "applied": False, "usable_cpus": usable}
    if len(usable) < server_cpus + 1:
        return {"requested": True, "applied": False, "usable_cpus": usable,
                "reason": f"--pin needs {server_cpus + 1} usable CPUs ({server_cpus} for the server, 1 for the load "
                          f"generator), this process may use {len(usable)} ({usable}): running unpinned"}
    return {"requested": True, "applied": True, "usable_cpus": usable, "server_cpus": usable[:server_cpus],
            "loadgen_cpus": usable[server_cpus:]}


def rebuild_once(c: httpx.Client, timeout_s: float) -> dict[str, Any]:
    """POST /v1/index/rebuild, poll the job until it ends, read the served version. Times are
    CLOCK_MONOTONIC: [start, end] is the window in which requests count as "during a rebuild"."""
    out: dict[str, Any] = {"start": now()}
    try:
        before = c.get("/v1/index").json().get("version")
        out["version_before"] = before
        for _ in range(10):  # 409: a rebuild is already running (another replica, a schedule)
            r = c.post("/v1/index/rebuild")
            if r.status_code != 409:
                break
            time.sleep(2.0)
        if r.status_code != 202:
            out.update(status="refused", error=f"POST /v1/index/rebuild -> {r.status_code}: {r.text[:500]}")
            return out
        job = r.json()
        out["job_id"] = job["job_id"]
        while job.get("status") in ("queued", "running") and now() - out["start"] < timeout_s:
            time.sleep(0.25)
            r = c.get(f"/v1/jobs/{out['job_id']}")
            if r.status_code != 200:
                out.update(status="poll failed", error=f"GET /v1/jobs/{out['job_id']} -> {r.status_code}: "
                                                       f"{r.text[:500]}")
                return out
            job = r.json()
        out["end"] = now()
        after = c.get("/v1/index").json().get("version")
        result = job.get("result") or {}
        out.update(status=job.get("status", "?") if job.get("status") not in ("queued", "running") else "timeout",
                   error=job.get("error"), version_after=after, job_version=result.get("version"),
                   job_s=result.get("seconds"), wall_s=round(out["end"] - out["start"], 2))
        out["swapped"] = after is not None and after != before and after == result.get("version", after)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out.update(status="error", error=f"{type(e).__name__}: {e}")
    finally:
        out.setdefault("end", now())
    return out


def rebuild_phase(pool: ProcessPoolExecutor, server: Server, items: list[str], args: argparse.Namespace,
                  baseline: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recommend load while --rebuild-cycles rebuild-and-swap cycles run back to back."""
    def cycles() -> list[dict[str, Any]]:
        out = []
        with server.client() as c:
            time.sleep(args.quiet)  # a few requests without a rebuild, inside the phase too
            for i in range(args.rebuild_cycles):
                out.append(rebuild_once(c, args.rebuild_timeout))
                cyc = out[-1]
                print(f"[rebuild {i + 1}/{args.rebuild_cycles}] {cyc['status']} in {cyc.get('wall_s')}s: "
                      f"{cyc.get('version_before')} -> {cyc.get('version_after')}"
                      + (f"  error: {cyc['error']}" if cyc.get("error") else ""), file=sys.stderr)
            time.sleep(args.quiet)
        return out

    res, records, cyc = run_phase(pool, server, "recommend", items, args, args.seed + 7, during=cycles)
    windows = [(c["start"], c["end"]) for c in cyc]
    in_swap = [r for r in records if overlaps(r, windows)]
    origin = min([r[0] for r in records] + [w[0] for w in windows])
    during = latency_summary(in_swap)
    ratio = during["p99_ms"] / baseline["p99_ms"] if baseline.get("p99_ms") else float("nan")
    rebuilds = {
        "cycles": [{k: v for k, v in c.items() if k not in ("start", "end")}
                   | {"start_s": round(c["start"] - origin, 2), "end_s": round(c["end"] - origin, 2)} for c in cyc],
        "succeeded": sum(1 for c in cyc if c["status"] == "succeeded" and c.get("swapped")),
        "versions_served": [cyc[0].get("version_before")] + [c.get("version_after") for c in cyc] if cyc else [],
        "rebuild_job_s": [c.get("job_s") for c in cyc],
        "rebuild_wall_s": [c.get("wall_s") for c in cyc],
        "requests_during_rebuilds": during,
        "requests_outside_rebuilds": latency_summary([r for r in records if not overlaps(r, windows)]),
        "baseline_phase": BASELINE,
        "baseline_p99_ms": baseline.get("p99_ms"),
        "p99_ratio": round(ratio, 3),
        "failed_requests": res["errors"],
    }
    return res, rebuilds


def outage_phase(pool: ProcessPoolExecutor, server: Server, redis: RedisServer, items: list[str],
                 args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Events for new users, then a mixed load while Redis is stopped for --redis-outage seconds."""
    rng = random.Random(args.seed)
    users = tuple(f"bench-user-{i}" for i in range(args.outage_users))  # not in the training data
    events = [{"user_id": u, "item_id": item, "timestamp": 1_000_000 + j}
              for u in users for j, item in enumerate(rng.sample(items, 10))]

    def history_only(c: httpx.Client) -> dict[str, Any]:
        r = c.post("/v1/recommend", json={"user_id": users[0], "k": args.k})
        return {"status": r.status_code, "fallback": r.json().get("fallback") if r.status_code == 200 else None,
                "detail": None if r.status_code == 200 else r.text[:300]}

    with server.client() as c:
        r = c.post("/v1/events", json=events)
        setup = {"users": len(users), "events": len(events), "post_status": r.status_code, "post": r.json(),
                 "history_only_before": history_only(c)}

    def outage() -> dict[str, Any]:
        out: dict[str, Any] = {"readyz_during": []}
        with server.client(5.0) as c:
            time.sleep(args.quiet)
            out["stopping_at"] = now()
            redis.stop()
            out["down_at"] = now()  # the process has exited
            print(f"[outage] redis stopped for {args.redis_outage:g}s", file=sys.stderr)
            while (left := args.redis_outage - (now() - out["down_at"])) > 0:
                r = c.get("/readyz")
                out["readyz_during"].append({"t_s": round(now() - out["down_at"], 2), "status": r.status_code,
                                             "body_status": r.json().get("status")})
                time.sleep(min(0.5, left))
            out["history_only_during"] = history_only(c)
            out["restart_at"] = now()
            redis.start()
            out["up_at"] = now()
            while now() - out["up_at"] < args.recovery_timeout:
                if c.get("/readyz").status_code == 200:
                    out["ready_after_s"] = round(now() - out["up_at"], 3)
                    break
                time.sleep(0.05)
            out["ready_at"] = out["up_at"] + out.get("ready_after_s", args.recovery_timeout)
            print(f"[outage] redis back; /readyz 200 after {out.get('ready_after_s')}s", file=sys.stderr)
            # Redis restarted empty: the users' events are gone until posted again.
            out["history_only_after_restart"] = history_only(c)
            r = c.post("/v1/events", json=events)
            out["repost_status"], out["repost"] = r.status_code, r.json()
            out["history_only_after_repost"] = history_only(c)
            time.sleep(args.quiet)
        return out

    res, records, out = run_phase(pool, server, "mixed", items, args, args.seed + 11, users=users, during=outage)
    stopping, down, restart = out["stopping_at"], out["down_at"], out["restart_at"]
    up, ready = out["up_at"], out["ready_at"]
    inside = [r for r in records if within(r, down, restart)]
    history_after = sorted((r for r in records if r[3] == "history" and r[0] >= up), key=lambda r: r[0])
    first_ok = next((r for r in history_after if r[2] == 200), None)
    report = {
        "setup": setup,
        "outage_s": round(restart - down, 2),
        "items_during": latency_summary([r for r in inside if r[3] == "items"]),
        "history_during": latency_summary([r for r in inside if r[3] == "history"]),
        "straddling": status_counts([r for r in records  # the rest: in flight while Redis stopped or came back
                                     if overlaps(r, [(stopping, ready)]) and not within(r, down, restart)]),
        # requests that ended before Redis was told to stop, or started once /readyz said 200 again
        "outside": latency_summary([r for r in records if r[0] + r[1] <= stopping or r[0] >= ready]),
        "server_errors": sum(1 for r in records if isinstance(r[2], int) and r[2] >= 500 and r[2] != 503),
        "readyz_during": out["readyz_during"],
        "ready_after_s": out.get("ready_after_s"),
        "history_ok_after_up_s": round(first_ok[0] + first_ok[1] - up, 3) if first_ok else None,
        "history_after_ready": latency_summary([r for r in history_after if r[0] >= ready]),
        **{k: out[k] for k in ("history_only_during", "history_only_after_restart", "repost_status", "repost",
                               "history_only_after_repost")},
    }
    return res, report


def load_items(run: Path) -> list[str]:
    data = json.loads((run / "items.json").read_text())
    if isinstance(data, dict) and "tokens" in data:
        pad = data.get("pad")
        toks = [str(t) for t in data["tokens"] if t != pad]
    else:
        toks = [str(t) for t in data]
    toks = [t for t in toks if t and not (t.startswith("[") and t.endswith("]"))]  # special tokens
    if len(toks) < MAX_LEN:
        raise SystemExit(f"error: {run}/items.json holds only {len(toks)} items; need at least {MAX_LEN}")
    return toks


# ------------------------------------------------------------------------------------ report


def check(name: str, value: Any, target: str, ok: bool) -> dict[str, Any]:
    return {"check": name, "value": value, "target": target, "result": "PASS" if ok else "MISS"}


def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue #5 this run measured, with its figure."""
    out = []
    phases, hz = report["phases"], report["phases"]["healthz"]["rps"]
    for tag, srv in report["servers"].items():
        probe = srv.get("probe", {})
        out.append(check(f"[{tag}] retrieval used", probe.get("retrieval_used"), "true",
                         probe.get("retrieval_used") is True))
    pinned = report["pin"]["applied"]
    for name, r in phases.items():
        if name == BASELINE and pinned:
            out.append(check(f"{name} p99 ms, pinned (issue #14)", r["p99_ms"], f"<= {TARGETS['pinned_p99_ms']:g}",
                             r["p99_ms"] <= TARGETS["pinned_p99_ms"] and r["errors"] == 0))
        if name.startswith("recommend (batching"):
            ratio = r["rps"] / hz if hz else float("nan")
            out += [check(f"{name} p50 ms", r["p50_ms"], f"<= {TARGETS['p50_ms']:g}", r["p50_ms"] <= TARGETS["p50_ms"]),
                    check(f"{name} p99 ms", r["p99_ms"], f"<= {TARGETS['p99_ms']:g}", r["p99_ms"] <= TARGETS["p99_ms"]),
                    check(f"{name} throughput / healthz", round(ratio, 3), f">= {TARGETS['throughput_ratio']:.2f}",
                          ratio >= TARGETS["throughput_ratio"]),
                    check(f"{name} failed requests", r["errors"], "0", r["errors"] == 0)]
    for r in (report.get("open_loop") or {}).get("rates", []):
        if r["rate"] == TARGETS["open_loop_rate"]:
            out.append(check(f"open loop {r['rate']:g} req/s p99 ms" + (", pinned" if pinned else ""), r["p99_ms"],
                             f"<= {TARGETS['open_loop_p99_ms']:g}, 0 errors",
                             r["p99_ms"] <= TARGETS["open_loop_p99_ms"] and r["errors"] == 0))
    if (rb := report.get("rebuilds")) is not None:
        out += [check("rebuild-and-swap cycles succeeded", rb["succeeded"], f">= {TARGETS['rebuild_cycles']}",
                      rb["succeeded"] >= TARGETS["rebuild_cycles"] and rb["succeeded"] == len(rb["cycles"])),
                check("failed requests during rebuild phase", rb["failed_requests"], "0", rb["failed_requests"] == 0),
                check("p99 during swaps / baseline p99", rb["p99_ratio"], f"<= {TARGETS['swap_p99_ratio']:g}",
                      rb["p99_ratio"] <= TARGETS["swap_p99_ratio"])]
    if (o := report.get("outage")) is not None:
        items, hist = o["items_during"], o["history_during"]
        ready = o["readyz_during"]
        degraded = sum(1 for x in ready if x["status"] == 503 and x["body_status"] == "degraded")
        hist_ok = o["history_only_after_repost"]
        out += [check("outage: item-carrying requests 200", items["statuses"], "all 200",
                      items["requests"] > 0 and items["errors"] == 0),
                check("outage: history-only requests 503", hist["statuses"], "all 503",
                      hist["requests"] > 0 and set(hist["statuses"]) == {"503"}),
                check("outage phase: 5xx other than 503", o["server_errors"], "0", o["server_errors"] == 0),
                check("before/after the outage: all requests 200", o["outside"]["statuses"], "all 200",
                      o["outside"]["requests"] > 0 and o["outside"]["errors"] == 0),
                check("outage: /readyz 503 degraded", f"{degraded}/{len(ready)} polls", "every poll",
                      bool(ready) and degraded == len(ready)),
                check("after: /readyz 200 again (s after Redis up)", o["ready_after_s"], "by itself",
                      o["ready_after_s"] is not None),
                check("after: history-only requests 200", o["history_after_ready"]["statuses"], "all 200",
                      o["history_after_ready"]["requests"] > 0 and o["history_after_ready"]["errors"] == 0),
                check("after: re-posted events used again (fallback)", hist_ok["fallback"], "null",
                      hist_ok["status"] == 200 and hist_ok["fallback"] is None)]
    return out


def fmt_row(name: str, r: dict[str, Any]) -> str:
    mb = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else "-"
    scpu = f"{r['server_cpu_s']:.1f}" if r.get("server_cpu_s") is not None else "-"
    per = f"{r['server_cpu_ms_per_request']:.3f}" if r.get("server_cpu_ms_per_request") is not None else "-"
    p999 = f"{r['p999_ms']:.2f}" if "p999_ms" in r else "-"
    return (f"{name:<26} {r['rps']:>8.1f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {p999:>7} "
            f"{r['max_ms']:>7.1f} {r['ok']:>7d} {r['errors']:>5d} {mb:>6} {scpu:>6} {per:>7} "
            f"{r['client_cpu_s']:>6.1f} {r['loadavg_1m_at_start']:>5.2f}")


def print_report(report: dict[str, Any]) -> None:
    c, m = report["config"], report["machine"]
    print(f"\nserve_load: {c['run']}  concurrency={c['concurrency']} seconds={c['seconds']} "
          f"client_procs={c['client_procs']} workers={c['workers']} cpus={m['cpus']}")
    pin = report["pin"]
    if pin["applied"]:
        print(f"pinned: server (and Redis) on CPU {pin['server_cpus']}, load generator on CPU {pin['loadgen_cpus']}")
    elif pin["requested"]:
        print(f"not pinned: {pin['reason']}")
    print(f"{'phase':<26} {'req/s':>8} {'p50ms':>7} {'p90ms':>7} {'p99ms':>7} {'p99.9':>7} {'maxms':>7} "
          f"{'ok':>7} {'err':>5} {'batch':>6} {'srvCPU':>6} {'ms/req':>7} {'cliCPU':>6} {'load':>5}")
    for name, r in report["phases"].items():
        print(fmt_row(name, r))
    if (ol := report.get("open_loop")) is not None:
        last = ol["rates"][-1] if ol["rates"] else {}
        print(f"open loop: latency from the scheduled send time; generator lag p99 {last.get('dispatch_lag_p99_ms')} "
              f"ms, wait for a connection p99 {last.get('queue_wait_p99_ms')} ms at the last rate; "
              + (f"stopped at {ol['stopped_at_rate']:g} req/s ({ol['stop_rule']})" if ol["stopped_at_rate"]
                 else "every rate passed the stop rule"))
    for tag, srv in report["servers"].items():
        for p in srv.get("memory", []):
            print(f"memory [{tag}] pid {p['pid']}: rss {p['rss_mib']} MiB (anon {p['anon_mib']}, file {p['file_mib']}), "
                  f"pss {p['pss_mib']} MiB  {p['cmd'][:60]}")
    if (rb := report.get("rebuilds")) is not None:
        d, o = rb["requests_during_rebuilds"], rb["requests_outside_rebuilds"]
        print(f"rebuilds: versions {' -> '.join(str(v) for v in rb['versions_served'])}; "
              f"job s {rb['rebuild_job_s']}, wall s {rb['rebuild_wall_s']}")
        print(f"  in flight during a rebuild: {d['requests']} requests, p50 {d['p50_ms']} p99 {d['p99_ms']} ms; "
              f"outside: {o['requests']}, p99 {o['p99_ms']} ms; baseline p99 {rb['baseline_p99_ms']} ms")
    if (o := report.get("outage")) is not None:
        print(f"redis outage {o['outage_s']}s: items {o['items_during']['statuses']} "
              f"(p50 {o['items_during']['p50_ms']} p99 {o['items_during']['p99_ms']} ms), "
              f"history-only {o['history_during']['statuses']}, straddling {o['straddling']}")
        print(f"  after: /readyz 200 {o['ready_after_s']}s after Redis up, first history-only 200 "
              f"{o['history_ok_after_up_s']}s after; Redis came back empty: history-only fallback "
              f"{o['history_only_after_restart']['fallback']!r} before re-posting the events, "
              f"{o['history_only_after_repost']['fallback']!r} after")
    print("\ntargets:")
    for x in report["checks"]:
        print(f"  {x['result']:<4}  {x['check']:<48} {x['value']!s:<28} (target {x['target']})")
    print(f"machine load (1/5/15 min): before {m['loadavg_before']}, after {m['loadavg_after']} on {m['cpus']} cpus")


# ------------------------------------------------------------------------------------ main


def json_safe(x: Any) -> Any:
    """NaN (an empty subset's percentile) as null, so the report is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="finished run directory to serve")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address only (127.0.0.1, ::1, localhost)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per fixed-length phase")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each phase")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per phase")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    ap.add_argument("--k", type=int, default=10, help="k of each recommend request")
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    ap.add_argument("--compare-batching", action="store_true",
                    help="run recommend again on a server with micro-batching off")
    ap.add_argument("--rebuild-cycles", type=int, default=0, help="rebuild-and-swap cycles under load (0: none)")
    ap.add_argument("--rebuild-timeout", type=float, default=600.0, help="seconds one rebuild job may take")
    ap.add_argument("--redis-outage", type=float, default=0.0,
                    help="seconds Redis is stopped during a mixed load (0: no Redis phase)")
    ap.add_argument("--outage-users", type=int, default=32, help="users with posted events in the Redis phase")
    ap.add_argument("--history-share", type=float, default=0.5, help="share of history-only requests there")
    ap.add_argument("--recovery-timeout", type=float, default=30.0, help="wait for /readyz 200 after Redis returns")
    ap.add_argument("--quiet", type=float, default=3.0,
                    help="seconds of load before and after the rebuilds / the outage, inside the phase")
    ap.add_argument("--max-phase-seconds", type=float, default=1800.0, help="cap on an open-ended phase")
    ap.add_argument("--index-dir", type=Path, default=None,
                    help="index versions of every server start (default: a temporary directory)")
    ap.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds a server start may take (the first builds the index)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-env", action="append", default=[], metavar="RAGREC_X=V",
                    help="extra setting for every server start (repeatable), e.g. RAGREC_TORCH_THREADS=2")
    ap.add_argument("--pin", action="store_true",
                    help="server on one CPU, load generator on the others (needs 2 usable CPUs)")
    ap.add_argument("--server-cpus", type=int, default=1, help="CPUs the server gets with --pin")
    ap.add_argument("--workers", type=int, default=1,
                    help="ragrec serve --workers N (N > 1: the script starts a private redis-server for them)")
    ap.add_argument("--rate", type=float, nargs="+", default=None, metavar="R",
                    help="open-loop rates in requests/s (Poisson arrivals), e.g. --rate 250 500 1000 1500")
    ap.add_argument("--rate-seconds", type=float, default=10.0, help="length of each open-loop rate")
    ap.add_argument("--connections", type=int, default=64,
                    help="open loop: keep-alive connections (the most requests in flight)")
    ap.add_argument("--max-p99-ms", type=float, default=50.0, help="open loop: stop after the first rate past this p99")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.host == "localhost":
        args.host = "127.0.0.1"
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            ap.error(f"--host {args.host} is not a loopback address")
    except ValueError:
        ap.error(f"--host {args.host} is not an IP address")
    for name in ("concurrency", "max_requests", "client_procs", "k", "outage_users", "workers", "server_cpus",
                 "connections"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for kv in args.server_env:
        if "=" not in kv or not kv.startswith("RAGREC_"):
            ap.error(f"--server-env {kv!r}: expected RAGREC_NAME=VALUE")
    if args.seconds <= 0 or args.timeout <= 0 or args.warmup < 0:
        ap.error("--seconds and --timeout must be > 0, --warmup >= 0")
    if args.rebuild_cycles < 0 or args.redis_outage < 0 or args.quiet < 0:
        ap.error("--rebuild-cycles, --redis-outage and --quiet must be >= 0")
    if args.rate is not None and (min(args.rate) <= 0 or args.rate_seconds <= 0 or args.max_p99_ms <= 0):
        ap.error("--rate values, --rate-seconds and --max-p99-ms must be > 0")
    if args.workers > 1 and shutil.which("redis-server") is None:
        ap.error("--workers > 1 needs redis-server on PATH (the workers share state through Redis)")
    if not 0 < args.history_share < 1:
        ap.error(f"--history-share must be in (0, 1), got {args.history_share}")
    args.client_procs = min(args.client_procs, args.concurrency)
    args.run = args.run.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items = load_items(args.run)
    redis_binary = shutil.which("redis-server")
    if args.redis_outage > 0 and redis_binary is None:
        raise SystemExit("error: --redis-outage needs redis-server on PATH (apt-get install redis-server)")
    # SIGTERM (e.g. a CI timeout) unwinds through the finally blocks, which stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = pin_plan(args.pin, args.server_cpus)
    if pin["requested"] and not pin["applied"]:
        print(f"warning: {pin['reason']}", file=sys.stderr)
    server_cpus, loadgen_cpus = (pin["server_cpus"], pin["loadgen_cpus"]) if pin["applied"] else (None, None)
    if loadgen_cpus:
        os.sched_setaffinity(0, loadgen_cpus)  # this script too: its probes and /proc reads stay off the server's CPU
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    api_key = secrets.token_hex(16)
    common = {"RAGREC_INDEX_DIR": str((args.index_dir or work / "index").resolve()), "RAGREC_API_KEY": api_key,
              **dict(kv.split("=", 1) for kv in args.server_env)}
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "httpx": httpx.__version__, "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "targets": TARGETS,
        "sequence_length": [MIN_LEN, MAX_LEN],
        "pin": pin,
        "servers": {},
        "phases": {},
    }
    phases, servers = report["phases"], report["servers"]

    def server(tag: str, env: dict[str, str]) -> Server:
        servers[tag] = {"env": {k: v for k, v in env.items() if k != "RAGREC_API_KEY"}, "workers": args.workers}
        return Server(args.run, args.host, common | env, work, tag, api_key, workers=args.workers, cpus=server_cpus)

    def phase(tag: str, name: str, kind: str, srv: Server) -> None:
        print(f"[{tag}] {name}: {args.warmup:g}s warm-up + {args.seconds:g}s ...", file=sys.stderr)
        phases[name] = run_phase(pool, srv, kind, items, args, args.seed)[0]

    pool_kw: dict[str, Any] = {"initializer": os.sched_setaffinity, "initargs": (0, loadgen_cpus)} if loadgen_cpus else {}
    with contextlib.ExitStack() as cleanup, \
            ProcessPoolExecutor(max_workers=args.client_procs, mp_context=get_context("spawn"), **pool_kw) as pool:
        if args.index_dir is None:  # the temporary index (~25 MB a version) goes; the logs stay
            cleanup.callback(shutil.rmtree, work / "index", ignore_errors=True)
        if args.workers > 1 and "RAGREC_REDIS_URL" not in common:  # the workers share state through Redis
            assert redis_binary is not None
            shared_redis = RedisServer(redis_binary, args.host, work, cpus=server_cpus)
            shared_redis.start()
            cleanup.callback(shared_redis.stop)
            common["RAGREC_REDIS_URL"] = shared_redis.url
        with serving(server("batching_on", {}), args, servers["batching_on"], items) as srv:
            phase("batching_on", "healthz", "healthz", srv)
            phase("batching_on", BASELINE, "recommend", srv)
            servers["batching_on"]["memory"] = srv.memory()  # after a load: the pages requests touch are in
            if args.rate:
                ol_phases, report["open_loop"] = open_loop_phase(pool, srv, items, args)
                phases.update(ol_phases)
            if args.rebuild_cycles > 0:
                print(f"[batching_on] {args.rebuild_cycles} rebuilds under load ...", file=sys.stderr)
                phases["recommend during rebuilds"], report["rebuilds"] = rebuild_phase(
                    pool, srv, items, args, phases[BASELINE])
        if args.compare_batching:
            with serving(server("batching_off", dict(BATCHING_OFF)), args, servers["batching_off"], items) as srv:
                phase("batching_off", "recommend (batching off)", "recommend", srv)
        if args.redis_outage > 0:
            assert redis_binary is not None
            redis = RedisServer(redis_binary, args.host, work, cpus=server_cpus)
            redis.start()
            try:
                srv_redis = server("redis", {"RAGREC_REDIS_URL": redis.url})
                with serving(srv_redis, args, servers["redis"], items) as srv:
                    print(f"[redis] mixed load, Redis stopped for {args.redis_outage:g}s ...", file=sys.stderr)
                    phases["mixed with redis outage"], report["outage"] = outage_phase(pool, srv, redis, items, args)
            finally:
                redis.stop()
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    hz = phases["healthz"]["rps"]
    report["throughput_ratio"] = {n: round(r["rps"] / hz, 3) if hz else None
                                  for n, r in phases.items() if n.startswith("recommend (batching")}
    report["checks"] = checks(report)
    print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    print(f"server logs: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
