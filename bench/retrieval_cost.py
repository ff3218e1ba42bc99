"""What retrieval adds to one request in the service's inference path (in process, no HTTP).

    python bench/retrieval_cost.py --run runs/demo/ra [--requests 400] [--threads 1]

Loads the run as the service does (``Engine.from_run_dir``), builds its memory bank the way
the service does (``IndexManager.build``, into a temporary artifact root), then answers the
same single requests (a batch of one: random sequences of 5-50 known items, k = 10)
alternately with and without retrieval, and reports the median and mean milliseconds of
each and their difference (wall clock, and the CPU time of the serving thread, which a busy
machine distorts less), plus the per-stage split of the retrieval path (search, scoring).
Alternating in one run pairs the two under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Engine, Query
from app.index import IndexManager
from retriever.index import set_search_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the service's default is 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_search_threads(args.threads)  # as the service's inference thread has them
    engine = Engine.from_run_dir(args.run, histories=False)
    if engine.ra is None:
        sys.exit(f"error: {args.run} is not a retrieval run (no retrieval.pt)")
    with tempfile.TemporaryDirectory() as root:
        manager = IndexManager(engine.ra, root, model_version=engine.model_version)
        t = time.perf_counter()
        with torch.inference_mode():
            bank, names = manager.build(engine.histories or _histories(args.run, engine))
        manager.publish(bank, names)
        build_s = time.perf_counter() - t
        engine.index = manager
        stages: dict[str, list[float]] = {"search": [], "fusion": [], "model": []}
        engine.on_stage = lambda stage, s: stages[stage].append(s)
        rng = np.random.default_rng(args.seed)
        tokens = engine.vocab.tokens[1:]
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.requests + 20):
            items = list(rng.choice(tokens, size=int(rng.integers(5, 51)), replace=False))
            for use in (True, False) if i % 2 else (False, True):
                t, c = time.perf_counter(), time.thread_time()
                engine.recommend_batch([Query(items=items, k=10, use_retrieval=use)])
                if i >= 20:  # warm-up
                    times[use].append((time.perf_counter() - t) * 1000)
                    cpu[use].append((time.thread_time() - c) * 1000)
    report = {
        "run": str(args.run), "design": engine.ra.design, "bank_entries": len(bank), "bank_build_s": build_s,
        "requests": args.requests, "threads": args.threads,
        "with_ms": {"median": statistics.median(times[True]), "mean": statistics.fmean(times[True])},
        "without_ms": {"median": statistics.median(times[False]), "mean": statistics.fmean(times[False])},
        "stage_ms_median": {k: 1000 * statistics.median(v) for k, v in stages.items() if v},
    }
    report["added_ms"] = {k: report["with_ms"][k] - report["without_ms"][k] for k in ("median", "mean")}
    # CPU time of the serving thread (torch runs on it with 1 thread): what a loaded machine inflates least
    report["cpu_ms"] = {use: {"median": statistics.median(cpu[flag]), "mean": statistics.fmean(cpu[flag])}
                        for use, flag in (("with", True), ("without", False))}
    report["added_cpu_ms"] = {k: report["cpu_ms"]["with"][k] - report["cpu_ms"]["without"][k]
                              for k in ("median", "mean")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


def _histories(run: Path, engine: Engine) -> dict[str, np.ndarray]:
    from app.engine import read_run_data

    return read_run_data(run, engine.vocab, engine.n_items).histories


if __name__ == "__main__":
    main()
