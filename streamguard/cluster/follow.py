"""Following a JetStream stream in sequence order: the event log, and the KV buckets whose state an instance keeps.

nats-py's ordered consumer does the reading: an ephemeral push consumer that restarts itself from the last sequence
it delivered after a gap or two missed heartbeats. Two things it does not do are done here: a restart that failed
(NATS was still down) is not tried again by it, and a consumer that vanished with a restarted server can go unnoticed;
a watchdog checks the consumer every few seconds and, when it is gone or has stopped while messages wait, starts a
new one after the last sequence handled. Messages reach `handle` in batches, which is awaited before the next batch:
a slow handler holds the follower back (nats-py's flow control then holds the server back) instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)

WATCHDOG_S = 3.0
IDLE_HEARTBEAT_S = 1.0
MAX_BATCH = 500
QUEUE_SIZE = 5000

Handler = Callable[[list[Msg]], Awaitable[None]]


class Follower:
    """Reads `subject` of `stream` from `start_seq` (or, with `last_per_subject`, each subject's last message: a KV
    bucket's current state) on, handing each batch to `handle`. `ready` is set once it has caught up with what the
    stream held when it started; `last_seq` is the stream sequence of the last message handled."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, handle: Handler, *, start_seq: int = 1,
                 last_per_subject: bool = False, name: str = "") -> None:
        self._js = js
        self.stream = stream
        self.subject = subject
        self._handle = handle
        self.last_seq = start_seq - 1
        self._last_per_subject = last_per_subject
        self.name = name or stream
        self.ready = asyncio.Event()
        self.restarts = 0
        self._ready_at: int | None = None  # caught up once last_seq reaches it
        self._queue: asyncio.Queue[Msg] = asyncio.Queue(QUEUE_SIZE)
        self._sub: JetStreamContext.PushSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Subscribe (raises if NATS refuses), then read and watch in tasks of their own."""
        await self._subscribe()
        self._tasks = [asyncio.create_task(self._run(), name=f"follow:{self.name}"),
                       asyncio.create_task(self._watch(), name=f"follow-watch:{self.name}")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._unsubscribe()

    async def _subscribe(self) -> None:
        if self._last_per_subject and self.last_seq == 0:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                        opt_start_seq=self.last_seq + 1)
        self._sub = await self._js.subscribe(self.subject, stream=self.stream, cb=self._queue.put, config=config,
                                             ordered_consumer=True, idle_heartbeat=IDLE_HEARTBEAT_S)
        if not self.ready.is_set():
            # num_pending counts what the server has not sent yet: 0 with messages still in our queue. Caught up
            # means handled up to the last one it sent by then.
            info = await self._sub.consumer_info()
            if not info.num_pending:
                self._ready_at = info.delivered.stream_seq if info.delivered else 0
                self._check_ready()

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # gone with the connection, or already
                await self._sub.unsubscribe()
            self._sub = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            fresh = [m for m in batch if m.metadata.sequence.stream > self.last_seq]  # a restart may repeat one
            if fresh:
                await self._handle_until_done(fresh)
                self.last_seq = fresh[-1].metadata.sequence.stream
            if batch[-1].metadata.num_pending == 0:
                self.ready.set()
            self._check_ready()

    def _check_ready(self) -> None:
        if self._ready_at is not None and self.last_seq >= self._ready_at:
            self.ready.set()

    async def _handle_until_done(self, batch: list[Msg]) -> None:
        """A failing handler (a full disk) is retried, not skipped: the stream's order is the point."""
        delay = 0.1
        while True:
            try:
                await self._handle(batch)
                return
            except Exception:
                log.exception("cluster: %s: handling messages failed; retrying in %.1f s", self.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _watch(self) -> None:
        seen = self.last_seq
        while True:
            await asyncio.sleep(WATCHDOG_S)
            stalled = False
            try:
                assert self._sub is not None
                info = await self._sub.consumer_info()
                stalled = (info.num_pending or 0) > 0 and self.last_seq == seen and self._queue.empty()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the consumer is gone (or NATS is): start a new one
                stalled = True
                log.debug("cluster: %s: consumer check failed: %s", self.name, type(exc).__name__)
            seen = self.last_seq
            if stalled:
                await self._restart()

    async def _restart(self) -> None:
        await self._unsubscribe()
        while not self._queue.empty():  # what the old consumer had delivered is read again from last_seq + 1
            self._queue.get_nowait()
        try:
            await self._subscribe()
            self.restarts += 1
            log.info("cluster: %s: following again from seq %d", self.name, self.last_seq + 1)
        except Exception as exc:  # noqa: BLE001 - NATS still down: the next check tries again
            log.debug("cluster: %s: restart failed: %s", self.name, type(exc).__name__)
