"""The event hub of a cluster instance: the cluster's log (JetStream) assigns the seqs, this instance's store keeps a
copy of the whole log, and the hub's subscribers, replay, retention and `feed.gap` work on that copy as in single
mode.

Why materialise the log into each instance's SQLite store rather than read JetStream for every replay and list:
the store, the hub and the API stay the code single mode runs and tests (filters, slow consumers, gaps, the alert
history with its evidence); a replay or `/v1/alerts` never waits on NATS, so they keep answering while NATS is down;
and the log is read once per instance instead of once per client. The cost is a store per instance (the log's size)
and a short delay (one JetStream delivery) before an instance shows an event raised on another.

Order and acknowledgement: `publish` sends the event to the log (streamguard/cluster/log.py) and resolves once the
event has come back through the follower, i.e. once JetStream has stored it (so it has its cluster-wide seq), this
store has it and the subscribers were handed it: the single-mode contract, with JetStream as the place of record.
No client sees an event JetStream has not acknowledged, since clients only read what the follower read from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from nats.aio.msg import Msg

from streamguard.cluster.evidence import EvidenceBucket
from streamguard.cluster.follow import Follower
from streamguard.cluster.link import ClusterUnavailable, NatsLink
from streamguard.cluster.log import MSG_ID, EventLog, decode
from streamguard.events.hub import DRAIN_TIMEOUT_S, EventHub
from streamguard.events.schema import Event, EventDraft, EventType, EvidenceKind, validate_draft
from streamguard.events.store import EventStore

log = logging.getLogger(__name__)

MARKER = "cluster-log.json"  # in the data dir: which log the store is a copy of
UNKNOWN_LIMIT = 2**63 - 1  # while NATS is unreachable, a client's `since` cannot be checked: it is taken as is


class ForeignStore(ValueError):
    """The data dir's store holds events of another log, whose seqs would mix with this one's."""


class ClusterHub(EventHub):
    """EventHub(store, ...) plus the log it publishes to and the evidence bucket alerts' images are copied from."""

    def __init__(self, store: EventStore, *, log: EventLog, link: NatsLink, evidence: EvidenceBucket,
                 flush_timeout_s: float, **options: Any) -> None:
        super().__init__(store, **options)
        self._log = log
        self._link = link
        self._evidence = evidence
        self._flush_timeout_s = flush_timeout_s
        self._waiting: dict[str, asyncio.Future[Event]] = {}  # msg id -> its publisher's future
        self._follower: Follower | None = None
        self.log_last_seq = 0  # the log's last seq, last time it was asked (for the lag metric)
        self.undecodable = 0
        self._deadline: float | None = None  # set by stopping(): monotonic time after which publishes give up
        self._give_up: asyncio.Task[None] | None = None

    @property
    def materialised_seq(self) -> int:
        return self._follower.last_seq if self._follower else 0

    def _enqueue(self, draft: EventDraft, future: asyncio.Future[Event]) -> None:
        etype, data = validate_draft(draft, float(draft.ts or 0.0))  # publish_nowait stamped ts
        msg_id = self._log.submit({"ts": draft.ts, "type": etype.value, "stream_id": draft.stream_id,
                                   "participant_id": draft.participant_id, "data": data})
        self._waiting[msg_id] = future
        future.add_done_callback(lambda _f: self._waiting.pop(msg_id, None))

    async def follow(self) -> None:
        """Start reading the log into the store after its last seq; returns once caught up with the log."""
        await self._check_store_is_a_copy()
        start = self.store.last_seq() + 1
        first = await self._log.first_seq()
        if first is not None and first > start and start > 1:
            # Retention removed events from the log that this store never got: what it holds before them can no
            # longer be replayed without a hole, so it goes too, and a replay from there gets a feed.gap.
            await asyncio.to_thread(self._drop_through, first - 1)
        self._follower = self._new_follower(start)
        await self._follower.start()
        await self._follower.ready.wait()

    async def _check_store_is_a_copy(self) -> None:
        """A store is the copy of one log: one that holds other events (a single-mode instance's data dir, another
        cluster's) is refused rather than mixed with this log by seq."""
        marker = self.store.path.parent / MARKER
        ours = await self._log.identity()
        if marker.exists():
            if json.loads(marker.read_text()) != ours:
                raise ForeignStore(f"data_dir {marker.parent}: its store is a copy of another event log "
                                   f"({marker.read_text().strip()}); give this instance an empty data_dir")
        elif self.store.last_seq() > 0:
            raise ForeignStore(f"data_dir {marker.parent}: its store holds events that are not from the cluster's "
                               "log (a single-mode instance's); give this instance an empty data_dir")
        else:
            marker.write_text(json.dumps(ours) + "\n")

    def _drop_through(self, seq: int) -> None:
        while self.store.prune(through_seq=seq, limit=2000) == 2000:
            pass

    async def caught_up(self, timeout_s: float = 30.0) -> bool:
        """Wait until the store holds the log as it is now; False when NATS cannot say or it took too long."""
        last = await self._log.last_seq()
        if last is None or self._follower is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                while self._follower.last_seq < last:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    async def cursor_limit(self) -> int:
        """A client's `since` is checked against the cluster's log, not this store (which may not have read up to
        it yet: such a client simply waits for the events after it)."""
        last = await self._log.last_seq()
        if last is None:
            return UNKNOWN_LIMIT
        self.log_last_seq = last
        return max(last, await super().cursor_limit())

    async def _materialise(self, msgs: list[Msg]) -> None:
        events: list[tuple[Event, str | None]] = []
        for msg in msgs:
            try:
                events.append((decode(msg), (msg.headers or {}).get(MSG_ID)))
            except ValueError as exc:  # another version's event type, or not ours: it cannot be served
                self.undecodable += 1
                log.warning("cluster: %s", exc)
        for event, _ in events:
            if event.type is EventType.ALERT_RAISED and event.data.get("evidence"):
                kinds = [EvidenceKind(k) for k in event.data["evidence"]]
                await self._evidence.copy_into(self.store, event.data["alert_id"], kinds)
        await self.append_sequenced([e for e, _ in events])
        self.log_last_seq = max(self.log_last_seq, msgs[-1].metadata.sequence.stream)
        for event, msg_id in events:
            future = self._waiting.pop(msg_id, None) if msg_id else None
            if future is not None and not future.done():
                future.set_result(event)

    async def check_log(self) -> None:
        """Find out whether the log lost events this store has (its last seq is now below what was read: a single
        NATS server that crashed loses its last writes) and, if so, drop them here too and read on from there, so
        every instance keeps the log's own order. Publishers waiting for a lost event fail (it was acknowledged,
        then lost); subscribers that had read past the end are told to resync (4409)."""
        read = self.materialised_seq  # before asking: what the follower reads later exists in the log
        last = await self._log.last_seq()
        if last is not None:
            self.log_last_seq = last  # for the lag metric
        if last is None or last >= read or self._follower is None:
            return
        log.error("cluster: the event log ends at seq %d, but this instance had read up to %d: NATS lost its latest "
                  "writes (run it with 3 replicas: cluster.replicas); dropping them here too", last, read)
        await self._follower.close()
        await self.truncate_after(last)
        for msg_id, future in list(self._waiting.items()):
            if not self._log.is_queued(msg_id) and not future.done():
                future.set_exception(ClusterUnavailable("NATS acknowledged the event, then lost it"))
        self._follower = self._new_follower(last + 1)
        await self._follower.start()

    def _new_follower(self, start_seq: int) -> Follower:
        settings = self._log.settings
        return Follower(self._link.js, settings.events_stream, f"{settings.subject_prefix}.events.>",
                        self._materialise, start_seq=start_seq, name="event log")

    def stopping(self) -> None:
        """The service is stopping: from now on NATS has `flush_timeout_s` to take what is published (the streams'
        last events); a publish still waiting then fails, so the stop never hangs on an unreachable NATS."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self._flush_timeout_s
            self._give_up = asyncio.get_running_loop().create_task(self._fail_waiting_at_deadline())

    def _left_s(self) -> float:
        return max(0.0, (self._deadline or 0.0) - time.monotonic())

    async def _fail_waiting_at_deadline(self) -> None:
        await asyncio.sleep(self._left_s())
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        lost = [f for f in self._waiting.values() if not f.done()]
        for future in lost:
            future.set_exception(ClusterUnavailable("NATS did not take the event before the service stopped"))
        if lost:
            log.error("cluster: %d event(s) not published: NATS did not take them within %g s of the stop",
                      len(lost), self._flush_timeout_s)

    async def close(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Wait (up to the stop's deadline) for what is queued to reach the log and come back, then close (and give
        subscribers `drain_timeout_s` to take their last events, as a single-mode hub does)."""
        self.stopping()
        pending = [f for f in self._waiting.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._left_s())
        self._fail_waiting()
        if self._give_up is not None:
            self._give_up.cancel()
        if self._follower is not None:
            await self._follower.close()
        await super().close(drain_timeout_s)
