"""Index scale benchmark: build time, batched search QPS and recall@10 against exact search.

    python bench/index_scale.py --n 1000000 --dim 64 --json runs/index_1m.json
    python bench/index_scale.py --n 10000000 --dim 64 --kind ivf_pq --json runs/index_10m.json

Data: clustered unit vectors from ``retriever.synthetic`` (about √n clusters,
noise with a decaying spectrum), generated in chunks; queries are fresh draws
from the same clusters. Parameters left open (nlist, nprobe, PQ m) are chosen
by ``build_index`` exactly as in production. Exact search (faiss Flat, BLAS)
runs in the same process on the first ``--exact-queries`` queries: it gives
the truth for recall@10 and the reference speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import faiss
import numpy as np

from retriever import index as ix
from retriever.bank import MemoryBank
from retriever.synthetic import iter_clustered

logger = logging.getLogger("bench.index_scale")


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB."""
    current = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generate(n: int, dim: int, seed: int, n_clusters: int) -> np.ndarray:
    x = np.empty((n, dim), dtype=np.float32)
    start = 0
    for chunk in iter_clustered(n, dim, n_clusters=n_clusters, seed=seed, chunk=1 << 20):
        x[start : start + len(chunk)] = chunk
        start += len(chunk)
    return x


def timed_search(fn, queries: np.ndarray, batch: int, repeats: int) -> tuple[np.ndarray, float]:
    """Run fn over queries in batches; return its ids and the best queries/s over ``repeats``."""
    best, ids = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = np.concatenate([fn(queries[s : s + batch]) for s in range(0, len(queries), batch)])
        best = max(best, len(queries) / (time.perf_counter() - t0))
    return ids, best


def recall_at_10(I: np.ndarray, I_true: np.ndarray) -> float:
    hits = (I[:, :10, None] == I_true[:, None, :10]).any(axis=2)
    return float(hits.mean())


def run(args) -> dict:
    n_clusters = max(8, round(args.n**0.5))
    t0 = time.perf_counter()
    x = generate(args.n, args.dim, seed=0, n_clusters=n_clusters)
    queries = generate(args.queries, args.dim, seed=1, n_clusters=n_clusters)
    gen_s = time.perf_counter() - t0
    logger.info("generated %d x %d in %.1fs, RSS %.2f GiB", args.n, args.dim, gen_s, rss_gib()[0])

    spec = ix.IndexSpec(kind=args.kind, use_gpu={"auto": "auto", "yes": True, "no": False}[args.gpu])
    t0 = time.perf_counter()
    built = ix.build_index(x, spec)
    build_s = time.perf_counter() - t0
    logger.info("built %s on %s in %.1fs: %s", built.kind, built.device, build_s, built.params)

    nq_exact = min(args.exact_queries, args.queries)
    t0 = time.perf_counter()
    _, I_true = ix.exact_knn(queries[:nq_exact], x, 10)
    exact_qps = nq_exact / (time.perf_counter() - t0)

    _, index_qps = timed_search(lambda q: ix.search(built, q, 10)[1], queries, args.batch, args.repeats)
    I_index = ix.search(built, queries[:nq_exact], 10)[1]
    zeros = np.zeros(args.n, dtype=np.int64)
    bank = MemoryBank.restore(vectors=x, ids=np.arange(args.n), alive=np.ones(args.n, bool), targets=zeros,
                              users=zeros, positions=zeros, quality=None, values=None, index=built, spec=spec)
    _, bank_qps = timed_search(lambda q: bank.search(q, 10).I, queries, args.batch, args.repeats)
    I_bank = bank.search(queries[:nq_exact], 10).I

    index_bytes = faiss.serialize_index(ix.to_cpu_index(built)).nbytes
    current, peak = rss_gib()
    return {
        "n": args.n, "dim": args.dim, "clusters": n_clusters, "queries": args.queries, "batch": args.batch,
        "kind": built.kind, "device": built.device, "params": built.params,
        "generate_s": round(gen_s, 2), "build_s": round(build_s, 2),
        "index_qps": round(index_qps), "index_recall_at_10": round(recall_at_10(I_index, I_true), 4),
        "bank_qps": round(bank_qps), "bank_recall_at_10": round(recall_at_10(I_bank, I_true), 4),
        "exact_qps": round(exact_qps, 1), "exact_queries": nq_exact,
        "speedup_vs_exact": round(bank_qps / exact_qps, 1),
        "index_bytes_per_vector": round(index_bytes / args.n, 1),
        "bank_bytes_per_vector": round(index_bytes / args.n + x.itemsize * args.dim + 3 * 8 + 4 + 8 + 1, 1),
        "rss_gib": round(current, 2), "peak_rss_gib": round(peak, 2),
        "machine": {"cpus": os.cpu_count(), "omp_threads": faiss.omp_get_max_threads(),
                    "faiss": faiss.__version__, "gpus": ix.gpu_available(), "python": platform.python_version()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--kind", default="ivf_flat", choices=ix.KINDS)
    parser.add_argument("--queries", type=int, default=10_000, help="fresh queries for the QPS runs")
    parser.add_argument("--exact-queries", type=int, default=2_000, help="queries searched exactly (truth)")
    parser.add_argument("--batch", type=int, default=4_096, help="queries per search call")
    parser.add_argument("--repeats", type=int, default=3, help="QPS runs; the best is reported")
    parser.add_argument("--gpu", default="auto", choices=["auto", "yes", "no"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
