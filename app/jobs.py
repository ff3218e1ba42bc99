"""Background work of one replica: index rebuilds (on demand and scheduled), the version watcher
that makes every replica serve the current index, and evaluation jobs.

Heavy work (encoding, index training, evaluation) runs in worker threads, so the event loop keeps
answering requests. Only one rebuild runs at a time across replicas: the store's ``rebuild``
lock (a Redis key with expiry when shared), extended while the build runs. A rebuild publishes a
new artifact version under the shared index root and then sets the store's index version; the
watchers of the other replicas see it within ``index_poll_s`` and swap it in without a restart.
Job records (``GET /v1/jobs/{id}``) say what happened, including why a rebuild or swap failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from app.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from app.engine import Engine
    from app.index import IndexManager
    from app.middleware import ServiceMetrics
    from app.settings import Settings

logger = logging.getLogger(__name__)

LOCK = "rebuild"


class RebuildBusy(RuntimeError):
    """Another rebuild holds the lock (in this replica or another)."""


class RebuildFailed(RuntimeError):
    """The rebuild process failed; the message is its error (nothing was published)."""


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # reported to the parent, which records it in the job
        conn.send((False, f"{type(e).__name__}: {e}"))
    else:
        conn.send((True, result))
    finally:
        conn.close()


async def run_in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh spawned process, awaited without blocking the loop.
    The process is terminated if the caller is cancelled; RebuildFailed carries its error."""
    ctx = multiprocessing.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send_end, fn, args, kwargs), daemon=True, name="ragrec-rebuild")
    proc.start()
    send_end.close()
    try:
        while not recv_end.poll():
            await asyncio.sleep(0.05)
        try:
            ok, payload = recv_end.recv()
        except EOFError:
            await asyncio.to_thread(proc.join, 10)
            raise RebuildFailed(f"the rebuild process died (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.terminate()
        await asyncio.to_thread(proc.join, 10)
        recv_end.close()
    if not ok:
        raise RebuildFailed(payload)
    return payload


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


async def gather_histories(engine: Engine, store: Store) -> dict[str, np.ndarray]:
    """Every user's sequence as the model reads it: training-data history, then stored events.
    Unknown items are dropped; users with no known item are left out."""
    histories = dict(engine.histories)
    for user in await store.users():
        items = [item for item, _ in await store.history(user)]
        ids, _ = engine.sequence_ids(user, items)
        histories[user] = ids
    return {u: s for u, s in histories.items() if len(s)}


class Jobs:
    """Rebuild/evaluate jobs and the periodic loops of one replica."""

    def __init__(self, engine: Engine, manager: IndexManager, store: Store, settings: Settings,
                 metrics: ServiceMetrics) -> None:
        self.engine, self.manager, self.store = engine, manager, store
        self.settings, self.metrics = settings, metrics
        self._tasks: set[asyncio.Task] = set()
        self._versions = asyncio.Lock()  # serialises this replica's index version changes
        self._refused_version: str | None = None  # the store's version that failed to load here
        self._store_error: str | None = None  # the store did not answer the last look
        self._refusal: str | None = None  # why _refused_version was refused

    # ------------------------------------------------------------------ job records

    async def _record(self, job: dict[str, Any], **changes: Any) -> None:
        job.update(changes)
        try:
            await self.store.put_job(job["id"], job)
        except StoreUnavailable as e:  # the job still runs; its record catches up on the next write
            logger.warning("job %s: record not saved (%s)", job["id"], e)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start_job(self, kind: str, params: dict[str, Any], work: Callable[[dict], Awaitable[dict]]) -> dict:
        """Create a queued job record, run ``work(job)`` in the background, return the record."""
        job = {"id": uuid.uuid4().hex, "kind": kind, "status": "queued", "params": params, "created_at": _now(),
               "started_at": None, "finished_at": None, "result": None, "error": None}
        await self.store.put_job(job["id"], job)  # StoreUnavailable -> 503: no job without a record
        self._spawn(self._run(job, work), f"job-{kind}-{job['id'][:8]}")
        return job

    async def _run(self, job: dict, work: Callable[[dict], Awaitable[dict]]) -> None:
        await self._record(job, status="running", started_at=_now())
        try:
            result = await work(job)
        except asyncio.CancelledError:  # the service is stopping: say so instead of "running" forever
            with contextlib.suppress(Exception):
                await self._record(job, status="failed", finished_at=_now(), error="cancelled: the service stopped")
            raise
        except Exception as e:
            logger.exception("job %s (%s) failed", job["id"], job["kind"])
            await self._record(job, status="failed", finished_at=_now(), error=f"{type(e).__name__}: {e}")
        else:
            await self._record(job, status="succeeded", finished_at=_now(), result=result)

    # ------------------------------------------------------------------ rebuilds

    async def start_rebuild(self, trigger: str = "on-demand", *, in_process: bool = False) -> dict:
        """Take the rebuild lock, then start a rebuild job. RebuildBusy if another one holds it.
        in_process: build in this process's threads (start-up, before any request is served)
        instead of a child process (``settings.rebuild_subprocess``)."""
        owner = uuid.uuid4().hex
        if not await self.store.acquire_lock(LOCK, owner, self.settings.rebuild_lock_ttl_s):
            raise RebuildBusy("another index rebuild is running; retry when it has finished (GET /v1/jobs)")
        child = self.settings.rebuild_subprocess and not in_process
        try:
            return await self.start_job("rebuild", {"trigger": trigger, "subprocess": child},
                                        lambda job: self._rebuild(owner, child))
        except BaseException:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_lock(LOCK, owner)
            raise

    async def _rebuild(self, owner: str, child: bool) -> dict:
        """Encode every stored sequence with the served model, build, validate, publish, switch.
        child: the heavy part runs in a niced single-threaded process; this one then loads the
        published version (verifying it again) and swaps it in."""
        keeper = self._spawn(self._keep_lock(owner), "rebuild-lock")
        start = time.perf_counter()
        try:
            histories = await gather_histories(self.engine, self.store)
            if child:
                from app.index import build_and_publish

                s = self.settings
                report = await run_in_child(
                    build_and_publish, str(s.run_dir), str(s.index_root), histories,
                    model_version=self.engine.model_version, min_recall=s.index_min_recall,
                    keep_versions=s.index_keep_versions, threads=s.rebuild_threads, nice=s.rebuild_nice)
                async with self._versions:
                    await self.load_version(report["version"])
                    await self.store.set_index_version(report["version"])
            else:
                bank, names = await asyncio.to_thread(self.manager.build, histories)
                async with self._versions:
                    report = await asyncio.to_thread(self.manager.publish, bank, names)
                    await self.store.set_index_version(report["version"])
        except Exception:
            self.metrics.rebuild_failures.inc()
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_lock(LOCK, owner)
        seconds = time.perf_counter() - start
        self.metrics.rebuild_seconds.observe(seconds)
        if not child:  # load_version already counted the swap
            self.metrics.index_swapped(self.manager.serving)
        return {**report, "users": len(histories), "seconds": round(seconds, 3)}

    async def _keep_lock(self, owner: str) -> None:
        ttl = self.settings.rebuild_lock_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(StoreUnavailable):
                if not await self.store.extend_lock(LOCK, owner, ttl):
                    logger.warning("the rebuild lock expired while the rebuild ran")

    async def schedule_loop(self) -> None:
        """Rebuild every ``rebuild_interval``; a replica that finds the lock taken skips its turn."""
        while True:
            await asyncio.sleep(self.settings.rebuild_interval)
            try:
                job = await self.start_rebuild("scheduled")
            except (RebuildBusy, StoreUnavailable) as e:
                logger.info("scheduled rebuild skipped: %s", e)
                continue
            except Exception:  # the schedule must outlive any one failure
                logger.exception("scheduled rebuild could not start")
                continue
            while (record := await self._job_or_none(job["id"])) is not None and record["status"] in (
                    "queued", "running"):
                await asyncio.sleep(1.0)

    async def _job_or_none(self, job_id: str) -> dict | None:
        try:
            return await self.store.get_job(job_id)
        except StoreUnavailable:
            return None

    # ------------------------------------------------------------------ versions

    async def _swap(self, load: Callable[[], Any]) -> dict:
        try:
            serving = await asyncio.to_thread(load)
        except Exception:
            self.metrics.index_load_failures.inc()
            raise
        self.metrics.index_swapped(serving)
        return serving.info()

    async def load_version(self, version: str | None) -> dict:
        """Serve ``version`` here (default: the artifact root's current); raises RetrieverError on
        refusal, leaving the old index serving."""
        return await self._swap(lambda: self.manager.load(version))

    async def switch(self, version: str) -> dict:
        """Serve ``version`` and make it current for every replica."""
        async with self._versions:
            info = await self._swap(lambda: self.manager.switch(version))
            await self.store.set_index_version(version)
        return info

    async def rollback(self) -> dict:
        """Serve the previous version and make it current for every replica."""
        async with self._versions:
            info = await self._swap(self.manager.rollback)
            await self.store.set_index_version(info["version"])
        return info

    async def watch_loop(self) -> None:
        """Swap in the version the store names whenever it differs from the one served here."""
        while True:
            await asyncio.sleep(self.settings.index_poll_s)
            await self.check_version()

    @property
    def last_watch_error(self) -> str | None:
        """Why this replica may not be serving the store's current version (None: in step)."""
        return self._store_error or self._refusal

    async def check_version(self) -> None:
        """Swap in the store's version when it differs from the one served here. Holds the same
        lock as this replica's own version changes, which swap locally and then update the store:
        without it the watcher could read the old value in between and swap back to it."""
        async with self._versions:
            try:
                wanted = await self.store.get_index_version()
            except StoreUnavailable as e:
                self._store_error = f"store unavailable: {e}"
                return
            self._store_error = None
            serving = self.manager.serving
            if wanted is None or (serving is not None and serving.version == wanted):
                self._refusal = None
                return
            if wanted == self._refused_version:  # not retried until the store names another one
                return
            try:
                await self.load_version(wanted)
                self._refusal = self._refused_version = None
            except Exception as e:
                self._refused_version = wanted
                self._refusal = f"refused index {wanted}: {e}"
                logger.error("%s; still serving %s", self._refusal, self.engine.index_version)

    def start_loops(self) -> None:
        self._spawn(self.watch_loop(), "index-watch")
        if self.settings.rebuild_interval > 0:
            self._spawn(self.schedule_loop(), "index-schedule")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
