"""The durable event log: SQLite in WAL mode, one file in the data dir.

Every event is committed here before anyone is sent it, so its `seq` (INTEGER PRIMARY KEY AUTOINCREMENT: monotonic,
never reused even after rows are deleted, and it continues after a reopen) is a durable resume point for clients.
The alerts table is derived from `alert.raised` / `alert.cleared` events in the same transaction as the event, so
the alert history can never disagree with the feed. Evidence images are BLOBs next to them: each is tens of KB,
a size at which SQLite reads BLOBs faster than separate files (sqlite.org, "Internal Versus External BLOBs"), and
one file is one backup.

Durability: `synchronous=FULL` by default. In WAL mode NORMAL already survives a crash of the *process* (a commit
is in the WAL file, i.e. the OS page cache, before `append` returns), but a power loss or kernel crash can roll back
the last commits. Rolled-back seqs are then handed out again to different events, and a client that saw the old
seq N and resumes with `since=N` silently skips the new ones. FULL fsyncs the WAL at every commit, which closes that
hole; the hub's writer commits in groups, so its cost is one fsync per batch, not per event. Measured on the dev
VM (participant.score events, validation included): FULL 200-350 single appends/s (one fsync each), 9-13k/s in
batches of 100, 4.4k/s through the hub with 100 concurrent publishers; NORMAL 2.4-6.8k single appends/s. Our load
is ~1 event/s per participant. Pass `synchronous="NORMAL"` where power loss is not a concern (tests, a laptop).

Thread-safety: one writer connection and one reader connection, each behind its own lock (sqlite3 objects are not
safe to use from two threads at once). WAL lets the reader see committed data while the writer fsyncs, so feed
replays do not wait for disk flushes.

Retention (`prune`): events are deleted oldest first, always a prefix of the log, so "every seq <= N is gone" is
one number, `pruned_through()` = the first remaining seq - 1 (seqs have no holes: a failed insert rolls back its
seq too). A replay that asks for events the log no longer has learns it from that number (the hub then sends a
`feed.gap`). An alert row and its evidence go with its `alert.cleared` event; an open alert stays however old,
since it is current state and its clearing must still find it. Each `prune` call is one short transaction of at
most `limit` rows, so publishes are not held up behind a large deletion. Freed pages are reused by later events;
the file does not shrink (that would need a VACUUM, which rewrites the whole file).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .schema import Event, EventDraft, EventType, EvidenceKind, validate_draft

# PRAGMA user_version: the layout of this file, not the event schema (2: evidence.stored_ts, 3: presence and
# alerts.label, 4: alerts.face_px)
DB_SCHEMA_VERSION = 4
# Evidence is stored before its alert is published; evidence with no alert row this long after it was stored belongs
# to an alert that was never published (the process died in between): retention deletes it.
ORPHAN_EVIDENCE_S = 3600.0
MAX_EVIDENCE_BYTES = 8 * 1024 * 1024  # a crop or heatmap is tens of KB; refuse what would bloat the database

_DDL = """
CREATE TABLE IF NOT EXISTS events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    ts             REAL NOT NULL,
    type           TEXT NOT NULL,
    stream_id      TEXT,
    participant_id TEXT,
    data           TEXT NOT NULL CHECK (json_valid(data))
);
CREATE INDEX IF NOT EXISTS events_stream ON events (stream_id, seq);
CREATE INDEX IF NOT EXISTS events_participant ON events (participant_id, seq);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id       TEXT PRIMARY KEY,
    stream_id      TEXT,
    participant_id TEXT,
    raised_seq     INTEGER NOT NULL UNIQUE,
    raised_ts      REAL NOT NULL,
    cleared_seq    INTEGER,
    cleared_ts     REAL,
    score          REAL NOT NULL,
    smoothed       REAL NOT NULL,
    threshold      REAL NOT NULL,
    clear_reason   TEXT,
    label          TEXT,
    face_px        REAL
);
CREATE INDEX IF NOT EXISTS alerts_stream ON alerts (stream_id, raised_seq);
-- Who is present: a row per participant.joined without its participant.left yet, kept in the event's transaction
-- like the alerts. What a process killed mid-call leaves here is tidied at the next start.
CREATE TABLE IF NOT EXISTS presence (
    stream_id      TEXT NOT NULL,
    participant_id TEXT NOT NULL,
    joined_seq     INTEGER NOT NULL,
    joined_ts      REAL NOT NULL,
    PRIMARY KEY (stream_id, participant_id)
);
-- No foreign key to alerts: the producer stores evidence *before* it publishes the alert, so a client that fetches
-- the evidence URL on receiving alert.raised always finds it.
CREATE TABLE IF NOT EXISTS evidence (
    alert_id TEXT NOT NULL,
    kind     TEXT NOT NULL,
    mime     TEXT NOT NULL,
    bytes    BLOB NOT NULL,
    stored_ts REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (alert_id, kind)
);
"""


_PRESENCE_FROM_EVENTS = """
INSERT OR REPLACE INTO presence (stream_id, participant_id, joined_seq, joined_ts)
SELECT e.stream_id, e.participant_id, e.seq, e.ts FROM events e JOIN (
    SELECT max(seq) AS seq FROM events WHERE type IN ('participant.joined', 'participant.left')
    GROUP BY stream_id, participant_id
) last ON e.seq = last.seq
WHERE e.type = 'participant.joined'
"""


@dataclass(frozen=True, slots=True)
class Presence:
    """A participant the log says joined and has not left."""

    stream_id: str
    participant_id: str
    joined_seq: int
    joined_ts: float


class AlertRecord(BaseModel):
    """One row of the alert history (what `GET /v1/alerts` returns)."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    stream_id: str | None
    participant_id: str | None
    raised_seq: int
    raised_ts: float
    cleared_seq: int | None
    cleared_ts: float | None
    score: float
    smoothed: float
    threshold: float
    clear_reason: str | None
    label: str | None = None  # the participant's display name when the alert was raised
    face_px: float | None = None  # long side of the raising face's box, frame pixels (null: not known)
    evidence: list[EvidenceKind]


class AlertPage(BaseModel):
    """Newest first. Pass `next_before` as `before` for the next page; None: this was the last one."""

    items: list[AlertRecord]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Evidence:
    mime: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ReplayPage:
    """One read of the log for a replay: the events, and how far retention had deleted it at that moment."""

    pruned_through: int
    events: list[Event]


class AlertConflict(ValueError):
    """alert.raised for an id already raised, or alert.cleared for one unknown or already cleared."""


class EventStore:
    def __init__(self, path: str | PathLike[str], *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._closed = False
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly what we say it is.
        self._w = self._connect(synchronous)
        with self._wlock:
            mode = self._w.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: cannot use WAL mode (got {mode}); is it on a network filesystem?")
            version = self._w.execute("PRAGMA user_version").fetchone()[0]
            if version > DB_SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has layout v{version}, newer than this code (v{DB_SCHEMA_VERSION})")
            self._w.executescript(_DDL)
            # One transaction (SQLite's DDL and user_version are transactional): a crash mid-upgrade leaves v1.
            self._w.execute("BEGIN IMMEDIATE")
            if version == 1:  # v1 evidence rows have no stored_ts: 0 makes an orphan among them prunable at once
                self._w.execute("ALTER TABLE evidence ADD COLUMN stored_ts REAL NOT NULL DEFAULT 0")
            if version < 3:  # presence from the log: whoever's last joined/left event is a join
                self._w.execute(_PRESENCE_FROM_EVENTS)
            columns = {row[1] for row in self._w.execute("PRAGMA table_info(alerts)")}
            if "label" not in columns:  # an alerts table from before layout 3: add the display name
                self._w.execute("ALTER TABLE alerts ADD COLUMN label TEXT")
            if "face_px" not in columns:  # before layout 4: the raising face's size (unknown for older alerts)
                self._w.execute("ALTER TABLE alerts ADD COLUMN face_px REAL")
            self._w.execute(f"PRAGMA user_version={DB_SCHEMA_VERSION}")
            self._w.execute("COMMIT")
        self._r = self._connect(synchronous)
        self._r.execute("PRAGMA query_only=ON")

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside BEGIN IMMEDIATE ... COMMIT, under the write lock; rolled back on any error
        (an I/O error or a cancelled caller leaves nothing half-written)."""
        with self._wlock:
            self._check_open()
            c = self._w
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    # -- events -----------------------------------------------------------------------------------------------

    def append(self, draft: EventDraft) -> Event:
        """Validate, assign the next seq and commit one event. Raises ValidationError / AlertConflict."""
        result = self.append_many([draft])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def append_many(self, drafts: Sequence[EventDraft]) -> list[Event | Exception]:
        """Commit several events in one transaction (one fsync); seqs follow the order of `drafts`.

        Each draft succeeds or fails alone (a SAVEPOINT each), so one bad event never loses its batch neighbours:
        the result holds the Event or the exception for each draft, in order. An I/O error fails the whole call.
        """
        results: list[Event | Exception | None] = [None] * len(drafts)
        checked: list[tuple[int, EventType, dict[str, Any], float, EventDraft]] = []
        for i, d in enumerate(drafts):
            ts = time.time() if d.ts is None else float(d.ts)
            try:
                etype, data = validate_draft(d, ts)
            except ValueError as exc:  # pydantic.ValidationError is a ValueError
                results[i] = exc
            else:
                checked.append((i, etype, data, ts, d))
        if checked:
            self._write(checked, results)
        return [r if r is not None else RuntimeError("not written") for r in results]  # every slot is set above

    def _write(
        self,
        checked: list[tuple[int, EventType, dict[str, Any], float, EventDraft]],
        results: list[Event | Exception | None],
    ) -> None:
        with self._transaction() as c:
            for i, etype, data, ts, d in checked:
                c.execute("SAVEPOINT item")
                try:
                    seq = self._insert(c, etype, d.stream_id, d.participant_id, data, ts)
                except (AlertConflict, sqlite3.IntegrityError) as exc:
                    c.execute("ROLLBACK TO item")
                    c.execute("RELEASE item")
                    results[i] = exc if isinstance(exc, AlertConflict) else AlertConflict(str(exc))
                    continue
                c.execute("RELEASE item")
                results[i] = Event(
                    seq=seq, ts=ts, type=etype, stream_id=d.stream_id, participant_id=d.participant_id, data=data
                )

    def append_sequenced(self, events: Sequence[Event]) -> list[Event]:
        """Commit events that already have their seq (from a log kept elsewhere: cluster mode's JetStream stream)
        in one transaction; returns those written. Events at or below `last_seq()` are skipped, so a log follower
        that delivers one twice after a reconnect changes nothing. The log has accepted them, so each is written:
        an alert row that conflicts (a second clear of one alert) is left as it is, and the event kept."""
        written: list[Event] = []
        with self._transaction() as c:
            last = self._last_seq(c)
            for event in events:
                if event.seq <= last:
                    continue
                c.execute("SAVEPOINT item")
                try:
                    self._insert(c, EventType(event.type), event.stream_id, event.participant_id, event.data,
                                 event.ts, seq=event.seq)
                except AlertConflict:  # the row insert or update failed: keep the event without it
                    c.execute("ROLLBACK TO item")
                    self._insert_event(c, EventType(event.type), event.stream_id, event.participant_id,
                                       event.data, event.ts, event.seq)
                c.execute("RELEASE item")
                written.append(event)
                last = event.seq
        return written

    def truncate_after(self, seq: int) -> int:
        """Delete every event after `seq`, with the alerts they raised and the clearings they recorded, so later
        events take those seqs: the log kept elsewhere lost them (cluster mode: a single NATS server that crashed
        loses its last writes). Returns the number of events deleted."""
        with self._transaction() as c:
            n = c.execute("DELETE FROM events WHERE seq > ?", (seq,)).rowcount
            c.execute("DELETE FROM alerts WHERE raised_seq > ?", (seq,))
            c.execute("UPDATE alerts SET cleared_seq = NULL, cleared_ts = NULL, clear_reason = NULL"
                      " WHERE cleared_seq > ?", (seq,))
            c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events' AND seq > ?", (seq, seq))
        return n

    @staticmethod
    def _insert_event(c: sqlite3.Connection, etype: EventType, stream_id: str | None, participant_id: str | None,
                      data: dict[str, Any], ts: float, seq: int | None) -> int:
        """One events row; `seq` None: the next one (AUTOINCREMENT), else that one (sqlite_sequence follows)."""
        cur = c.execute(
            "INSERT INTO events (seq, ts, type, stream_id, participant_id, data) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, ts, etype.value, stream_id, participant_id, json.dumps(data, separators=(",", ":"))),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @classmethod
    def _insert(
        cls,
        c: sqlite3.Connection,
        etype: EventType,
        stream_id: str | None,
        participant_id: str | None,
        data: dict[str, Any],
        ts: float,
        seq: int | None = None,
    ) -> int:
        seq = cls._insert_event(c, etype, stream_id, participant_id, data, ts, seq)
        if etype is EventType.ALERT_RAISED:
            try:
                c.execute(
                    "INSERT INTO alerts (alert_id, stream_id, participant_id, raised_seq, raised_ts, score, smoothed,"
                    " threshold, label, face_px) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (data["alert_id"], stream_id, participant_id, seq, ts, data["score"], data["smoothed"],
                     data["threshold"], data.get("label"), data.get("face_px")),
                )
            except sqlite3.IntegrityError as exc:
                raise AlertConflict(f"alert {data['alert_id']!r} was already raised") from exc
        elif etype is EventType.ALERT_CLEARED:
            cur = c.execute(
                "UPDATE alerts SET cleared_seq = ?, cleared_ts = ?, clear_reason = ?"
                " WHERE alert_id = ? AND cleared_seq IS NULL",
                (seq, ts, data["reason"], data["alert_id"]),
            )
            if cur.rowcount != 1:
                raise AlertConflict(f"alert {data['alert_id']!r} is unknown or already cleared")
        elif etype is EventType.PARTICIPANT_JOINED:
            c.execute("INSERT OR REPLACE INTO presence (stream_id, participant_id, joined_seq, joined_ts)"
                      " VALUES (?, ?, ?, ?)", (stream_id, participant_id, seq, ts))
        elif etype is EventType.PARTICIPANT_LEFT:
            c.execute("DELETE FROM presence WHERE stream_id = ? AND participant_id = ?", (stream_id, participant_id))
        return seq

    def since(
        self,
        seq: int,
        *,
        stream_id: str | None = None,
        participant_id: str | None = None,
        types: Iterable[EventType | str] | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Events with seq > `seq` that match every given filter, oldest first, at most `limit`."""
        query = self._since_query(seq, stream_id, participant_id, types, limit)
        return self._events(self._read(*query)) if query else []

    def page(
        self,
        seq: int,
        *,
        stream_id: str | None = None,
        participant_id: str | None = None,
        types: Iterable[EventType | str] | None = None,
        limit: int = 1000,
    ) -> ReplayPage:
        """`since(...)` and `pruned_through()` read from one snapshot, so a prune between them cannot hide a gap."""
        query = self._since_query(seq, stream_id, participant_id, types, limit)
        with self._rlock:
            self._check_open()
            self._r.execute("BEGIN")  # a read transaction: both statements see the same commit
            try:
                pruned = self._pruned_through(self._r)
                rows = self._r.execute(*query).fetchall() if query else []
            finally:
                self._r.execute("COMMIT")
        return ReplayPage(pruned_through=pruned, events=self._events(rows))

    @staticmethod
    def _since_query(
        seq: int,
        stream_id: str | None,
        participant_id: str | None,
        types: Iterable[EventType | str] | None,
        limit: int,
    ) -> tuple[str, tuple[Any, ...]] | None:
        """The SELECT of `since`; None when it cannot match anything (an empty type set)."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        where: list[str] = ["seq > ?"]
        args: list[Any] = [int(seq)]
        if stream_id is not None:
            where.append("stream_id = ?")
            args.append(stream_id)
        if participant_id is not None:
            where.append("participant_id = ?")
            args.append(participant_id)
        if types is not None:
            names = sorted({EventType(t).value for t in types})
            if not names:
                return None
            where.append(f"type IN ({','.join('?' * len(names))})")
            args.extend(names)
        sql = f"SELECT seq, ts, type, stream_id, participant_id, data FROM events WHERE {' AND '.join(where)}"
        return sql + " ORDER BY seq LIMIT ?", (*args, limit)

    @staticmethod
    def _events(rows: list[tuple[Any, ...]]) -> list[Event]:
        return [
            Event(seq=r[0], ts=r[1], type=r[2], stream_id=r[3], participant_id=r[4], data=json.loads(r[5]))
            for r in rows
        ]

    def last_seq(self) -> int:
        """The highest seq ever assigned (0 for a new store); sqlite_sequence keeps it even if rows are deleted."""
        with self._rlock:
            self._check_open()
            return self._last_seq(self._r)

    def pruned_through(self) -> int:
        """Every event with seq <= this was deleted by retention (0: none was)."""
        with self._rlock:
            self._check_open()
            return self._pruned_through(self._r)

    @staticmethod
    def _last_seq(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    @classmethod
    def _pruned_through(cls, c: sqlite3.Connection) -> int:
        first = c.execute("SELECT min(seq) FROM events").fetchone()[0]  # rowid min: one b-tree descent
        return int(first) - 1 if first is not None else cls._last_seq(c)  # empty: everything ever written is gone

    # -- retention --------------------------------------------------------------------------------------------

    def prune(self, *, before_ts: float | None = None, keep_last: int | None = None, through_seq: int = 0,
              limit: int = 2000) -> int:
        """Delete up to `limit` of the oldest events that are older than `before_ts` (unix s), outside the last
        `keep_last` seqs or at most `through_seq`, with the cleared alerts (and their evidence) whose events are all
        gone, and evidence whose alert was never published (ORPHAN_EVIDENCE_S after it was stored). Returns the
        number of events deleted: `limit` means there may be more, call again.

        Only a prefix of the log goes: an event is kept while an older one is (ts is the producer's clock and may
        step back), so `pruned_through()` stays exact.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if keep_last is not None and keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._transaction() as c:
            # By seq, not by count(*): O(1), and seqs have no holes.
            cap = max(self._last_seq(c) - keep_last if keep_last is not None else 0, through_seq)
            oldest = c.execute("SELECT seq, ts FROM events ORDER BY seq LIMIT ?", (limit,)).fetchall()
            through, n = 0, 0
            for seq, ts in oldest:
                if seq > cap and (before_ts is None or ts >= before_ts):
                    break
                through, n = seq, n + 1
            if n:
                c.execute("DELETE FROM events WHERE seq <= ?", (through,))
                # cleared_seq > raised_seq, so the raised_seq bound lets SQLite use its index.
                gone = "SELECT alert_id FROM alerts WHERE raised_seq < ? AND cleared_seq <= ?"
                c.execute(f"DELETE FROM evidence WHERE alert_id IN ({gone})", (through, through))
                c.execute("DELETE FROM alerts WHERE raised_seq < ? AND cleared_seq <= ?", (through, through))
            c.execute("DELETE FROM evidence WHERE stored_ts < ? AND alert_id NOT IN (SELECT alert_id FROM alerts)",
                      (time.time() - ORPHAN_EVIDENCE_S,))
        return n

    # -- alerts and evidence ----------------------------------------------------------------------------------

    _ALERT_COLUMNS = (
        "a.alert_id, a.stream_id, a.participant_id, a.raised_seq, a.raised_ts, a.cleared_seq, a.cleared_ts, a.score,"
        " a.smoothed, a.threshold, a.clear_reason, a.label, a.face_px,"
        " (SELECT group_concat(e.kind) FROM evidence e WHERE e.alert_id = a.alert_id)"
    )

    @staticmethod
    def _alert(row: tuple[Any, ...]) -> AlertRecord:
        kinds = sorted(row[13].split(",")) if row[13] else []
        return AlertRecord(
            alert_id=row[0], stream_id=row[1], participant_id=row[2], raised_seq=row[3], raised_ts=row[4],
            cleared_seq=row[5], cleared_ts=row[6], score=row[7], smoothed=row[8], threshold=row[9],
            clear_reason=row[10], label=row[11], face_px=row[12], evidence=[EvidenceKind(k) for k in kinds],
        )

    def get_alert(self, alert_id: str) -> AlertRecord | None:
        rows = self._read(f"SELECT {self._ALERT_COLUMNS} FROM alerts a WHERE a.alert_id = ?", (alert_id,))
        return self._alert(rows[0]) if rows else None

    def alerts(
        self,
        *,
        before: int | None = None,
        limit: int = 50,
        stream_id: str | None = None,
        participant_id: str | None = None,
        open_only: bool = False,
    ) -> AlertPage:
        """A page of alerts, newest first; `before` is the cursor (a raised_seq, exclusive) from the last page.

        Keyset paging on raised_seq: stable while new alerts arrive, unlike OFFSET.
        """
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be in 1..1000")
        where: list[str] = ["1"]
        args: list[Any] = []
        if before is not None:
            where.append("a.raised_seq < ?")
            args.append(int(before))
        if stream_id is not None:
            where.append("a.stream_id = ?")
            args.append(stream_id)
        if participant_id is not None:
            where.append("a.participant_id = ?")
            args.append(participant_id)
        if open_only:
            where.append("a.cleared_seq IS NULL")
        rows = self._read(
            f"SELECT {self._ALERT_COLUMNS} FROM alerts a WHERE {' AND '.join(where)} ORDER BY a.raised_seq DESC"
            " LIMIT ?",
            (*args, limit + 1),  # one more than asked tells whether another page exists
        )
        items = [self._alert(r) for r in rows[:limit]]
        return AlertPage(items=items, next_before=items[-1].raised_seq if len(rows) > limit else None)

    def present(self) -> list[Presence]:
        """Participants that joined and have not left, by join order. At a start, before any source runs, these are
        the presence a process that died (kill -9, power loss) never closed."""
        rows = self._read("SELECT stream_id, participant_id, joined_seq, joined_ts FROM presence ORDER BY joined_seq",
                          ())
        return [Presence(*row) for row in rows]

    def put_evidence(self, alert_id: str, kind: EvidenceKind | str, mime: str, data: bytes) -> None:
        """Store (or replace) one evidence image of an alert; may come before the alert is published."""
        kind = EvidenceKind(kind)
        if not alert_id:
            raise ValueError("alert_id must not be empty")
        if not data or len(data) > MAX_EVIDENCE_BYTES:
            raise ValueError(f"evidence must be 1..{MAX_EVIDENCE_BYTES} bytes, got {len(data)}")
        with self._wlock:
            self._check_open()
            self._w.execute(
                "INSERT OR REPLACE INTO evidence (alert_id, kind, mime, bytes, stored_ts) VALUES (?, ?, ?, ?, ?)",
                (alert_id, kind.value, mime, sqlite3.Binary(data), time.time()),
            )

    def get_evidence(self, alert_id: str, kind: EvidenceKind | str) -> Evidence | None:
        rows = self._read(
            "SELECT mime, bytes FROM evidence WHERE alert_id = ? AND kind = ?", (alert_id, EvidenceKind(kind).value)
        )
        return Evidence(mime=rows[0][0], data=bytes(rows[0][1])) if rows else None

    # -- lifecycle --------------------------------------------------------------------------------------------

    def _read(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._rlock:
            self._check_open()
            return self._r.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EventStore is closed")

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; idempotent."""
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            self._r.close()
            try:
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._w.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
