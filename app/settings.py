"""Service settings: one pydantic-settings class, read from ``RAGREC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service can be told. ``Settings(run_dir=...)`` in tests, the environment in production."""

    model_config = SettingsConfigDict(env_prefix="RAGREC_", extra="forbid")

    run_dir: Path  # a finished `ragrec train` run: config.yaml, model.pt, items.json
    redis_url: str | None = None  # None: the in-process store (one replica only)
    redis_prefix: str = "ragrec"  # every Redis key starts with this; lets services share a Redis
    redis_timeout_s: float = Field(0.5, gt=0)  # a dead Redis must fail fast (the API answers 503)
    api_key: str | None = None  # required by admin endpoints (rebuild, rollback, evaluate, jobs); None disables them
    max_batch: int = Field(64, ge=1)  # requests per POST /v1/recommend/batch
    max_events: int = Field(1000, ge=1)  # events per POST /v1/events
    max_body_bytes: int = Field(1 << 20, ge=1)  # larger request bodies get 413
    max_history: int | None = Field(None, ge=1)  # stored events per user; None: the model's max_len
    cache_ttl_s: float = Field(30.0, gt=0)  # lifetime of cached POST /v1/recommend answers
    # micro-batcher: longest wait for company after a request. 0: no waiting; a batch is whatever
    # queued up while the previous one ran, so batches still grow with load (2-core
    # bench/serve_load.py, concurrency 16: 759 req/s, p99 35 ms vs 698 and 41 with 2 ms; alone: p50 3.9 vs
    # 6.3 ms). A wait pays off where a pass costs about the same for 1 or 64 requests (GPU).
    batch_wait_ms: float = Field(0.0, ge=0)
    batch_max_size: int = Field(64, ge=1)  # micro-batcher: most requests in one forward pass
    device: str = "cpu"  # torch device for inference
    # intra-op threads for inference. A micro-batch is a few small matrices: a second thread mostly
    # waits on the first and competes with the event loop (2-core bench/serve_load.py: 695 req/s
    # with 1 thread vs 594 with torch's default of one per core). Raise it for large batches.
    torch_threads: int = Field(1, ge=1)  # also ONNX Runtime's and faiss's (OpenMP) threads
    # the encoder's forward pass: "torch" (eager), or "onnx": exported at start and run by ONNX Runtime
    # (CPU; pip install 'ragrec[onnx]'; 0.28 vs 0.40 ms of CPU per request at batch 16, docs/serving.md);
    # "auto": onnx where it can run (CPU device, onnxruntime installed), else torch
    inference: Literal["auto", "torch", "onnx"] = "auto"
    access_log: bool = False  # uvicorn's line per request (costs CPU under load; the proxy usually logs)
    training_histories: bool = True  # requests by user_id start from the user's history in the run's data
    # Retrieval (runs with retrieval.pt): the memory bank's versions live here; None: <run_dir>/index
    index_dir: Path | None = None
    build_index_on_start: bool = True  # no version yet: build one at start-up (under the rebuild lock)
    rebuild_interval: float = Field(0.0, ge=0)  # seconds between scheduled rebuilds; 0: on demand only
    index_poll_s: float = Field(2.0, gt=0)  # how often a replica checks the shared current index version
    rebuild_subprocess: bool = True  # rebuilds run in a child process (False: worker threads of this one)
    rebuild_threads: int = Field(1, ge=1)  # torch threads of the rebuild process
    rebuild_nice: int = Field(10, ge=0, le=19)  # its scheduling priority: requests come first
    rebuild_lock_ttl_s: float = Field(120.0, gt=0)  # the rebuild lock expires if its holder dies
    index_min_recall: float = Field(0.9, gt=0, le=1)  # a new bank must reach this recall@10 vs exact search
    index_keep_versions: int = Field(5, ge=1)  # older bank versions are pruned
    max_eval_sequences: int = Field(10_000, ge=1)  # sequences per POST /v1/evaluate

    @property
    def index_root(self) -> Path:
        return self.index_dir if self.index_dir is not None else self.run_dir / "index"
