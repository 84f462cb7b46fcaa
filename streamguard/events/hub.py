"""Fan-out of events to live subscribers, with replay from the store so a reconnecting client misses nothing.

Order: `publish` puts the event on one writer thread's queue (synchronously, so seq order is call order on the
loop). The writer commits whatever is queued in one transaction (group commit: one fsync per batch under
synchronous=FULL) and then schedules delivery on the loop with `call_soon_threadsafe`, whose callbacks run in FIFO
order, so subscribers see events in seq order by construction. An event is therefore always in the store before
any subscriber has it.

Subscriptions: registered for live events at `subscribe()` time, before any replay read. Replay then pages
through the store (seq > since); a live event that arrives meanwhile is buffered, and every live event with
seq <= the last replayed one is skipped, during replay and after it (a replay read can see a commit before its
delivery reaches the loop). Every event is either committed before a replay read (so that read sees it) or
delivered after registration (so the buffer has it): no gap, and the seq check means no duplicate.

Backpressure: each subscriber has a bounded buffer and delivery never waits. Live, a full buffer drops the
subscriber (`SlowConsumer`): its buffer is freed and its next `get()` raises, and it resumes with `since`. During
replay a full buffer is only cleared: the store holds every event, so replay reads on until it has caught up.

A WebSocket handler is a short loop (the API layer owns pings and the socket):

    sub = hub.subscribe(since, stream_id=..., participant_id=..., types=...)
    try:
        while True:
            event = await sub.get(timeout=PING_INTERVAL_S)
            if event is None:                      # idle: ping to keep the connection alive
                await ws.send_json({"type": "ping", "ts": time.time()})
            else:
                await ws.send_text(event.model_dump_json())
    except SubscriptionEnded as end:               # SlowConsumer 4008, CursorAhead 4409, HubClosed 1001
        await ws.close(code=end.close_code, reason=end.reason)
    finally:
        sub.close()

Close codes: a slow consumer is closed with 4008, in the 4000-4999 range RFC 6455 leaves to applications. 1008
(policy violation) is generic: a client could not tell "you fell behind, reconnect now with since=<last seq>"
from a rejection it must not retry (bad auth, bad filter); 1013 (try again later) means the *server* is
overloaded. 4008 echoes 1008 for people reading logs. The close reason carries the resume hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .schema import Event, EventType, validate_draft
from .store import EventDraft, EventStore

CLOSE_SLOW_CONSUMER = 4008
CLOSE_CURSOR_AHEAD = 4409
CLOSE_GOING_AWAY = 1001  # standard: the server is shutting down


class SubscriptionEnded(Exception):
    """The subscription is over; `close_code` and `reason` are what to close the WebSocket with."""

    close_code = CLOSE_GOING_AWAY

    def __init__(self, reason: str, last_seq: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.last_seq = last_seq  # resume with since=last_seq (None: the client's seq is unusable, see CursorAhead)


class SlowConsumer(SubscriptionEnded):
    close_code = CLOSE_SLOW_CONSUMER


class CursorAhead(SubscriptionEnded):
    """`since` is beyond the store's last seq: the client's seq came from another (or a reset) store."""

    close_code = CLOSE_CURSOR_AHEAD


class HubClosed(SubscriptionEnded):
    close_code = CLOSE_GOING_AWAY


@dataclass(frozen=True, slots=True)
class EventFilter:
    """All given fields must match; None matches anything."""

    stream_id: str | None = None
    participant_id: str | None = None
    types: frozenset[EventType] | None = None

    def matches(self, event: Event) -> bool:
        return (
            (self.stream_id is None or event.stream_id == self.stream_id)
            and (self.participant_id is None or event.participant_id == self.participant_id)
            and (self.types is None or event.type in self.types)
        )


@dataclass(slots=True)
class _Request:
    draft: EventDraft
    future: asyncio.Future[Event]


class Subscription:
    """One client's view of the feed: replay of seq > since, then live events. Made by `EventHub.subscribe`."""

    def __init__(
        self, hub: EventHub, since: int | None, filter: EventFilter, queue_size: int, replay_page: int
    ) -> None:
        self._hub = hub
        self.filter = filter
        self.since = since
        self._maxsize = queue_size
        self._page = replay_page
        self._buffer: deque[Event] = deque()  # live events, in seq order
        self._replayed: deque[Event] = deque()  # the current replay page, not yet handed out
        self._replaying = since is not None
        self._fetched = since if since is not None else 0  # highest seq read from the store
        self._overflows = 0  # buffer clears during replay; replay must re-read after the last one
        self._checked_cursor = False
        self._wake = asyncio.Event()
        self._ended: SubscriptionEnded | None = None
        # The resume point: the last seq handed out; before the first one, `since`, or for a live-only
        # subscription the last seq delivered before it subscribed (so resuming neither misses nor re-sends).
        self.last_seq: int = since if since is not None else hub._last_delivered
        self.delivered = 0

    @property
    def ended(self) -> SubscriptionEnded | None:
        return self._ended

    @property
    def replaying(self) -> bool:
        return self._replaying

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None if none came within `timeout` seconds. Raises SubscriptionEnded when over."""
        while True:
            if self._ended is not None:
                raise self._ended
            if self._replayed:
                return self._hand_out(self._replayed.popleft())
            if self._replaying:
                await self._replay_step()  # store reads take milliseconds: not counted against `timeout`
                continue
            if self._buffer:
                return self._hand_out(self._buffer.popleft())
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        """Iteration ends quietly when the hub closes; SlowConsumer and CursorAhead propagate."""
        try:
            event = await self.get()
        except HubClosed:
            raise StopAsyncIteration from None
        assert event is not None  # get() without timeout only returns events
        return event

    def close(self) -> None:
        """Stop receiving; idempotent. Call it when the client goes away."""
        if self._ended is None:
            self._end(HubClosed("subscription closed", self.last_seq))

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------

    def _hand_out(self, event: Event) -> Event:
        self.last_seq = event.seq
        self.delivered += 1
        return event

    async def _replay_step(self) -> None:
        store = self._hub.store
        if not self._checked_cursor:
            self._checked_cursor = True
            last = await asyncio.to_thread(store.last_seq)
            if self._fetched > last:
                self._end(
                    CursorAhead(f"since={self._fetched} is beyond the last event ({last}); resync with since=0", None)
                )
                return
        epoch = self._overflows
        f = self.filter
        page = await asyncio.to_thread(
            store.since,
            self._fetched,
            stream_id=f.stream_id,
            participant_id=f.participant_id,
            types=f.types,
            limit=self._page,
        )
        if self._ended is not None:
            return
        self._replayed.extend(page)
        if page:
            self._fetched = page[-1].seq
        # Caught up only if this read saw the end of the log *and* started after the last buffer clear: an event
        # cleared from the buffer was committed before the clear, hence visible to a read that started later.
        if len(page) < self._page and epoch == self._overflows:
            self._replaying = False
            while self._buffer and self._buffer[0].seq <= self._fetched:
                self._buffer.popleft()

    def _offer(self, event: Event) -> None:
        """Called by the hub on the loop for every published event; never waits."""
        if self._ended is not None or not self.filter.matches(event):
            return
        if event.seq <= self._fetched:
            # Replay already read it. This also happens *after* replay ended: the writer thread commits, a replay
            # read sees the commit, and the read's result can reach the loop before the event's own delivery does.
            return
        if len(self._buffer) >= self._maxsize:
            if self._replaying:
                self._buffer.clear()
                self._overflows += 1
                return
            self._hub.dropped_subscribers += 1
            self._end(
                SlowConsumer(
                    f"slow consumer: more than {self._maxsize} events behind; resume with since={self.last_seq}",
                    self.last_seq,
                )
            )
            return
        self._buffer.append(event)
        self._wake.set()

    def _end(self, reason: SubscriptionEnded) -> None:
        self._ended = reason
        self._buffer.clear()
        self._replayed.clear()
        self._hub._subscribers.discard(self)
        self._wake.set()


class EventHub:
    """Durable publish + fan-out. Create it with the store; call `close()` before closing the store.

    One hub serves one event loop (the first that publishes or subscribes): subscribers are fed on it.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        client_queue_size: int = 256,
        replay_page_size: int = 500,
        max_batch: int = 512,
    ) -> None:
        if client_queue_size < 1 or replay_page_size < 1 or max_batch < 1:
            raise ValueError("client_queue_size, replay_page_size and max_batch must be >= 1")
        self.store = store
        self.client_queue_size = client_queue_size
        self.replay_page_size = replay_page_size
        self.max_batch = max_batch
        self.dropped_subscribers = 0
        self._subscribers: set[Subscription] = set()
        self._last_delivered = store.last_seq()  # highest seq fanned out; where a live-only subscriber starts
        self._pending: set[asyncio.Future[Event]] = set()
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One writer thread: seqs are assigned in queue order, and the SQLite write + fsync never runs on the loop.
        self._writer = threading.Thread(target=self._write_loop, name="streamguard-events-writer", daemon=True)
        self._writer.start()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish_nowait(
        self,
        type: EventType | str,
        stream_id: str | None,
        participant_id: str | None,
        data: Mapping[str, Any] | BaseModel,
        *,
        ts: float | None = None,
    ) -> asyncio.Future[Event]:
        """Queue an event; the future resolves once it is committed and handed to subscribers.

        Validation happens here, so a malformed event raises in the caller (pydantic.ValidationError) instead of
        failing later. Events queued by successive calls get increasing seqs. Once queued, an event is written even
        if the caller stops waiting.
        """
        loop = self._check_loop()
        # Stamped here, in call order, so ts does not go backwards along seq (unless a caller passes its own).
        ts = time.time() if ts is None else ts
        validate_draft(type, stream_id, participant_id, data, ts)
        future: asyncio.Future[Event] = loop.create_future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        self._requests.put(_Request(EventDraft(type, stream_id, participant_id, data, ts), future))
        return future

    async def publish(
        self,
        type: EventType | str,
        stream_id: str | None,
        participant_id: str | None,
        data: Mapping[str, Any] | BaseModel,
        *,
        ts: float | None = None,
    ) -> Event:
        """Write the event durably, hand it to every matching subscriber, return it with its seq.

        Waits for the commit (a few ms with fsync), never for subscribers. Cancelling the wait does not un-publish.
        """
        return await self.publish_nowait(type, stream_id, participant_id, data, ts=ts)

    def subscribe(
        self,
        since: int | None = None,
        *,
        stream_id: str | None = None,
        participant_id: str | None = None,
        types: Iterable[EventType | str] | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Events with seq > `since` from the store, then live ones; `since=None`: live only.

        Registered for live events now (before any replay read): that is what makes replay + live gap-free.
        """
        self._check_loop()
        if since is not None and since < 0:
            raise ValueError("since must be >= 0")
        flt = EventFilter(
            stream_id=stream_id,
            participant_id=participant_id,
            types=frozenset(EventType(t) for t in types) if types is not None else None,
        )
        sub = Subscription(self, since, flt, queue_size or self.client_queue_size, self.replay_page_size)
        self._subscribers.add(sub)
        return sub

    async def close(self) -> None:
        """Flush: every queued event is written and delivered; then end all subscriptions (HubClosed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        await asyncio.to_thread(self._writer.join)
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        for sub in list(self._subscribers):
            sub._end(HubClosed(f"server shutting down; resume with since={sub.last_seq}", sub.last_seq))

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError("EventHub is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("EventHub is bound to another event loop")
        return loop

    # -- writer thread and delivery ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = self._requests.get()
            batch: list[_Request] = []
            if first is None:
                stop = True
            else:
                batch.append(first)
            # Group commit: take whatever else is queued, in order, up to max_batch.
            while not stop and len(batch) < self.max_batch:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if not batch:
                continue
            results: list[Event | BaseException]
            try:
                results = list(self.store.append_many([r.draft for r in batch]))
            except BaseException as exc:  # e.g. disk full: every event of the batch fails, none was written
                results = [exc] * len(batch)
            assert self._loop is not None  # set by the publish that queued the batch
            with contextlib.suppress(RuntimeError):  # loop already closed: written, nobody left to tell
                self._loop.call_soon_threadsafe(self._deliver, list(zip(batch, results, strict=True)))

    def _deliver(self, items: list[tuple[_Request, Event | BaseException]]) -> None:
        """On the loop, in commit order: fan out first, then resolve the publishers' futures."""
        for _, res in items:
            if isinstance(res, Event):
                self._last_delivered = res.seq
                for sub in list(self._subscribers):
                    sub._offer(res)
        for req, res in items:
            if req.future.done():
                continue
            if isinstance(res, Event):
                req.future.set_result(res)
            else:
                req.future.set_exception(res)
