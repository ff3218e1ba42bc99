"""Where one recommendation's server CPU goes, measured in process (no sockets, no load generator).

    python bench/serve_breakdown.py --run runs/demo/ra [--concurrency 16] [--requests 2000] [--reps 3]

Four measurements, each the process CPU time over the requests it served (the minimum over
``--reps`` repetitions: a busy machine only ever adds time):

  app: healthz       GET /healthz through the whole ASGI app (middleware, routing): the framework
                     floor of a routed request
  app: recommend     POST /v1/recommend through the whole ASGI app, ``--concurrency`` callers at once,
                     so the micro-batcher forms batches as under load: middleware, the fast path's
                     validation, the cache, the batcher's hand-off, the engine and the answer's encoding
  engine: batch B    ``Engine.recommend_batch`` on batches of the mean size the app phase formed,
                     with and without retrieval, and its stages (model, search, vote/fusion)
  engine: 1 request  the same for a batch of one, with and without retrieval: what retrieval adds to
                     a single request (the figure ``bench/retrieval_cost.py`` gives in wall time)

Every request carries a fresh random sequence of 5-50 known items (as bench/serve_load.py), so the
answer cache does not hit. What HTTP itself (uvicorn, httptools) costs is the difference between
bench/serve_load.py's /healthz figure and "app: healthz" here. The report prints the split and,
with --json, writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app.engine as engine_module
from app.engine import Engine, Query
from app.main import create_app
from app.settings import Settings
from retriever.index import set_search_threads
from training.data.sequences import Vocabulary


def _scope(method: str, path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def _call(app, method: str, path: str, body: bytes = b"") -> int:
    """One request through the ASGI app; its status."""
    delivered = False
    status = 0

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path, body), receive, send)
    return status


def _bodies(tokens: list[str], n: int, rng: np.random.Generator) -> list[list[str]]:
    return [[str(t) for t in rng.choice(tokens, size=int(rng.integers(5, 51)), replace=False)] for _ in range(n)]


async def _app_phases(args: argparse.Namespace, tokens: list[str], rng: np.random.Generator) -> dict:
    settings = Settings(run_dir=args.run, index_dir=args.index_dir, torch_threads=1)  # type: ignore[call-arg]
    app = create_app(settings)
    out: dict = {}
    async with app.router.lifespan_context(app):
        if app.state.engine.ra is not None and app.state.engine.index_version is None:
            sys.exit("error: no index is served (build one: the first start builds it unless told not to)")
        out["inference"] = "onnx" if getattr(app.state.engine, "onnx", None) is not None else "torch"

        async def phase(kind: str) -> tuple[float, float]:
            items = _bodies(tokens, args.requests, rng)
            bodies = [json.dumps({"items": it, "k": 10, "use_retrieval": True}).encode() for it in items]
            todo = iter(range(args.requests))
            batches0 = app.state.batcher.batches_run

            async def caller() -> None:
                for i in todo:
                    status = await (_call(app, "GET", "/healthz") if kind == "healthz"
                                    else _call(app, "POST", "/v1/recommend", bodies[i]))
                    if status != 200:
                        raise RuntimeError(f"{kind}: HTTP {status}")

            c0 = time.process_time()
            await asyncio.gather(*(caller() for _ in range(args.concurrency)))
            cpu = (time.process_time() - c0) / args.requests * 1000
            batches = app.state.batcher.batches_run - batches0
            return cpu, (args.requests / batches if batches else 0.0)

        await phase("recommend")  # warm-up
        for kind in ("healthz", "recommend"):
            runs = [await phase(kind) for _ in range(args.reps)]
            out[f"app_{kind}_cpu_ms"] = min(r[0] for r in runs)
            if kind == "recommend":
                out["mean_batch"] = float(np.mean([r[1] for r in runs]))
    return out


def _engine_phases(args: argparse.Namespace, batch: int, rng: np.random.Generator) -> dict:
    from app.index import IndexManager

    torch.set_num_threads(1)
    set_search_threads(1)  # as the service's inference thread has them
    engine = Engine.from_run_dir(args.run, histories=False)
    if engine.ra is not None:
        manager = IndexManager(engine.ra, args.index_dir, model_version=engine.model_version)
        manager.load()
        engine.index = manager
    tokens = engine.vocab.tokens
    # The engine times its stages with time.perf_counter; here they are timed in CPU time of this
    # thread instead (the engine runs on it with one torch thread), which a busy machine inflates less.
    engine_module.time = types.SimpleNamespace(perf_counter=time.thread_time)
    stages: dict[str, float] = {}
    engine.on_stage = lambda stage, s: stages.__setitem__(stage, stages.get(stage, 0.0) + s)
    out: dict = {}
    for size, label in ((batch, f"batch{batch}"), (1, "single")):
        n_batches = max(20, args.requests // (size * 4))
        queries = [[Query(items=it, k=10) for it in _bodies(tokens, size, rng)] for _ in range(n_batches)]
        for use in (True, False):
            best, best_stages = float("inf"), {}
            for _ in range(args.reps):
                stages.clear()
                c0 = time.thread_time()
                for qs in queries:
                    engine.recommend_batch([Query(**{**vars(q), "use_retrieval": use}) for q in qs])
                cpu = (time.thread_time() - c0) / (n_batches * size) * 1000
                if cpu < best:
                    best, best_stages = cpu, {k: v / (n_batches * size) * 1000 for k, v in stages.items()}
            key = f"engine_{label}_{'with' if use else 'without'}"
            out[key + "_cpu_ms"] = best
            out[key + "_stage_ms"] = best_stages
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--index-dir", type=Path, default=None, help="where the index versions are (default: RUN/index)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.index_dir = args.index_dir or args.run / "index"
    rng = np.random.default_rng(args.seed)
    tokens = Vocabulary.load(args.run / "items.json").tokens
    report = {"run": str(args.run), "concurrency": args.concurrency, "requests": args.requests, "reps": args.reps}
    report |= asyncio.run(_app_phases(args, tokens, rng))
    report |= _engine_phases(args, max(1, round(report["mean_batch"])), rng)
    b = max(1, round(report["mean_batch"]))
    engine_with = report[f"engine_batch{b}_with_cpu_ms"]
    # POST /v1/recommend takes the fast path (app/routes/recommend.py: FastRecommend): no routing
    # and no FastAPI request handling, so /healthz's framework cost is not part of it; it is
    # reported beside the split as the floor of a routed request.
    report["split_ms"] = {
        "around the engine: middleware, validation, cache, batcher, encoding": report["app_recommend_cpu_ms"]
        - engine_with,
        **{f"engine: {k}": v for k, v in report[f"engine_batch{b}_with_stage_ms"].items()},
        "engine: the rest (ids, masks, top-k, answers)": engine_with
        - sum(report[f"engine_batch{b}_with_stage_ms"].values()),
    }
    report["retrieval_adds_single_ms"] = report["engine_single_with_cpu_ms"] - report["engine_single_without_cpu_ms"]
    print(f"{args.run}: inference {report['inference']}, concurrency {args.concurrency}, "
          f"mean micro-batch {report['mean_batch']:.1f}; CPU ms per request (min of {args.reps})")
    print(f"  app (no HTTP): healthz {report['app_healthz_cpu_ms']:.3f}, recommend {report['app_recommend_cpu_ms']:.3f}")
    print(f"  engine, batch {b}: with retrieval {engine_with:.3f}, without {report[f'engine_batch{b}_without_cpu_ms']:.3f}")
    print(f"  engine, one request: with {report['engine_single_with_cpu_ms']:.3f}, without "
          f"{report['engine_single_without_cpu_ms']:.3f}: retrieval adds {report['retrieval_adds_single_ms']:.3f}")
    for name, ms in report["split_ms"].items():
        print(f"    {name:68s} {ms:7.3f}")
    print(f"  (a routed request's framework floor, /healthz in process: {report['app_healthz_cpu_ms']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
