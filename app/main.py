"""The FastAPI application: `create_app(settings)` and its lifespan (middleware lives in app.middleware).

Run it with `serve(run_dir, host, port, workers)` (wired to `ragrec serve`) or with
`uvicorn --factory app.main:app_from_env` and `RAGREC_*` variables.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from app.batcher import MicroBatcher
from app.docs import install_docs
from app.engine import Engine
from app.index import IndexManager
from app.jobs import Jobs, RebuildBusy
from app.middleware import (
    BodyLimitMiddleware,
    InternalErrorMiddleware,
    MetricsMiddleware,
    ServiceMetrics,
    install_error_handlers,
)
from app.routes import evaluate, events, health, index, jobs, recommend, users
from app.settings import Settings
from app.store import Store, StoreUnavailable, make_store

logger = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    kw: dict[str, Any] = ({"prefix": settings.redis_prefix, "timeout_s": settings.redis_timeout_s}
                          if settings.redis_url else {})
    return make_store(settings.redis_url, **kw)


async def open_index(engine: Engine, store: Store, settings: Settings, metrics: ServiceMetrics) -> Jobs | None:
    """For a retrieval run: serve the current index version (the store's, else the
    artifact root's), or build the first one. None for a run without retrieval."""
    if engine.ra is None:
        return None
    manager = IndexManager(engine.ra, settings.index_root, model_version=engine.model_version,
                           min_recall=settings.index_min_recall, keep_versions=settings.index_keep_versions)
    engine.index = manager
    jobs = Jobs(engine, manager, store, settings, metrics)
    try:
        wanted = await store.get_index_version()
    except StoreUnavailable:
        wanted = None
    wanted = wanted or manager.store.current()
    if wanted is not None:
        try:
            await jobs.load_version(wanted)
        except Exception as e:
            logger.error("index %s not served: %s", wanted, e)
    if manager.serving is None and settings.build_index_on_start:
        try:
            job = await jobs.start_rebuild("startup", in_process=True)  # nothing is served yet
        except (RebuildBusy, StoreUnavailable) as e:
            logger.warning("no index built at start-up (%s); serving without retrieval until one appears", e)
        else:
            while (record := await store.get_job(job["id"])) is not None and record["status"] in ("queued", "running"):
                await asyncio.sleep(0.1)
            if record is not None and record["status"] == "failed":
                logger.error("start-up index build failed: %s", record["error"])
    jobs.start_loops()
    return jobs


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model (in a thread: it reads files and data), open the store, serve the index."""
    settings: Settings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    torch.set_num_threads(settings.torch_threads)
    engine = await asyncio.to_thread(Engine.from_run_dir, settings.run_dir, device=settings.device,
                                     histories=settings.training_histories, inference=settings.inference)
    engine.on_stage = metrics.observe_stage
    store = open_store(settings)
    batcher = MicroBatcher(engine, wait_ms=settings.batch_wait_ms, max_size=settings.batch_max_size,
                           on_batch=metrics.observe_batch, threads=settings.torch_threads)
    batcher.start()
    app.state.engine, app.state.store, app.state.batcher = engine, store, batcher
    app.state.jobs = None
    try:
        app.state.jobs = await open_index(engine, store, settings, metrics)
        # What start-up allocated (the model, the run's histories, the index) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it mid-request.
        gc.freeze()
        yield
    finally:
        if app.state.jobs is not None:
            await app.state.jobs.stop()
        await batcher.stop()
        await store.close()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="ragrec", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_docs(app)  # /docs and /redoc with their assets served from here (air-gapped hosts)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    for module in (recommend, events, users, index, evaluate, jobs, health):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(recommend.FastRecommend)  # added first: innermost, next to the routes
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # added last: outermost
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory`: settings from RAGREC_* variables."""
    return create_app(Settings())  # type: ignore[call-arg]  # run_dir comes from the environment


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service under uvicorn. Other settings come from RAGREC_* variables. With workers > 1
    every worker loads its own model; use a Redis store (RAGREC_REDIS_URL) so they share histories."""
    import uvicorn

    os.environ["RAGREC_RUN_DIR"] = str(run_dir)  # the workers build their app from the environment
    access_log = Settings(run_dir=Path(run_dir)).access_log  # type: ignore[call-arg]
    uvicorn.run("app.main:app_from_env", factory=True, host=host, port=port, workers=workers, access_log=access_log)
