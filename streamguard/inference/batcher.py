"""One batcher for all streams: gathers face crops from many coroutines into one `Classifier.predict` call.

A batch leaves when `max_batch` crops wait or `max_wait_ms` after its oldest crop arrived, whichever is first, and
runs in a worker thread so the event loop never blocks (ONNX Runtime and TensorRT release the GIL). One worker by
default: one inference at a time already uses the intra-op threads, and the remaining cores stay free for decode
and face detection; while it runs, new crops queue up and form the next batch (dynamic batching for free).

Failure is per batch: an exception from `predict` reaches the callers whose crops were in that batch and nobody
else, and the batcher keeps serving. A malformed crop fails its own caller at once, before it can spoil a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from streamguard.inference.classifier import Classifier, InferenceUnavailable

log = logging.getLogger(__name__)

OnBatch = Callable[[int, float, str], None]  # (batch size, inference seconds, backend) — e.g. Prometheus hooks


class BatcherClosed(RuntimeError):
    """The batcher was closed before this crop was scored (or a crop was submitted after close)."""


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    crops: int = 0
    failed_batches: int = 0
    failed_crops: int = 0
    inference_seconds: float = 0.0  # time inside predict, measured in the worker thread
    batch_sizes: Counter[int] = field(default_factory=Counter)  # size → batches of that size (a histogram)


@dataclass(slots=True)
class _Request:
    crop: np.ndarray
    future: asyncio.Future[float]
    enqueued: float  # loop.time()


class Batcher:
    """`await batcher.score(crop)` from any coroutine; crops from all callers share `predict` calls.

    Use as `async with Batcher(classifier) as b:` or call `start()` / `close()`. `workers` bounds how many
    batches run at once (and sizes the executor the batcher creates when none is given; a given executor is
    not shut down by `close()`). Several workers need a classifier whose `predict` is thread-safe
    (an ONNX Runtime session is).
    """

    def __init__(
        self,
        classifier: Classifier,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 20.0,
        workers: int = 1,
        executor: Executor | None = None,
        on_batch: OnBatch | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.workers = workers
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._executor = executor
        self._owns_executor = executor is None
        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the collector on the running loop; idempotent, and `score` calls it if needed."""
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if self._collector is None:
            self._start_now()

    async def close(self) -> None:
        """Stop taking crops, let running batches finish, fail crops that never made it into a batch."""
        if self._closed:
            return
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(BatcherClosed("batcher closed before this crop was scored"))
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)  # idle now: every batch it ran has been awaited

    async def __aenter__(self) -> Batcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Crops waiting for a batch (not counting batches being inferred)."""
        return len(self._pending)

    # -- scoring ----------------------------------------------------------------------------------------------

    async def score(self, crop: np.ndarray) -> float:
        """P(fake) of one (S, S, 3) uint8 RGB crop at the classifier's input size."""
        return await self._enqueue(crop)

    async def score_many(self, crops: np.ndarray) -> np.ndarray:
        """P(fake) (N,) float32 of (N, S, S, 3) crops; they may be spread over batches with other callers' crops."""
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        futures = [self._enqueue(c) for c in crops]
        results = await asyncio.gather(*futures, return_exceptions=True)  # retrieve every outcome: no stray warnings
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return np.asarray(results, np.float32)

    def _enqueue(self, crop: np.ndarray) -> asyncio.Future[float]:
        if self._closed:
            raise BatcherClosed("batcher is closed")
        size = self.classifier.input_size
        if not isinstance(crop, np.ndarray) or crop.shape != (size, size, 3) or crop.dtype != np.uint8:
            # Checked here so one bad crop fails its caller only, not the np.stack of a whole batch.
            got = f"{crop.shape} {crop.dtype}" if isinstance(crop, np.ndarray) else type(crop).__name__
            raise ValueError(f"crop must be ({size}, {size}, 3) uint8, got {got}")
        if self._collector is None:
            self._start_now()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        self._pending.append(_Request(crop, future, loop.time()))
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def _start_now(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="streamguard-infer")
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._collector = asyncio.create_task(self._collect(), name="streamguard-batcher")
        self._collector.add_done_callback(self._collector_done)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        # Only close() cancels the collector; if it ever dies of a bug, nobody may be left waiting forever.
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        log.error("batcher collector failed", exc_info=err)
        self._closed = True
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(BatcherClosed(f"batcher failed: {err!r}"))

    # -- the collector ----------------------------------------------------------------------------------------

    async def _collect(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            # A free worker first: while all are busy, crops keep arriving and the next batch grows.
            await self._slots.acquire()
            try:
                batch = await self._next_batch(loop)
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Request]:
        assert self._wakeup is not None
        while True:
            self._drop_cancelled()
            if self._pending:
                deadline = self._pending[0].enqueued + self.max_wait_s
                if len(self._pending) >= self.max_batch or loop.time() >= deadline:
                    break
                timeout: float | None = deadline - loop.time()
            else:
                timeout = None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass
        n = min(self.max_batch, len(self._pending))
        return [self._pending.popleft() for _ in range(n)]

    def _drop_cancelled(self) -> None:
        # A caller that gave up (cancelled, timed out) does not cost inference time.
        if any(r.future.done() for r in self._pending):
            self._pending = deque(r for r in self._pending if not r.future.done())

    async def _run(self, batch: list[_Request]) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        try:
            scores, seconds = await loop.run_in_executor(self._executor, self._predict, [r.crop for r in batch])
        except Exception as e:  # the batch's callers get the error; the batcher keeps going
            self.stats.failed_batches += 1
            self.stats.failed_crops += len(batch)
            # An outage without fallback fails every batch until it ends; the backend logs the outage once.
            level = logging.DEBUG if isinstance(e, InferenceUnavailable) else logging.WARNING
            log.log(level, "inference failed for a batch of %d crops: %r", len(batch), e)
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        finally:
            self._slots.release()
        self.stats.batches += 1
        self.stats.crops += len(batch)
        self.stats.inference_seconds += seconds
        self.stats.batch_sizes[len(batch)] += 1
        for r, p in zip(batch, scores, strict=True):
            if not r.future.done():
                r.future.set_result(float(p))
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), seconds, self.classifier.backend)
            except Exception:  # a metrics hook must never break scoring
                log.exception("on_batch callback failed")

    def _predict(self, crops: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Runs in the worker thread: stacking a batch (MBs of pixels) is kept off the loop too."""
        x = np.stack(crops)
        t0 = time.perf_counter()
        scores = np.asarray(self.classifier.predict(x))
        seconds = time.perf_counter() - t0
        if scores.shape != (len(crops),):
            name = type(self.classifier).__name__
            raise ValueError(f"{name}.predict returned shape {scores.shape} for {len(crops)} crops")
        return scores, seconds
