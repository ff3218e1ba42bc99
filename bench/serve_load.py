"""HTTP load benchmark of the service: POST /v1/recommend against GET /healthz, over loopback.

    python bench/serve_load.py --run runs/faithful --concurrency 16 --seconds 15 \\
        --compare-batching --json /tmp/serve_load.json

The script starts ``ragrec serve`` itself (``python -m app.cli serve``) on a free loopback
port, waits for /healthz, then drives it from a SEPARATE process (``--client-procs``
processes, spawned): ``--concurrency`` asyncio clients, each with its own keep-alive
``httpx.AsyncClient``, send requests back to back for ``--seconds`` seconds (and at most
``--max-requests`` per phase). Every recommend request is a fresh random sequence of 5–50
distinct valid item ids from the run's items.json, so the service's answer cache almost never
hits. Phases, each after a short unrecorded warm-up:

  healthz     GET /healthz (the ceiling: routing, middleware and HTTP, no model)
  recommend   POST /v1/recommend with micro-batching as configured (default settings)
  recommend   again on a second server start with micro-batching off
              (RAGREC_BATCH_MAX_SIZE=1, RAGREC_BATCH_WAIT_MS=0), with --compare-batching

Reported per phase: requests/s, p50/p90/p99/max latency (client side, ms), errors, the CPU
seconds the server and the load generator used, and for recommend the mean micro-batch size
(from /metrics). Client and server share the machine's cores, so on a small machine the load
generator's own CPU use caps the /healthz figure; the CPU columns show by how much.
The server is always terminated (try/finally, also on SIGTERM). Only loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BATCHING_OFF = {"RAGREC_BATCH_MAX_SIZE": "1", "RAGREC_BATCH_WAIT_MS": "0"}
TARGETS = {"p50_ms": 5.0, "p99_ms": 25.0, "throughput_ratio": 0.40}  # from the issue
MIN_LEN, MAX_LEN = 5, 50


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


# ------------------------------------------------------------------------------------ load generator
# Runs in child processes: everything here must be importable and picklable under "spawn".


async def _client(base_url: str, kind: str, items: list[str], seed: int, deadline: float,
                  budget: list[int], timeout_s: float, k: int,
                  lat: list[float], errs: dict[str, int]) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as c:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            if kind == "healthz":
                send = c.get("/healthz")
            else:
                seq = rng.sample(items, rng.randint(MIN_LEN, MAX_LEN))
                send = c.post("/v1/recommend", json={"items": seq, "k": k, "use_retrieval": True})
            t0 = time.perf_counter()
            try:
                r = await send
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errs[f"http {r.status_code}"] = errs.get(f"http {r.status_code}", 0) + 1
            except httpx.HTTPError as e:
                errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1


async def _drive(base_url: str, kind: str, items: list[str], concurrency: int, seconds: float,
                 max_requests: int, timeout_s: float, k: int, seed: int) -> dict[str, Any]:
    lat: list[float] = []
    errs: dict[str, int] = {}
    budget = [max_requests]  # one event loop: a plain shared counter is enough
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_client(base_url, kind, items, seed * 1000 + i, deadline, budget, timeout_s, k,
                                   lat, errs) for i in range(concurrency)))
    return {"latencies": lat, "errors": errs, "elapsed_s": time.perf_counter() - start}


def load_worker(base_url: str, kind: str, items: list[str], concurrency: int, seconds: float,
                max_requests: int, timeout_s: float, k: int, seed: int) -> dict[str, Any]:
    """One load-generator process: its share of the clients, plus its own CPU time."""
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_drive(base_url, kind, items, concurrency, seconds, max_requests, timeout_s, k, seed))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return out


# ------------------------------------------------------------------------------------ server


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Server:
    """``python -m app.cli serve`` in its own process group; stop() always takes it down."""

    def __init__(self, run: Path, host: str, env_extra: dict[str, str], log_dir: Path, tag: str) -> None:
        self.run, self.host, self.env_extra = run, host, env_extra
        self.log_path = log_dir / f"server-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGREC_")} | self.env_extra
        for attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port(self.host)
            cmd = [sys.executable, "-m", "app.cli", "serve", "--run", str(self.run),
                   "--host", self.host, "--port", str(self.port)]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_healthy(timeout_s):
                return
            self.stop()
            if attempt == 2:
                break
        raise RuntimeError(f"server did not become healthy; log {self.log_path}:\n{self.log_tail()}")

    def _wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0, trust_env=False) as c:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if c.get("/healthz").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        return False

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.proc.pid) if self.proc is not None else None

    def batch_stats(self) -> tuple[float, float] | None:
        """(sum, count) of the ragrec_inference_batch_size histogram from /metrics."""
        try:
            with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as c:
                text = c.get("/metrics").text
        except httpx.HTTPError:
            return None
        vals: dict[str, float] = {}
        for line in text.splitlines():
            for key in ("ragrec_inference_batch_size_sum", "ragrec_inference_batch_size_count"):
                if line.startswith(key + " ") or line.startswith(key + "{"):
                    vals[key] = vals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        if len(vals) != 2:
            return None
        return vals["ragrec_inference_batch_size_sum"], vals["ragrec_inference_batch_size_count"]

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)  # the server's own group (start_new_session): uvicorn and any workers
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# ------------------------------------------------------------------------------------ phases


def run_phase(pool: ProcessPoolExecutor, server: Server, kind: str, items: list[str],
              args: argparse.Namespace, seed: int) -> dict[str, Any]:
    procs = args.client_procs
    shares = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    shares = [s for s in shares if s > 0]
    if args.warmup > 0:  # unrecorded: connections, allocator, first batches
        warm = [pool.submit(load_worker, server.base_url, kind, items, s, args.warmup, args.max_requests,
                            args.timeout, args.k, seed + 99 + i) for i, s in enumerate(shares)]
        for f in warm:
            f.result()
    cpu0, bs0 = server.cpu_s(), server.batch_stats() if kind == "recommend" else None
    futs = [pool.submit(load_worker, server.base_url, kind, items, s, args.seconds,
                        max(1, args.max_requests // len(shares)), args.timeout, args.k, seed + i)
            for i, s in enumerate(shares)]
    parts = [f.result() for f in futs]
    cpu1, bs1 = server.cpu_s(), server.batch_stats() if kind == "recommend" else None
    lat = [x for p in parts for x in p["latencies"]]
    errs: dict[str, int] = {}
    for p in parts:
        for key, n in p["errors"].items():
            errs[key] = errs.get(key, 0) + n
    res = summarize(lat, sum(errs.values()), max(p["elapsed_s"] for p in parts))
    res["error_kinds"] = errs
    res["server_cpu_s"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
    res["client_cpu_s"] = round(sum(p["cpu_s"] for p in parts), 2)
    if bs0 is not None and bs1 is not None and bs1[1] > bs0[1]:
        res["forward_passes"] = int(bs1[1] - bs0[1])
        res["mean_batch_size"] = round((bs1[0] - bs0[0]) / (bs1[1] - bs0[1]), 2)
    return res


def load_items(run: Path) -> list[str]:
    data = json.loads((run / "items.json").read_text())
    if isinstance(data, dict) and "tokens" in data:
        pad = data.get("pad")
        toks = [str(t) for t in data["tokens"] if t != pad]
    elif isinstance(data, dict):
        toks = [str(t) for t in data]
    else:
        toks = [str(t) for t in data]
    toks = [t for t in toks if t and not (t.startswith("[") and t.endswith("]"))]  # special tokens
    if len(toks) < MAX_LEN:
        raise SystemExit(f"error: {run}/items.json holds only {len(toks)} items; need at least {MAX_LEN}")
    return toks


# ------------------------------------------------------------------------------------ report


def fmt_row(name: str, r: dict[str, Any]) -> str:
    mb = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else "-"
    scpu = f"{r['server_cpu_s']:.1f}" if r.get("server_cpu_s") is not None else "-"
    return (f"{name:<25} {r['rps']:>8.1f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{r['max_ms']:>7.1f} {r['ok']:>7d} {r['errors']:>5d} {mb:>6} {scpu:>6} {r['client_cpu_s']:>6.1f}")


def print_report(report: dict[str, Any]) -> None:
    c = report["config"]
    print(f"\nserve_load: {c['run']}  concurrency={c['concurrency']} seconds={c['seconds']} "
          f"client_procs={c['client_procs']} cpus={report['machine']['cpus']}")
    print(f"{'phase':<25} {'req/s':>8} {'p50ms':>7} {'p90ms':>7} {'p99ms':>7} {'maxms':>7} "
          f"{'ok':>7} {'err':>5} {'batch':>6} {'srvCPU':>6} {'cliCPU':>6}")
    for name, r in report["phases"].items():
        print(fmt_row(name, r))
    hz = report["phases"]["healthz"]["rps"]
    for name, r in report["phases"].items():
        if not name.startswith("recommend"):
            continue
        ratio = r["rps"] / hz if hz else float("nan")
        checks = [("p50", r["p50_ms"] <= TARGETS["p50_ms"]), ("p99", r["p99_ms"] <= TARGETS["p99_ms"]),
                  ("ratio", ratio >= TARGETS["throughput_ratio"]), ("errors", r["errors"] == 0)]
        print(f"{name}: throughput recommend/healthz = {ratio:.2f}   targets (p50<=5ms, p99<=25ms, ratio>=0.40): "
              + " ".join(f"{k}={'ok' if ok else 'MISS'}" for k, ok in checks))


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="finished run directory to serve")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address only (127.0.0.1, ::1, localhost)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each phase")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per phase")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    ap.add_argument("--k", type=int, default=10, help="k of each recommend request")
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    ap.add_argument("--compare-batching", action="store_true",
                    help="run recommend again on a server with micro-batching off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.host == "localhost":
        args.host = "127.0.0.1"
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            ap.error(f"--host {args.host} is not a loopback address")
    except ValueError:
        ap.error(f"--host {args.host} is not an IP address")
    for name in ("concurrency", "max_requests", "client_procs", "k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seconds <= 0 or args.timeout <= 0 or args.warmup < 0:
        ap.error("--seconds and --timeout must be > 0, --warmup >= 0")
    args.client_procs = min(args.client_procs, args.concurrency)
    args.run = args.run.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items = load_items(args.run)
    # SIGTERM (e.g. a CI timeout) unwinds through the finally blocks, which stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    configs: list[tuple[str, dict[str, str], list[str]]] = [("batching_on", {}, ["healthz", "recommend"])]
    if args.compare_batching:
        configs.append(("batching_off", dict(BATCHING_OFF), ["recommend"]))
    phases: dict[str, dict[str, Any]] = {}
    servers_env: dict[str, dict[str, str]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="serve_load-"))
    with ProcessPoolExecutor(max_workers=args.client_procs, mp_context=get_context("spawn")) as pool:
        for tag, env, kinds in configs:
            server = Server(args.run, args.host, env, log_dir, tag)
            servers_env[tag] = env
            try:
                t0 = time.perf_counter()
                server.start()
                print(f"[{tag}] server up on {server.base_url} in {time.perf_counter() - t0:.1f}s "
                      f"(env {env or 'defaults'})", file=sys.stderr)
                for kind in kinds:
                    name = kind if kind == "healthz" else f"recommend ({tag.replace('_', ' ')})"
                    print(f"[{tag}] {kind}: {args.warmup:g}s warm-up + {args.seconds:g}s ...", file=sys.stderr)
                    phases[name] = run_phase(pool, server, kind, items, args, args.seed)
                    phases[name]["server_env"] = env
            finally:
                server.stop()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "httpx": httpx.__version__},
        "servers_env": servers_env,
        "targets": TARGETS,
        "sequence_length": [MIN_LEN, MAX_LEN],
        "phases": phases,
    }
    hz = phases["healthz"]["rps"]
    report["throughput_ratio"] = {n: round(r["rps"] / hz, 3) if hz else None
                                  for n, r in phases.items() if n.startswith("recommend")}
    print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"server logs: {log_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
