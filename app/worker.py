"""`ragrec worker`: index rebuilds off the request path, for deployments with several replicas.

It loads the same run as the API replicas, opens the same store (Redis) and index root, builds the
first index if there is none, and then rebuilds every ``RAGREC_REBUILD_INTERVAL`` seconds under
the shared rebuild lock; the replicas' version watchers swap each new version in. Stops cleanly
on SIGTERM/SIGINT (a rebuild in flight is abandoned; its lock expires, nothing half-written is
ever made current).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from app.engine import Engine
from app.main import open_index, open_store
from app.middleware import ServiceMetrics
from app.settings import Settings

logger = logging.getLogger(__name__)


async def run_worker(settings: Settings) -> None:
    from training.checkpoints import RunError

    if settings.rebuild_interval <= 0:
        raise RunError("the worker rebuilds on a schedule: set RAGREC_REBUILD_INTERVAL (seconds) or --interval")
    engine = await asyncio.to_thread(Engine.from_run_dir, settings.run_dir, device=settings.device,
                                     histories=settings.training_histories, inference="torch")  # answers nothing
    if engine.ra is None:
        raise RunError(f"{settings.run_dir} has no retrieval.pt: only retrieval runs have an index to rebuild")
    store = open_store(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    jobs = await open_index(engine, store, settings, ServiceMetrics())
    assert jobs is not None
    logger.info("worker: serving index %s, rebuilding every %.0f s into %s", engine.index_version,
                settings.rebuild_interval, settings.index_root)
    try:
        await stop.wait()
    finally:
        await jobs.stop()
        await store.close()
