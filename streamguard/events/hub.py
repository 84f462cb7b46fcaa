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

Backpressure: each subscriber has a bounded live buffer and delivery never waits. Since the store holds every
event, a full buffer loses nothing; it only changes where the subscriber reads from: the buffer is freed and the
subscriber *catches up* from the store with the same paged replay it uses at subscribe time (same gap-free,
duplicate-free hand-over back to live). This matters even for a client that reads at once: one group commit can
hand it more events in one go than its buffer holds.

Falling behind is allowed for a while, not for ever; the rule is Redis's for pub/sub clients ("over the soft limit
for N seconds": disconnect), with the store in place of the output buffer. When a subscriber overflows, it must
hand out, within `slow_consumer_grace_s`, every matching event published up to that moment; when it has, the check
repeats against the newest event published by then. A subscriber that keeps meeting these deadlines consumes
faster than the feed grows and is soon live again (which stops the clock); one that misses a deadline is ended
with `SlowConsumer` at the next event it is offered: its buffer is freed, its next `get()` raises, and it resumes
with `since`. No bound on the lag itself is needed: however far behind, a subscriber holds at most one buffer and
one replay page. Replaying history a client asked for (`since`) is not lag: the clock only runs once it has
replayed the events that existed when it subscribed. `slow_consumer_grace_s=0` ends a subscriber at its first
overflow while live, without catching up.

Retention: the writer thread also prunes the store (`retention_days`, `max_events`; see `EventStore.prune`), at
start and every `prune_interval_s`, one short transaction at a time between commit batches, so the loop never
waits on SQLite and publishes wait at most one chunk. A replay that asks for events retention has deleted (a
`since` older than the oldest kept event, or a subscriber catching up past it) first gets one `feed.gap` event:
`data.from_seq`..`data.to_seq` are gone, and its seq is `to_seq`, so resuming after it does not report the same
gap again. It is sent whatever the filters (the deleted events may or may not have matched them); the client
should rebuild its state from the HTTP API, as after any first connect.

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
import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .schema import Event, EventDraft, EventType, FeedGapData, validate_draft
from .store import EventStore

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER = 4008
CLOSE_CURSOR_AHEAD = 4409
CLOSE_GOING_AWAY = 1001  # standard: the server is shutting down
DAY_S = 86400.0
PRUNE_CHUNK = 2000  # events deleted per transaction: milliseconds, so a publish waits at most that long
# How long close() lets subscribers hand out their last events: a WebSocket sends a few hundred in milliseconds;
# a client that has stopped reading must not hold the shutdown for long (it resumes with since=).
DRAIN_TIMEOUT_S = 3.0


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


@dataclass(slots=True)
class _Sequenced:
    """Events whose seq was assigned elsewhere (see `EventHub.append_sequenced`); the future gets those written."""

    events: list[Event]
    future: asyncio.Future[list[Event]]


@dataclass(slots=True)
class _Truncate:
    """Drop the events after `seq` (see `EventHub.truncate_after`)."""

    seq: int
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Prune:
    """Apply retention now; the future gets the number of events the pass deleted."""

    future: asyncio.Future[int]


class _Stop:
    """Queued by close(): the writer finishes what was queued before it, then exits."""


@dataclass(slots=True)
class _Pruning:
    """The writer thread's retention state (only that thread touches it)."""

    due: float | None  # time.monotonic() of the next chunk; None: no retention
    deleted: int = 0  # by the current pass
    waiters: list[asyncio.Future[int]] = field(default_factory=list)  # prune() calls, answered when the pass ends

    def wait_s(self) -> float | None:
        return None if self.due is None else max(0.0, self.due - time.monotonic())


class Subscription:
    """One client's view of the feed: replay of seq > since, then live events. Made by `EventHub.subscribe`."""

    def __init__(
        self, hub: EventHub, since: int | None, filter: EventFilter, queue_size: int, replay_page: int, grace_s: float
    ) -> None:
        self._hub = hub
        self.filter = filter
        self.since = since
        self._maxsize = queue_size
        self._page = replay_page
        self._grace = grace_s
        self._buffer: deque[Event] = deque()  # live events, in seq order
        self._replayed: deque[Event] = deque()  # the current replay page, not yet handed out
        self._replaying = since is not None
        self._fetched = since if since is not None else 0  # highest seq read from the store
        self._overflows = 0  # buffer clears; a replay must re-read after the last one to have caught up
        self._checked_cursor = since is None  # only a client's own `since` can be ahead of the store
        self._wake = asyncio.Event()
        self._ended: SubscriptionEnded | None = None
        self._closing = False  # the hub is closing: end once everything offered so far is handed out
        # The resume point: the last seq handed out; before the first one, `since`, or for a live-only
        # subscription the last seq delivered before it subscribed (so resuming neither misses nor re-sends).
        self.last_seq: int = since if since is not None else hub._last_delivered
        self.delivered = 0
        # Lag (module docstring): events after _live_from were published after it subscribed; history before.
        self._live_from = hub._last_delivered
        self._newest = 0  # seq of the newest matching event offered
        self._target: int | None = None  # while behind: the event it must hand out by _deadline
        self._deadline: float | None = None  # time.monotonic(); None unless behind and past its history

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
            if self._closing:  # all handed out: now the hub's close reaches this subscriber
                self._end(HubClosed(f"server shutting down; resume with since={self.last_seq}", self.last_seq))
                continue
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
        if self._target is not None and event.seq >= self._live_from:
            self._progress(self._target)
        return event

    def _progress(self, target: int) -> None:
        """Behind and past its history: start the clock, or, target reached, aim at the newest event and restart it."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._grace
        elif self.last_seq >= target:
            if self._newest > self.last_seq:
                self._target, self._deadline = self._newest, now + self._grace
            else:
                self._target = self._deadline = None

    async def _replay_step(self) -> None:
        store = self._hub.store
        if not self._checked_cursor:
            self._checked_cursor = True
            last = await self._hub.cursor_limit()
            if self._fetched > last:
                self._end(
                    CursorAhead(f"since={self._fetched} is beyond the last event ({last}); resync with since=0", None)
                )
                return
        epoch = self._overflows
        f = self.filter
        page = await asyncio.to_thread(
            store.page,
            self._fetched,
            stream_id=f.stream_id,
            participant_id=f.participant_id,
            types=f.types,
            limit=self._page,
        )
        if self._ended is not None:
            return
        if page.pruned_through > self._fetched:  # retention deleted events this subscriber has not read
            self._replayed.append(self._gap(page.pruned_through))
            self._fetched = page.pruned_through
        self._replayed.extend(page.events)
        if page.events:
            self._fetched = page.events[-1].seq
        # Caught up only if this read saw the end of the log *and* started after the last buffer clear: an event
        # cleared from the buffer was committed before the clear, hence visible to a read that started later.
        if len(page.events) < self._page and epoch == self._overflows:
            self._replaying = False
            self._target = self._deadline = None  # live again: not behind
            while self._buffer and self._buffer[0].seq <= self._fetched:
                self._buffer.popleft()

    def _gap(self, through: int) -> Event:
        data = FeedGapData(from_seq=self._fetched + 1, to_seq=through, reason="retention")
        return Event(seq=through, ts=time.time(), type=EventType.FEED_GAP, data=data.model_dump(mode="json"))

    def _offer(self, event: Event) -> None:
        """Called by the hub on the loop for every published event; never waits."""
        if self._ended is not None or not self.filter.matches(event):
            return
        self._newest = event.seq
        if event.seq <= self._fetched:
            # Replay already read it. This also happens *after* replay ended: the writer thread commits, a replay
            # read sees the commit, and the read's result can reach the loop before the event's own delivery does.
            return
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._too_slow()
        elif len(self._buffer) >= self._maxsize:
            self._overflow(event.seq)
        else:
            self._buffer.append(event)
            self._wake.set()

    def _overflow(self, seq: int) -> None:
        """The buffer is full: free it and read from the store instead; the replay re-reads what it held."""
        if not self._replaying:
            if self._grace <= 0:
                self._too_slow()
                return
            self._replaying = True
            self._fetched = max(self._fetched, self.last_seq)  # after what it handed out or holds from a replay
            self._hub.catch_ups += 1
        self._buffer.clear()
        self._overflows += 1
        if self._target is None:  # fell behind now: `seq` is the newest event it has to reach in time
            self._target = seq
            if self.last_seq >= self._live_from:
                self._deadline = time.monotonic() + self._grace

    def _too_slow(self) -> None:
        self._hub.dropped_subscribers += 1
        why = f"behind for over {self._grace:g} s" if self._grace > 0 else f"over {self._maxsize} events behind"
        self._end(SlowConsumer(f"slow consumer: {why}; resume with since={self.last_seq}", self.last_seq))

    def _close_when_drained(self) -> None:
        """The hub is closing: hand out what is buffered (and what a catch-up still reads), then end with HubClosed;
        with nothing left to hand out, end now."""
        if not (self._buffer or self._replayed or self._replaying):
            self._end(HubClosed(f"server shutting down; resume with since={self.last_seq}", self.last_seq))
            return
        self._closing = True
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
    Retention (`retention_days`, `max_events`; 0: no limit) is applied by the writer thread, see the module docstring.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        client_queue_size: int = 256,
        replay_page_size: int = 500,
        max_batch: int = 512,
        slow_consumer_grace_s: float = 10.0,
        retention_days: float = 0.0,
        max_events: int = 0,
        prune_interval_s: float = 60.0,
    ) -> None:
        if client_queue_size < 1 or replay_page_size < 1 or max_batch < 1:
            raise ValueError("client_queue_size, replay_page_size and max_batch must be >= 1")
        if slow_consumer_grace_s < 0 or retention_days < 0 or max_events < 0 or prune_interval_s <= 0:
            raise ValueError("slow_consumer_grace_s, retention_days, max_events must be >= 0, prune_interval_s > 0")
        self.store = store
        self.client_queue_size = client_queue_size
        self.replay_page_size = replay_page_size
        self.max_batch = max_batch
        self.slow_consumer_grace_s = slow_consumer_grace_s
        self.retention_days = retention_days
        self.max_events = max_events
        self.prune_interval_s = prune_interval_s
        self.dropped_subscribers = 0
        self.catch_ups = 0  # times a subscriber overflowed its live buffer and read on from the store
        self.written: collections.Counter[str] = collections.Counter()  # committed events by type
        self.events_pruned = 0  # deleted by retention (written by the writer thread; an int store is atomic)
        self.prune_failures = 0
        self._subscribers: set[Subscription] = set()
        self._last_delivered = store.last_seq()  # highest seq fanned out; where a live-only subscriber starts
        self._pending: set[asyncio.Future[Any]] = set()
        self._requests: queue.SimpleQueue[_Request | _Sequenced | _Truncate | _Prune | _Stop] = queue.SimpleQueue()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One writer thread: seqs are assigned in queue order, and the SQLite write + fsync never runs on the loop.
        self._writer = threading.Thread(target=self._write_loop, name="streamguard-events-writer", daemon=True)
        self._writer.start()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def retains(self) -> bool:
        """Whether a retention limit is set (else events are kept for ever)."""
        return self.retention_days > 0 or self.max_events > 0

    def publish_nowait(self, draft: EventDraft) -> asyncio.Future[Event]:
        """Queue an event; the future resolves once it is committed and handed to subscribers.

        Validation happens here, so a malformed event raises in the caller (pydantic.ValidationError) instead of
        failing later. Events queued by successive calls get increasing seqs. Once queued, an event is written even
        if the caller stops waiting.
        """
        loop = self._check_loop()
        # Stamped here, in call order, so ts does not go backwards along seq (unless a caller passes its own).
        ts = time.time() if draft.ts is None else draft.ts
        draft = dataclasses.replace(draft, ts=ts)
        validate_draft(draft, ts)
        future: asyncio.Future[Event] = loop.create_future()
        self._track(future)
        self._enqueue(draft, future)
        return future

    def _enqueue(self, draft: EventDraft, future: asyncio.Future[Event]) -> None:
        """Where a validated, stamped event goes: to the writer thread, which gives it the store's next seq (a
        cluster hub sends it to the cluster's log instead, see streamguard/cluster/hub.py)."""
        self._requests.put(_Request(draft, future))

    def append_sequenced(self, events: list[Event]) -> asyncio.Future[list[Event]]:
        """Store and fan out events whose seq was assigned elsewhere (cluster mode: the JetStream stream that is
        the cluster's log), after everything queued before; the future gets those written (seq above the store's
        last). The same order and guarantees as publish: stored first, then handed to subscribers in seq order."""
        future: asyncio.Future[list[Event]] = self._check_loop().create_future()
        self._track(future)
        self._requests.put(_Sequenced(events, future))
        return future

    async def truncate_after(self, seq: int) -> int:
        """Drop the stored events after `seq`, after everything queued before, because the log that sequenced them
        lost them; subscribers that had read past it are ended (CursorAhead: resync). Returns the number dropped."""
        future: asyncio.Future[int] = self._check_loop().create_future()
        self._track(future)
        self._requests.put(_Truncate(seq, future))
        return await future

    async def cursor_limit(self) -> int:
        """The highest `since` a client may resume from: the last seq of the log (here, the store)."""
        return await asyncio.to_thread(self.store.last_seq)

    async def publish(self, draft: EventDraft) -> Event:
        """Write the event durably, hand it to every matching subscriber, return it with its seq.

        Waits for the commit (a few ms with fsync), never for subscribers. Cancelling the wait does not un-publish.
        """
        return await self.publish_nowait(draft)

    async def prune(self) -> int:
        """Apply retention now rather than at the next interval, after every event queued before this call.

        Returns the number of events deleted by the pass that ends the pruning (0 when nothing was due).
        """
        future: asyncio.Future[int] = self._check_loop().create_future()
        self._track(future)
        self._requests.put(_Prune(future))
        return await future

    def subscribe(
        self,
        since: int | None = None,
        *,
        stream_id: str | None = None,
        participant_id: str | None = None,
        types: Iterable[EventType | str] | None = None,
        queue_size: int | None = None,
        grace_s: float | None = None,
    ) -> Subscription:
        """Events with seq > `since` from the store, then live ones; `since=None`: live only.

        Registered for live events now (before any replay read): that is what makes replay + live gap-free.
        `queue_size` and `grace_s` override the hub's `client_queue_size` and `slow_consumer_grace_s`.
        """
        self._check_loop()
        if since is not None and since < 0:
            raise ValueError("since must be >= 0")
        flt = EventFilter(
            stream_id=stream_id,
            participant_id=participant_id,
            types=frozenset(EventType(t) for t in types) if types is not None else None,
        )
        grace = self.slow_consumer_grace_s if grace_s is None else grace_s
        sub = Subscription(self, since, flt, queue_size or self.client_queue_size, self.replay_page_size, grace)
        self._subscribers.add(sub)
        return sub

    async def close(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Flush: every queued event is written and delivered; then every subscription ends (HubClosed) once its
        reader has taken what it was offered, so a client hears the last events before the close; a reader that
        does not take them within `drain_timeout_s` is ended anyway (it resumes with `since`). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_Stop())
        await asyncio.to_thread(self._writer.join)
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        for sub in list(self._subscribers):
            sub._close_when_drained()
        deadline = time.monotonic() + drain_timeout_s
        while self._subscribers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
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

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._pending.add(future)  # close() waits for these
        future.add_done_callback(self._pending.discard)

    # -- writer thread and delivery ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        # The first pass runs at start: a restart after downtime may find a day of events to delete.
        pruning = _Pruning(due=time.monotonic() if self.retains else None)
        while True:
            if pruning.due is not None and time.monotonic() >= pruning.due:
                self._prune_step(pruning)
            try:
                item = self._requests.get(timeout=pruning.wait_s())
            except queue.Empty:
                continue
            batch, tail = self._take_batch(item)
            if batch:
                self._commit(batch)
            if isinstance(tail, _Sequenced):
                self._commit_sequenced(tail)
            elif isinstance(tail, _Truncate):
                self._truncate(tail)
            elif isinstance(tail, _Prune):
                if pruning.due is None:
                    self._settle(tail.future, 0)
                else:
                    pruning.waiters.append(tail.future)
                    pruning.due = time.monotonic()
            elif isinstance(tail, _Stop):
                self._end_pass(pruning, RuntimeError("EventHub closed before pruning finished"))
                return

    def _take_batch(
        self, first: _Request | _Sequenced | _Truncate | _Prune | _Stop
    ) -> tuple[list[_Request], _Sequenced | _Truncate | _Prune | _Stop | None]:
        """Group commit: `first` and whatever else is queued, in order, up to max_batch or the first control item."""
        batch: list[_Request] = []
        item = first
        while True:
            if not isinstance(item, _Request):
                return batch, item
            batch.append(item)
            if len(batch) >= self.max_batch:
                return batch, None
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return batch, None

    def _commit(self, batch: list[_Request]) -> None:
        results: list[Event | BaseException]
        try:
            results = list(self.store.append_many([r.draft for r in batch]))
        except BaseException as exc:  # e.g. disk full: every event of the batch fails, none was written
            results = [exc] * len(batch)
        assert self._loop is not None  # set by the publish that queued the batch
        with contextlib.suppress(RuntimeError):  # loop already closed: written, nobody left to tell
            self._loop.call_soon_threadsafe(self._deliver, list(zip(batch, results, strict=True)))

    def _commit_sequenced(self, item: _Sequenced) -> None:
        try:
            written = self.store.append_sequenced(item.events)
        except BaseException as exc:  # e.g. disk full: none was written; the caller retries from its last seq
            self._settle(item.future, exc)
            return
        assert self._loop is not None  # set by the append_sequenced that queued it
        with contextlib.suppress(RuntimeError):  # loop already closed: written, nobody left to tell
            self._loop.call_soon_threadsafe(self._deliver_sequenced, written, item.future)

    def _truncate(self, item: _Truncate) -> None:
        try:
            n = self.store.truncate_after(item.seq)
        except BaseException as exc:
            self._settle(item.future, exc)
            return
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._after_truncate, item.seq, n, item.future)

    def _after_truncate(self, seq: int, n: int, future: asyncio.Future[int]) -> None:
        self._last_delivered = min(self._last_delivered, seq)
        for sub in list(self._subscribers):
            if max(sub.last_seq, sub._fetched) > seq:
                sub._end(CursorAhead(f"the log lost its events after seq {seq}; resync with since=0", None))
        if not future.done():
            future.set_result(n)

    def _prune_step(self, pruning: _Pruning) -> None:
        """One retention transaction. A full chunk means more to delete: the next one follows the next commit
        batch, so publishes wait at most one chunk."""
        before = time.time() - self.retention_days * DAY_S if self.retention_days > 0 else None
        try:
            n = self.store.prune(before_ts=before, keep_last=self.max_events or None, limit=PRUNE_CHUNK)
        except Exception as exc:  # e.g. disk full or locked: publishing goes on, pruning retries later
            log.exception("event retention: pruning failed; retrying in %g s", self.prune_interval_s)
            self.prune_failures += 1
            self._end_pass(pruning, exc)
            return
        pruning.deleted += n
        self.events_pruned += n
        if n == PRUNE_CHUNK:
            pruning.due = time.monotonic()
        else:
            self._end_pass(pruning, pruning.deleted)

    def _end_pass(self, pruning: _Pruning, result: int | BaseException) -> None:
        for future in pruning.waiters:
            self._settle(future, result)
        pruning.deleted, pruning.waiters = 0, []
        if pruning.due is not None:
            pruning.due = time.monotonic() + self.prune_interval_s

    def _settle(self, future: asyncio.Future[Any], result: object) -> None:
        """Resolve a future of the loop from the writer thread."""

        def settle() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting
                self._loop.call_soon_threadsafe(settle)

    def _deliver(self, items: list[tuple[_Request, Event | BaseException]]) -> None:
        """On the loop, in commit order: fan out first, then resolve the publishers' futures."""
        for _, res in items:
            if isinstance(res, Event):
                self._fan_out(res)
        for req, res in items:
            if req.future.done():
                continue
            if isinstance(res, Event):
                req.future.set_result(res)
            else:
                req.future.set_exception(res)

    def _deliver_sequenced(self, events: list[Event], future: asyncio.Future[list[Event]]) -> None:
        for event in events:
            self._fan_out(event)
        if not future.done():
            future.set_result(events)

    def _fan_out(self, event: Event) -> None:
        self._last_delivered = event.seq
        self.written[getattr(event.type, "value", event.type)] += 1
        for sub in list(self._subscribers):
            sub._offer(event)
