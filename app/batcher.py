"""The micro-batcher: concurrent single requests gathered into one `Engine.recommend_batch` call
(for at most `wait_ms` or `max_size` requests), run on one dedicated inference thread so the event
loop keeps serving while the model computes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from retriever.index import set_search_threads

if TYPE_CHECKING:
    from app.engine import Engine, Query, Recommendation


IDLE_TURNS = 3  # event-loop turns a batch waits for requests the loop already has in hand


class MicroBatcher:
    """Collects concurrent `recommend` calls into one `Engine.recommend_batch` run on its inference thread.

    A batch closes `wait_ms` after its first request arrived (and no sooner than a few event-loop
    turns that brought no request) or when it holds `max_size` requests; with `wait_ms=0` (the
    service's default) it is whatever queued up while the previous batch ran, plus what the loop
    had in hand.
    Batches run one at a time, so a burst queues behind the running batch and is then served by one pass.
    """

    def __init__(self, engine: Engine, *, wait_ms: float = 0.0, max_size: int = 64,
                 on_batch: Callable[[int, float], None] | None = None, threads: int = 1) -> None:
        if max_size < 1 or wait_ms < 0:
            raise ValueError(f"need max_size >= 1 and wait_ms >= 0, got {max_size}, {wait_ms}")
        self.engine = engine
        self.on_batch = on_batch  # called with (requests in the batch, seconds of inference), e.g. for metrics
        # Every forward pass runs on this one thread (batches run one at a time anyway): ONNX Runtime
        # keeps per-thread state, and a pool's changing threads cost it more CPU per call. OpenMP's
        # thread count is per thread: faiss's is set on this one, or its searches would use every
        # core and leave the extra threads spin-waiting (2x the service's CPU per request on 2 cores).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragrec-inference",
                                            initializer=set_search_threads, initargs=(threads,))
        self.wait_s = wait_ms / 1000
        self.max_size = max_size
        self._queue: asyncio.Queue[tuple[Query, asyncio.Future[Recommendation]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0  # for tests and metrics: how many forward passes served requests

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=False)

    async def run(self, queries: list[Query]) -> list[Recommendation]:
        """``Engine.recommend_batch`` for a batch the caller formed (POST /v1/recommend/batch), on
        the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.recommend_batch, queries)

    async def recommend(self, query: Query) -> Recommendation:
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        await self._queue.put((query, fut))
        return await fut

    async def _collect(self) -> list[tuple[Query, asyncio.Future[Recommendation]]]:
        pending = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        idle = 0  # loop turns in a row that brought no request
        while len(pending) < self.max_size:
            try:  # take what already queued up, then wait out the rest of the window
                pending.append(self._queue.get_nowait())
                idle = 0
                continue
            except asyncio.QueueEmpty:
                pass
            if idle < IDLE_TURNS:
                # Let the loop finish what it has in hand (the last batch's answers going out, requests
                # read but not yet queued) before the batch closes: a few turns, microseconds, no timer.
                # Under load this doubles the batches (7.8 -> 14.8 requests at concurrency 16, pinned);
                # a request alone waits three idle turns.
                idle += 1
                await asyncio.sleep(0)
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                pending.append(await asyncio.wait_for(self._queue.get(), left))
                idle = 0
            except TimeoutError:
                break
        return [(q, f) for q, f in pending if not f.cancelled()]  # callers that gave up

    async def _run(self) -> None:
        while True:
            pending = await self._collect()
            if not pending:
                continue
            start = time.perf_counter()
            try:
                results = await self.run([q for q, _ in pending])
            except Exception as e:  # handed to every waiting caller
                for _, fut in pending:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches_run += 1
            if self.on_batch is not None:
                self.on_batch(len(pending), time.perf_counter() - start)
            for (_, fut), res in zip(pending, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
