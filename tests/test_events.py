"""Events: schema, durable SQLite store, and the hub's replay + live fan-out, on real SQLite files."""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pydantic
import pytest
from PIL import Image

from streamguard.events.hub import (
    CLOSE_SLOW_CONSUMER,
    DAY_S,
    CursorAhead,
    EventHub,
    HubClosed,
    SlowConsumer,
    Subscription,
)
from streamguard.events.schema import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    AlertRaisedData,
    Event,
    EventDraft,
    EventType,
    EvidenceKind,
    StreamState,
    StreamStateData,
    event_json_schema,
    evidence_path,
    new_alert_id,
    render_event_json_schema,
)
from streamguard.events.store import DB_SCHEMA_VERSION, AlertConflict, EventStore

# -- helpers ---------------------------------------------------------------------------------------------------


def state(s: str = "live", **kw: object) -> dict[str, object]:
    return {"state": s, **kw}


def raised(alert_id: str, score: float = 0.91) -> dict[str, object]:
    return {
        "alert_id": alert_id, "score": score, "smoothed": 0.8, "threshold": 0.7, "window_s": 10.0, "samples": 10,
        "evidence": {"crop": evidence_path(alert_id, "crop"), "heatmap": evidence_path(alert_id, "heatmap")},
    }


def cleared(alert_id: str) -> dict[str, object]:
    return {"alert_id": alert_id, "reason": "score below clear threshold", "smoothed": 0.3, "threshold": 0.5,
            "duration_s": 12.0}


def one_of_each(store: EventStore) -> list[Event]:
    """One event of every type, through the store (what clients receive)."""
    aid = new_alert_id()
    return [
        store.append(EventDraft(EventType.STREAM_STATE, "s1", None,
                                state("reconnecting", reason="no frame for 20 s", attempt=2, retry_in_s=4.0))),
        store.append(EventDraft(EventType.PARTICIPANT_JOINED, "s1", "p1", {"label": "Alice", "pts_s": 3.0})),
        store.append(EventDraft(EventType.PARTICIPANT_SCORE, "s1", "p1",
                                {"p_fake": 0.2, "smoothed": 0.25, "samples": 7, "state": "ok", "quality": "ok"})),
        store.append(EventDraft(EventType.ALERT_RAISED, "s1", "p1", AlertRaisedData.model_validate(raised(aid)))),
        store.append(EventDraft(EventType.ALERT_CLEARED, "s1", "p1", cleared(aid))),
        store.append(EventDraft(EventType.PARTICIPANT_LEFT, "s1", "p1",
                                {"reason": "stream closed", "samples": 40, "score": 0.3})),
        store.append(EventDraft(EventType.SERVICE_DEGRADED, None, None,
                                {"component": "inference", "reason": "GPU lost"})),
    ]


@pytest.fixture
def store(tmp_path: Path):
    # NORMAL keeps the many small commits of these tests fast; FULL is covered by its own test.
    s = EventStore(tmp_path / "events.sqlite3", synchronous="NORMAL")
    yield s
    s.close()


async def collect(sub: Subscription, n: int, timeout: float = 10.0) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            ev = await sub.get()
            assert ev is not None
            out.append(ev)
    return out


# -- store -----------------------------------------------------------------------------------------------------


def test_seq_is_monotonic_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "events.sqlite3"
    with EventStore(path) as s:  # default FULL
        assert s.last_seq() == 0
        seqs = [s.append(EventDraft("stream.state", "s1", None, state("connecting"))).seq for _ in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert s.last_seq() == 5
        assert s._w.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._w.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with EventStore(path) as s:
        assert s.last_seq() == 5
        assert s.append(EventDraft("stream.state", "s1", None, state())).seq == 6
        # AUTOINCREMENT: a seq is never handed out twice, even after its row is gone.
        s._w.execute("DELETE FROM events WHERE seq = 6")
        assert s.append(EventDraft("stream.state", "s1", None, state())).seq == 7
        assert [e.seq for e in s.since(0)] == [1, 2, 3, 4, 5, 7]


def test_committed_event_survives_a_killed_process(tmp_path: Path) -> None:
    """What append returned is on disk even if the process dies right after, without close() (SIGKILL)."""
    path = tmp_path / "events.sqlite3"
    code = (
        "import os, signal, sys\n"
        "from streamguard.events.schema import EventDraft\n"
        "from streamguard.events.store import EventStore\n"
        "s = EventStore(sys.argv[1])\n"
        "for _ in range(3): ev = s.append(EventDraft('stream.state', 's1', None, {'state': 'stalled'}))\n"
        "print(ev.seq, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1],  # the repo root: streamguard importable even if not installed
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "3"
    with EventStore(path) as s:  # recovers from the WAL left behind
        assert [(e.seq, e.data["state"]) for e in s.since(0)] == [(1, "stalled"), (2, "stalled"), (3, "stalled")]
        assert s.append(EventDraft("stream.state", "s1", None, state())).seq == 4


def test_since_returns_exactly_the_events_after_n_in_order(store: EventStore) -> None:
    for i in range(30):
        store.append(EventDraft("participant.score", f"s{i % 3}", f"p{i % 5}", {"p_fake": i / 30, "samples": i},
                                ts=1000.0 + i))
    every = store.since(0)
    assert [e.seq for e in every] == list(range(1, 31))
    assert [e.ts for e in every] == [1000.0 + i for i in range(30)]
    for n in (0, 1, 17, 29, 30, 99):
        assert [e.seq for e in store.since(n)] == list(range(n + 1, 31))
    assert [e.seq for e in store.since(10, limit=4)] == [11, 12, 13, 14]
    assert every[4].data == {"p_fake": 4 / 30, "smoothed": None, "samples": 4, "state": None, "quality": None,
                             "face_px": None}


def test_since_filters(store: EventStore) -> None:
    store.append(EventDraft("stream.state", "a", None, state("connecting")))  # 1
    store.append(EventDraft("participant.joined", "a", "a1", {}))  # 2
    store.append(EventDraft("participant.joined", "b", "b1", {}))  # 3
    store.append(EventDraft("participant.score", "a", "a1", {"p_fake": 0.1}))  # 4
    store.append(EventDraft("stream.state", "b", None, state("live")))  # 5
    store.append(EventDraft("service.degraded", None, None, {"component": "store", "reason": "disk 95 % full"}))  # 6
    store.append(EventDraft("participant.left", "a", "a1", {}))  # 7

    def seqs(**kw: object) -> list[int]:
        return [e.seq for e in store.since(0, **kw)]  # type: ignore[arg-type]

    assert seqs(stream_id="a") == [1, 2, 4, 7]
    assert seqs(participant_id="a1") == [2, 4, 7]
    assert seqs(types={"stream.state"}) == [1, 5]
    assert seqs(types={EventType.STREAM_STATE, EventType.SERVICE_DEGRADED}) == [1, 5, 6]
    assert seqs(stream_id="a", types={"participant.joined", "participant.left"}) == [2, 7]
    assert seqs(stream_id="b", participant_id="a1") == []
    assert seqs(types=set()) == []
    assert [e.seq for e in store.since(2, stream_id="a", limit=1)] == [4]
    with pytest.raises(ValueError):
        store.since(0, types={"no.such.type"})


def test_malformed_events_are_refused_and_take_no_seq(store: EventStore) -> None:
    bad = [
        ("stream.state", "s1", None, {"state": "exploded"}),  # unknown state
        ("stream.state", None, None, state()),  # stream.state needs a stream
        ("participant.joined", "s1", None, {}),  # participant events need a participant
        ("participant.score", "s1", "p1", {"p_fake": 1.5}),  # not a probability
        ("participant.score", "s1", "p1", {"p_fake": float("nan")}),  # NaN must never read as a score
        ("alert.raised", "s1", "p1", {**raised("a"), "typo_field": 1}),  # producer typo
        ("no.such.type", "s1", None, {}),
    ]
    for args in bad:
        with pytest.raises(pydantic.ValidationError):
            store.append(EventDraft(*args))
    assert store.last_seq() == 0
    assert store.append(EventDraft("stream.state", "s1", None, state())).seq == 1


def test_append_many_commits_a_batch_and_isolates_bad_items(store: EventStore) -> None:
    store.append(EventDraft("alert.raised", "s1", "p1", raised("dup")))  # 1
    results = store.append_many([
        EventDraft("stream.state", "s1", None, state("live")),
        EventDraft("alert.raised", "s1", "p1", raised("dup")),  # already raised
        EventDraft("participant.score", "s1", "p1", {"p_fake": 2.0}),  # invalid
        EventDraft("alert.cleared", "s1", "p1", cleared("never-raised")),
        EventDraft("alert.cleared", "s1", "p1", cleared("dup")),
    ])
    assert isinstance(results[0], Event) and results[0].seq == 2
    assert isinstance(results[1], AlertConflict)
    assert isinstance(results[2], pydantic.ValidationError)
    assert isinstance(results[3], AlertConflict)
    assert isinstance(results[4], Event) and results[4].seq == 3  # failed items leave no hole in seq
    assert [e.type for e in store.since(0)] == [EventType.ALERT_RAISED, EventType.STREAM_STATE,
                                                EventType.ALERT_CLEARED]
    with pytest.raises(AlertConflict):
        store.append(EventDraft("alert.cleared", "s1", "p1", cleared("dup")))  # already cleared


def test_alerts_history_is_paged_newest_first(store: EventStore) -> None:
    ids = [f"alert{i:02d}" for i in range(23)]
    for i, aid in enumerate(ids):
        store.append(EventDraft("alert.raised", f"s{i % 2}", f"p{i}", raised(aid, score=0.9), ts=100.0 + i))
        # interleaved non-alert events
        store.append(EventDraft("participant.score", f"s{i % 2}", f"p{i}", {"p_fake": 0.9}))
    for aid in ids[::3]:
        store.append(EventDraft("alert.cleared", "s0", None, cleared(aid), ts=500.0))

    seen: list[str] = []
    before = None
    pages = 0
    while True:
        page = store.alerts(before=before, limit=10)
        seen += [a.alert_id for a in page.items]
        pages += 1
        if page.next_before is None:
            break
        before = page.next_before
    assert pages == 3 and seen == ids[::-1]

    first = store.alerts(limit=10).items[0]
    assert first.alert_id == "alert22" and first.raised_ts == 122.0 and first.score == 0.9
    assert first.smoothed == 0.8 and first.threshold == 0.7 and first.participant_id == "p22"
    assert store.alerts(limit=23).next_before is None  # exactly one full page: no phantom next page

    open_ids = [a.alert_id for a in store.alerts(limit=100, open_only=True).items]
    assert open_ids == [aid for aid in ids[::-1] if aid not in ids[::3]]
    assert all(a.stream_id == "s1" for a in store.alerts(limit=100, stream_id="s1").items)
    assert len(store.alerts(limit=100, stream_id="s1").items) == 11

    done = store.get_alert("alert03")
    assert done is not None and done.cleared_ts == 500.0 and done.clear_reason == "score below clear threshold"
    assert done.cleared_seq is not None and done.cleared_seq > done.raised_seq
    assert store.get_alert("nope") is None


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_evidence_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    jpeg, png = _image_bytes("JPEG"), _image_bytes("PNG")
    aid = new_alert_id()
    with EventStore(path) as s:
        # Evidence first, then the alert: a client fetching the evidence URL on alert.raised always finds it.
        s.put_evidence(aid, EvidenceKind.CROP, "image/jpeg", jpeg)
        s.put_evidence(aid, "heatmap", "image/png", png)
        s.append(EventDraft("alert.raised", "s1", "p1", raised(aid)))
        alert = s.get_alert(aid)
        assert alert is not None and alert.evidence == [EvidenceKind.CROP, EvidenceKind.HEATMAP]
        assert s.get_evidence(aid, "crop") is not None
        with pytest.raises(ValueError):
            s.put_evidence(aid, "crop", "image/jpeg", b"")
        with pytest.raises(ValueError):
            s.put_evidence(aid, "thumbnail", "image/jpeg", jpeg)
    with EventStore(path) as s:  # persisted
        crop = s.get_evidence(aid, EvidenceKind.CROP)
        heat = s.get_evidence(aid, "heatmap")
        assert crop is not None and crop.mime == "image/jpeg" and crop.data == jpeg
        assert heat is not None and heat.mime == "image/png" and heat.data == png
        assert Image.open(io.BytesIO(crop.data)).format == "JPEG"
        assert s.get_evidence("other", "crop") is None
        s.put_evidence(aid, "crop", "image/jpeg", png)  # replace
        assert s.get_evidence(aid, "crop").data == png  # type: ignore[union-attr]


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = EventStore(tmp_path / "e.sqlite3")
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError):
        s.append(EventDraft("stream.state", "s1", None, state()))
    with pytest.raises(RuntimeError):
        s.since(0)


# -- schema ----------------------------------------------------------------------------------------------------


def test_json_schema_validates_every_event_type_and_rejects_malformed(store: EventStore) -> None:
    schema = event_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA_VERSION in schema["$id"]
    validator = jsonschema.Draft202012Validator(schema)

    events = one_of_each(store)
    # feed.gap is never stored: the hub makes it for one subscriber (see the retention tests).
    gap_data = {"from_seq": 8, "to_seq": 9, "reason": "retention"}
    events.append(Event(seq=9, ts=1.0, type=EventType.FEED_GAP, data=gap_data))
    assert {e.type for e in events} == set(EventType)  # every type is covered
    for ev in events:
        wire = json.loads(ev.model_dump_json())  # exactly what the WebSocket sends
        assert set(wire) == {"seq", "ts", "type", "stream_id", "participant_id", "data"}
        validator.validate(wire)
        assert ev.typed().data.model_dump(mode="json") == ev.data
    # A later minor version may add fields: consumers of 1.0 still accept them.
    ok = json.loads(events[0].model_dump_json())
    validator.validate({**ok, "data": {**ok["data"], "added_in_1_1": True}})

    good = json.loads(events[3].model_dump_json())  # alert.raised
    malformed = [
        {**good, "type": "alert.exploded"},
        {**good, "seq": "7"},
        {**good, "seq": 0},
        {k: v for k, v in good.items() if k != "data"},
        {**good, "data": {**good["data"], "score": 1.2}},
        {**good, "data": {k: v for k, v in good["data"].items() if k != "alert_id"}},
        {**good, "data": {**good["data"], "evidence": {"video": "/x"}}},
        {**good, "stream_id": None},
        {**json.loads(events[1].model_dump_json()), "participant_id": None},  # participant.joined without one
        {**json.loads(events[0].model_dump_json()), "data": {"state": "exploded"}},
        {**json.loads(events[-1].model_dump_json()), "stream_id": "s1"},  # feed.gap is about the whole feed
        {**json.loads(events[-1].model_dump_json()), "data": {"from_seq": 0, "to_seq": 9, "reason": "retention"}},
    ]
    for bad in malformed:
        assert not validator.is_valid(bad), bad


def test_committed_schema_file_matches_generated() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render_event_json_schema(), (
        "event.schema.json is stale: run `python -m streamguard.events.schema` and bump SCHEMA_VERSION if the "
        "change is visible to clients"
    )
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))["$id"].endswith(SCHEMA_VERSION)


# -- hub -------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_publish_writes_before_delivery_and_returns_seq(store: EventStore) -> None:
    hub = EventHub(store)
    sub = hub.subscribe()  # live only
    ev = await hub.publish(EventDraft(EventType.STREAM_STATE, "s1", None, StreamStateData(state=StreamState.LIVE)))
    assert ev.seq == 1 and ev.data["state"] == "live"
    got = await sub.get(timeout=5)
    assert got is ev
    assert [e.seq for e in store.since(0)] == [1]  # committed, and by then delivered
    assert await sub.get(timeout=0.05) is None  # idle: the handler's cue to ping
    with pytest.raises(pydantic.ValidationError):
        hub.publish_nowait(EventDraft("participant.joined", "s1", None, {}))  # raises in the caller, never queued
    await hub.close()
    with pytest.raises(HubClosed) as end:
        await sub.get()
    assert end.value.close_code == 1001 and end.value.last_seq == 1
    with pytest.raises(RuntimeError):
        await hub.publish(EventDraft("stream.state", "s1", None, state()))


@pytest.mark.asyncio
async def test_reconnect_with_since_gets_missed_events_once_in_order_then_live(store: EventStore) -> None:
    hub = EventHub(store, replay_page_size=4)
    for i in range(10):
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": i / 10}))
    sub = hub.subscribe(since=3)
    missed = await collect(sub, 7)
    assert [e.seq for e in missed] == list(range(4, 11))
    assert not sub.replaying or sub.last_seq == 10
    live = [await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.5})) for _ in range(3)]
    got = await collect(sub, 3)
    assert [e.seq for e in got] == [e.seq for e in live] == [11, 12, 13]
    assert await sub.get(timeout=0.05) is None  # nothing twice
    await hub.close()


@pytest.mark.asyncio
async def test_replay_and_live_race_has_no_gap_and_no_duplicate(store: EventStore) -> None:
    """Clients join at random points while a publisher runs flat out, with tiny replay pages and queues.

    Each reads slowly now and then, so its buffer overflows during replay and live. Half of them catch up from the
    store (the default); the other half have no grace (slow_consumer_grace_s=0), are dropped at a live overflow and
    reconnect with since=last seq, as a real client does. Across all of that each must see exactly the matching
    events after its first `since`, in seq order, once.
    """
    rng = random.Random(7)
    hub = EventHub(store, replay_page_size=5, client_queue_size=8)
    total = 600
    published: list[Event] = []
    clients: list[tuple[int, str | None, list[Event]]] = []
    stats = {"drops": 0, "replay_overflows": 0}

    async def publisher() -> None:
        for i in range(total):
            stream = f"s{i % 3}"
            if i % 4 == 0:  # bursts queued without awaiting: they share a group commit
                draft = EventDraft("participant.score", stream, "p1", {"p_fake": 0.5})
                futs = [hub.publish_nowait(draft) for _ in range(3)]
                published.extend(await asyncio.gather(*futs))
            else:
                published.append(await hub.publish(EventDraft("participant.score", stream, "p1", {"p_fake": 0.5})))
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def client(join_after: int, stream_id: str | None, grace_s: float | None) -> None:
        while len(published) < join_after:
            await asyncio.sleep(0)
        since = rng.randint(0, len(published))
        out: list[Event] = []
        clients.append((since, stream_id, out))
        cursor = since
        while True:
            sub = hub.subscribe(since=cursor, stream_id=stream_id, grace_s=grace_s)
            try:
                async for ev in sub:  # ends quietly on hub.close()
                    out.append(ev)
                    cursor = ev.seq
                    if rng.random() < 0.2:
                        await asyncio.sleep(0.001)
                return
            except SlowConsumer as end:
                assert end.last_seq == cursor  # the resume point is the last event it got
                stats["drops"] += 1
            finally:
                stats["replay_overflows"] += sub._overflows

    pub = asyncio.create_task(publisher())
    tasks = [asyncio.create_task(client(rng.randint(0, total), rng.choice([None, "s0", "s2"]), (0.0, None)[i % 2]))
             for i in range(12)]
    await pub
    every = store.since(0, limit=10_000)
    assert [e.seq for e in published] == [e.seq for e in every]  # seq order == publish order, all committed

    def expected(since: int, stream_id: str | None) -> list[int]:
        return [e.seq for e in every if e.seq > since and (stream_id is None or e.stream_id == stream_id)]

    async with asyncio.timeout(60):
        while len(clients) < len(tasks) or any(len(out) < len(expected(s, f)) for s, f, out in clients):
            await asyncio.sleep(0.01)
    await hub.close()
    await asyncio.gather(*tasks)
    for since, stream_id, out in clients:
        assert [e.seq for e in out] == expected(since, stream_id), (since, stream_id)
    assert stats["replay_overflows"] > 0  # the buffer-clear-during-replay path ran


@pytest.mark.asyncio
async def test_event_seen_by_replay_before_its_delivery_is_not_sent_twice(store: EventStore) -> None:
    """The interleaving the race test hits only sometimes, forced: commit, replay reads it, *then* delivery."""
    hub = EventHub(store)
    write = store.append_many

    def commit_then_stall(drafts: list[EventDraft]) -> list[Event | Exception]:
        out = write(drafts)
        time.sleep(0.2)  # committed and visible, delivery not yet scheduled
        return out

    store.append_many = commit_then_stall  # type: ignore[method-assign]
    fut = hub.publish_nowait(EventDraft("stream.state", "s1", None, state()))
    await asyncio.sleep(0.05)
    sub = hub.subscribe(since=0)
    assert (await sub.get(timeout=1)).seq == 1  # type: ignore[union-attr]  # from replay, which has caught up
    assert not sub.replaying
    await fut  # now the live delivery arrives
    assert await sub.get(timeout=0.1) is None
    await hub.close()


@pytest.mark.asyncio
async def test_burst_larger_than_the_queue_reaches_a_prompt_reader_once_in_order(store: EventStore) -> None:
    """One group commit hands a subscriber more events than its queue holds: it catches up from the store.

    The reported bug: client_queue_size 32 and a commit batch of hundreds dropped a client that read at once.
    """
    hub = EventHub(store, client_queue_size=32, slow_consumer_grace_s=60)  # generous: a loaded CI box is slow
    live = hub.subscribe()
    filtered = hub.subscribe(stream_id="s1", queue_size=8)
    replaying = hub.subscribe(since=0, queue_size=8)  # overflows while still replaying, then again live
    got: dict[str, list[Event]] = {"live": [], "filtered": [], "replaying": []}

    async def read(sub: Subscription, out: list[Event]) -> None:
        async for ev in sub:  # reads as soon as an event is there; ends when the hub closes
            out.append(ev)

    readers = [asyncio.create_task(read(s, got[k])) for k, s in
               (("live", live), ("filtered", filtered), ("replaying", replaying))]
    published: list[Event] = []
    for _ in range(3):
        # Holding the store's write lock while queueing makes the writer commit them in batches of max_batch
        # (512): whatever the scheduling, the loop is handed hundreds of events in one callback.
        with store._wlock:
            futs = [hub.publish_nowait(EventDraft("participant.score", f"s{i % 2}", "p1", {"p_fake": 0.5}))
                    for i in range(600)]
        published += await asyncio.gather(*futs)
        # and a single one in between
        published.append(await hub.publish(EventDraft("stream.state", "s1", None, state())))
    n = len(published)
    n_s1 = sum(1 for e in published if e.stream_id == "s1")

    async with asyncio.timeout(60):  # the filtered reader too: it may still be catching up from the store
        while len(got["live"]) < n or len(got["replaying"]) < n or len(got["filtered"]) < n_s1:
            await asyncio.sleep(0.01)
    assert [e.seq for e in got["live"]] == list(range(1, n + 1))  # everything, in order, exactly once
    assert [e.seq for e in got["replaying"]] == list(range(1, n + 1))
    assert [e.seq for e in got["filtered"]] == [e.seq for e in published if e.stream_id == "s1"]
    assert hub.dropped_subscribers == 0 and all(s.ended is None for s in (live, filtered, replaying))
    assert hub.catch_ups >= 3 and live._overflows > 0  # each fell back to the store at least once
    # Caught up: live again, no clock running. The reader may still be in its last store read (the one that finds
    # nothing more and ends the replay) when the events are all in: wait for that read, do not race it.
    async with asyncio.timeout(10):
        while live.replaying:
            await asyncio.sleep(0.01)
    assert live._deadline is None
    # Live again: the next event comes through the buffer.
    ev = await hub.publish(EventDraft("stream.state", "s1", None, state("stalled")))
    async with asyncio.timeout(10):
        while len(got["live"]) <= n:
            await asyncio.sleep(0.01)
    assert got["live"][-1] is ev
    await hub.close()
    await asyncio.gather(*readers)


@pytest.mark.asyncio
async def test_reader_that_never_reads_is_closed_with_4008_and_others_are_unaffected(store: EventStore) -> None:
    hub = EventHub(store, client_queue_size=16, slow_consumer_grace_s=60)
    slow = hub.subscribe(grace_s=0.05)  # never reads
    fast = hub.subscribe(queue_size=4)  # reads promptly, yet falls behind at every burst and catches up
    received: list[Event] = []

    async def read_fast() -> None:
        async for ev in fast:
            received.append(ev)

    reader = asyncio.create_task(read_fast())
    assert await slow.get(timeout=0.01) is None  # nothing published yet
    worst, n = 0.0, 0
    async with asyncio.timeout(60):
        while n < 200 or slow.ended is None:  # ended at the first event offered after its grace ran out
            t = time.perf_counter()
            if n % 20 == 0:
                await asyncio.gather(*[hub.publish_nowait(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.5}))
                                       for _ in range(20)])
                n += 20
            else:
                await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.5}))
                n += 1
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.002)  # the fast reader keeps up
            assert len(slow._buffer) <= 16  # behind, it holds no more than its queue
    assert hub.subscriber_count == 1 and hub.dropped_subscribers == 1
    assert slow.ended is not None and len(slow._buffer) == 0  # its memory is freed at once
    with pytest.raises(SlowConsumer) as end:
        await slow.get()
    assert end.value.close_code == CLOSE_SLOW_CONSUMER == 4008
    assert "since=0" in end.value.reason and end.value.last_seq == 0  # it subscribed when the log was empty
    assert len(end.value.reason) <= 120  # what the API sends as the close reason, resume hint included
    assert worst < 5.0  # a consumer behind never made publish wait for it (a commit is milliseconds)

    async with asyncio.timeout(30):
        while len(received) < n:
            await asyncio.sleep(0.01)
    assert [e.seq for e in received] == list(range(1, n + 1))
    assert fast.ended is None

    # The dropped client resumes with since and misses nothing.
    again = hub.subscribe(since=0)
    assert [e.seq for e in await collect(again, n)] == list(range(1, n + 1))
    await hub.close()
    await reader


@pytest.mark.asyncio
async def test_slow_consumer_last_seq_is_its_resume_point(store: EventStore) -> None:
    hub = EventHub(store, client_queue_size=4, slow_consumer_grace_s=0)  # 0: dropped at the first overflow
    sub = hub.subscribe()
    await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    assert (await sub.get(timeout=5)).seq == 1  # type: ignore[union-attr]
    for _ in range(5):
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    with pytest.raises(SlowConsumer) as end:
        await sub.get()
    assert end.value.last_seq == 1 and "since=1" in end.value.reason
    resumed = hub.subscribe(since=end.value.last_seq)
    assert [e.seq for e in await collect(resumed, 5)] == [2, 3, 4, 5, 6]

    # A live-only subscriber dropped before it got anything resumes from where it joined, not from 0.
    late = hub.subscribe(queue_size=2)
    for _ in range(3):
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    with pytest.raises(SlowConsumer) as end:
        await late.get()
    assert end.value.last_seq == 6
    assert [e.seq for e in await collect(hub.subscribe(since=end.value.last_seq), 3)] == [7, 8, 9]

    # With a grace period: it falls behind, reads a little from the store, stops, and is dropped after what it read.
    stalled = hub.subscribe(grace_s=0.5)
    with store._wlock:  # one commit batch, handed over in one go: no time passes between its events here
        futs = [hub.publish_nowait(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1})) for _ in range(6)]
    await asyncio.gather(*futs)  # 10..15: over its queue of 4
    assert [e.seq for e in await collect(stalled, 2)] == [10, 11]  # from the store
    assert stalled.ended is None
    async with asyncio.timeout(30):
        while stalled.ended is None:
            await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
            await asyncio.sleep(0.01)
    with pytest.raises(SlowConsumer) as end:
        await stalled.get()
    assert end.value.last_seq == 11 and "since=11" in end.value.reason
    last = store.last_seq()
    assert [e.seq for e in await collect(hub.subscribe(since=11), last - 11)] == list(range(12, last + 1))
    await hub.close()


@pytest.mark.asyncio
async def test_history_replay_is_not_lag_but_falling_behind_after_it_is(store: EventStore) -> None:
    for _ in range(50):
        store.append(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    hub = EventHub(store, client_queue_size=4, replay_page_size=10)
    sub = hub.subscribe(since=0, grace_s=0.05)
    assert (await sub.get(timeout=5)).seq == 1  # type: ignore[union-attr]
    for _ in range(10):  # live events overflow its queue while it is in its history
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    await asyncio.sleep(0.1)  # past its grace, but still in history (seq < 50): no clock is running
    await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
    assert sub.ended is None and sub._deadline is None
    assert [e.seq for e in await collect(sub, 49)] == list(range(2, 51))  # history done: the clock starts
    assert sub._deadline is not None
    async with asyncio.timeout(30):
        while sub.ended is None:  # and, not reading any more, it is dropped
            await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))
            await asyncio.sleep(0.01)
    assert isinstance(sub.ended, SlowConsumer) and sub.ended.last_seq == 50
    await hub.close()


@pytest.mark.asyncio
async def test_filters_and_opt_in_types(store: EventStore) -> None:
    hub = EventHub(store)
    alerts_only = hub.subscribe(since=0, types={"alert.raised", "alert.cleared"}, stream_id="s1")
    p2 = hub.subscribe(participant_id="p2")
    await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.9}))
    await hub.publish(EventDraft("alert.raised", "s1", "p1", raised("A")))
    await hub.publish(EventDraft("alert.raised", "s2", "p2", raised("B")))
    await hub.publish(EventDraft("participant.score", "s2", "p2", {"p_fake": 0.9}))
    await hub.publish(EventDraft("alert.cleared", "s1", "p1", cleared("A")))
    got = await collect(alerts_only, 2)
    assert [(e.type, e.data["alert_id"]) for e in got] == [
        (EventType.ALERT_RAISED, "A"),
        (EventType.ALERT_CLEARED, "A"),
    ]
    assert [e.seq for e in await collect(p2, 2)] == [3, 4]
    assert await alerts_only.get(timeout=0.05) is None
    await hub.close()


@pytest.mark.asyncio
async def test_since_beyond_the_store_is_refused(store: EventStore) -> None:
    hub = EventHub(store)
    await hub.publish(EventDraft("stream.state", "s1", None, state()))
    sub = hub.subscribe(since=50)  # e.g. a client of a store that was reset
    with pytest.raises(CursorAhead) as end:
        await sub.get(timeout=1)
    assert end.value.close_code == 4409 and "since=0" in end.value.reason
    ok = hub.subscribe(since=1)  # caught up exactly: no replay, then live
    assert await ok.get(timeout=0.05) is None
    await hub.publish(EventDraft("stream.state", "s1", None, state("stalled")))
    assert (await ok.get(timeout=5)).seq == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        hub.subscribe(since=-1)
    await hub.close()


@pytest.mark.asyncio
async def test_close_flushes_queued_events_and_ends_subscriptions(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    store = EventStore(path)  # FULL: the production setting
    hub = EventHub(store)
    sub = hub.subscribe(since=0)
    futs = [hub.publish_nowait(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1})) for _ in range(300)]
    got: list[Event] = []

    async def read() -> None:
        async for ev in sub:  # ends quietly: the hub closed
            got.append(ev)

    reader = asyncio.create_task(read())
    await hub.close()  # without awaiting the futures: close must flush them
    await asyncio.wait_for(reader, 5)
    assert all(f.done() and not f.exception() for f in futs)
    assert [f.result().seq for f in futs] == list(range(1, 301))
    # A reader gets every event before the end, whether it was replaying or live when the close came.
    assert [e.seq for e in got] == list(range(1, 301))
    assert isinstance(sub.ended, HubClosed) and sub.ended.last_seq == 300
    store.close()
    with EventStore(path) as reopened:
        assert reopened.last_seq() == 300


@pytest.mark.asyncio
async def test_the_last_events_reach_a_live_reader_before_the_close(store: EventStore) -> None:
    """SIGTERM: the last participant.left and stream.state closed were delivered to the subscriber's buffer, then
    the close ended it and cleared the buffer: the client got them only after it resumed. They come first now."""
    hub = EventHub(store)
    live = hub.subscribe()
    idle = hub.subscribe()  # nobody reads it: it is ended after the drain timeout, and resumes with since
    last = [await hub.publish(EventDraft("participant.left", "s1", "p1", {"reason": "server shutdown"})),
            await hub.publish(EventDraft("stream.state", "s1", None, state("closed")))]
    closing = asyncio.create_task(hub.close(drain_timeout_s=0.5))
    await asyncio.sleep(0.05)  # the close has begun before the reader comes back for its events
    got = [ev async for ev in live]
    await closing
    assert got == last
    assert isinstance(live.ended, HubClosed) and live.ended.last_seq == last[-1].seq
    assert isinstance(idle.ended, HubClosed) and idle.ended.last_seq == 0  # it handed out nothing
    assert hub.subscriber_count == 0


@pytest.mark.asyncio
async def test_store_failure_fails_publish_not_the_hub(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3", synchronous="NORMAL")
    hub = EventHub(store)
    await hub.publish(EventDraft("alert.raised", "s1", "p1", raised("X")))
    with pytest.raises(AlertConflict):
        await hub.publish(EventDraft("alert.raised", "s1", "p1", raised("X")))
    assert (await hub.publish(EventDraft("stream.state", "s1", None, state()))).seq == 2  # writer thread still alive
    await hub.close()
    store.close()


# -- retention -------------------------------------------------------------------------------------------------


def test_prune_deletes_the_oldest_events_with_their_cleared_alerts_and_evidence(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    jpeg = _image_bytes("JPEG")
    old, new, cutoff = 1_000.0, 2_000.0, 1_500.0
    with EventStore(path, synchronous="NORMAL") as s:
        for aid in ("gone", "open", "late"):
            s.put_evidence(aid, "crop", "image/jpeg", jpeg)
        s.append(EventDraft("alert.raised", "s1", "p1", raised("gone"), ts=old))  # 1
        s.append(EventDraft("alert.cleared", "s1", "p1", cleared("gone"), ts=old))  # 2
        s.append(EventDraft("alert.raised", "s1", "p1", raised("open"), ts=old))  # 3
        s.append(EventDraft("alert.raised", "s1", "p2", raised("late"), ts=old))  # 4
        s.append(EventDraft("stream.state", "s1", None, state(), ts=new))  # 5: a newer ts (the producer's clock)...
        # 6: ...keeps this older one: only a prefix goes
        s.append(EventDraft("stream.state", "s1", None, state(), ts=old))
        s.append(EventDraft("alert.cleared", "s1", "p2", cleared("late"), ts=new))  # 7
        assert s.pruned_through() == 0

        assert s.prune(before_ts=cutoff) == 4
        assert [e.seq for e in s.since(0)] == [5, 6, 7]
        assert s.pruned_through() == 4
        assert s.get_alert("gone") is None and s.get_evidence("gone", "crop") is None  # both its events are gone
        assert s.get_alert("open") is not None and s.get_evidence("open", "crop") is not None  # open: current state
        assert s.get_alert("late") is not None and s.get_evidence("late", "crop") is not None  # cleared at 7, kept
        # can still be cleared
        assert s.append(EventDraft("alert.cleared", "s1", "p1", cleared("open"), ts=new)).seq == 8
        assert s.prune(before_ts=cutoff) == 0  # nothing more is due

        # By count, at most `limit` events per call: keep the last 2 seqs.
        assert s.prune(keep_last=2, limit=1) == 1
        while s.prune(keep_last=2, limit=1):
            pass
        assert [e.seq for e in s.since(0)] == [7, 8]
        page = s.page(2)
        assert page.pruned_through == 6 and [e.seq for e in page.events] == [7, 8]
        assert s.get_alert("open") is not None  # raised at 3 (gone), cleared at 8 (kept)

        assert s.prune(keep_last=0) == 2  # everything
        assert s.since(0) == [] and s.alerts().items == []
        assert s.get_evidence("open", "crop") is None and s.get_evidence("late", "crop") is None
        assert s.pruned_through() == s.last_seq() == 8
        with pytest.raises(ValueError):
            s.prune(before_ts=cutoff, limit=0)
        with pytest.raises(ValueError):
            s.prune(keep_last=-1)
    with EventStore(path) as s:  # the horizon persists, and seqs go on after the deleted ones
        assert s.pruned_through() == 8
        assert s.append(EventDraft("stream.state", "s1", None, state())).seq == 9
        assert s.pruned_through() == 8 and s.page(0).pruned_through == 8


@pytest.mark.asyncio
async def test_hub_prunes_by_age_and_by_count_on_its_writer_thread(store: EventStore) -> None:
    now = time.time()
    for i in range(10):
        store.append(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}, ts=now - 40 * DAY_S + i))
    for _ in range(5):
        store.append(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}, ts=now - 60))
    hub = EventHub(store)  # no retention: keeps everything
    assert await hub.prune() == 0
    assert len(store.since(0)) == 15
    await hub.close()

    hub = EventHub(store, retention_days=30)  # a first pass runs at start
    await hub.prune()  # and this one after it: either way, the 40-day-old events are gone
    assert [e.seq for e in store.since(0)] == list(range(11, 16))
    await hub.close()

    # By count, on its own every prune_interval_s, while events are published.
    hub = EventHub(store, max_events=3, prune_interval_s=0.05)
    for _ in range(5):
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))  # 16..20
    async with asyncio.timeout(30):
        while store.pruned_through() < 17:
            await asyncio.sleep(0.02)
    assert [e.seq for e in store.since(0)] == [18, 19, 20]
    # prune() runs after everything queued before it.
    futs = [hub.publish_nowait(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1})) for _ in range(4)]  # 21-24
    await hub.prune()
    assert all(f.done() for f in futs)
    assert [e.seq for e in store.since(0)] == [22, 23, 24]
    await hub.close()


@pytest.mark.asyncio
async def test_resume_older_than_retention_gets_a_feed_gap_first(store: EventStore) -> None:
    now = time.time()
    for _ in range(10):
        store.append(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}, ts=now - 40 * DAY_S))
    for _ in range(5):
        store.append(EventDraft("stream.state", "s1", None, state(), ts=now))
    hub = EventHub(store, retention_days=30)
    await hub.prune()
    validator = jsonschema.Draft202012Validator(event_json_schema())

    sub = hub.subscribe(since=3)  # the client last saw seq 3; 4..10 are gone
    got = await collect(sub, 6)
    gap = got[0]
    assert gap.type is EventType.FEED_GAP and gap.seq == 10
    assert gap.data == {"from_seq": 4, "to_seq": 10, "reason": "retention"}
    validator.validate(json.loads(gap.model_dump_json()))  # a documented message of the schema
    assert [e.seq for e in got[1:]] == [11, 12, 13, 14, 15]
    await hub.publish(EventDraft("stream.state", "s1", None, state("stalled")))
    assert (await sub.get(timeout=5)).seq == 16  # type: ignore[union-attr]  # then live, as usual

    # Sent whatever the filters: the deleted events may have matched them.
    alerts = hub.subscribe(since=0, types={"alert.raised"})
    first = await alerts.get(timeout=5)
    assert first is not None and first.type is EventType.FEED_GAP and first.data["from_seq"] == 1
    assert await alerts.get(timeout=0.05) is None
    # Resuming after the gap (its seq is the resume point) reports nothing again.
    assert sub.last_seq == 16 and gap.seq == 10
    assert [e.seq for e in await collect(hub.subscribe(since=gap.seq), 6)] == list(range(11, 17))

    # feed.gap is the hub's alone.
    with pytest.raises(ValueError):
        hub.publish_nowait(EventDraft("feed.gap", None, None, {"from_seq": 1, "to_seq": 2, "reason": "retention"}))
    with pytest.raises(ValueError):
        store.append(EventDraft("feed.gap", None, None, {"from_seq": 1, "to_seq": 2, "reason": "retention"}))
    assert store.last_seq() == 16
    await hub.close()


@pytest.mark.asyncio
async def test_subscriber_catching_up_past_the_retention_horizon_gets_a_gap(store: EventStore) -> None:
    hub = EventHub(store, client_queue_size=2, max_events=5)
    sub = hub.subscribe(grace_s=600)  # live, on an empty log
    for _ in range(20):
        await hub.publish(EventDraft("participant.score", "s1", "p1", {"p_fake": 0.1}))  # it falls behind at the third
    assert sub.replaying and sub.ended is None
    await hub.prune()  # keeps 16..20: what it was about to catch up on from the store is partly gone
    got = await collect(sub, 6)
    assert got[0].type is EventType.FEED_GAP and got[0].data == {"from_seq": 1, "to_seq": 15, "reason": "retention"}
    assert [e.seq for e in got[1:]] == [16, 17, 18, 19, 20]
    assert await sub.get(timeout=0.05) is None and not sub.replaying
    await hub.close()


@pytest.mark.asyncio
async def test_failed_pruning_is_reported_and_does_not_stop_publishing(store: EventStore) -> None:
    hub = EventHub(store, max_events=2)
    prune = store.prune

    def locked(**kw: object) -> int:
        raise sqlite3.OperationalError("database is locked")

    store.prune = locked  # type: ignore[method-assign,assignment]
    with pytest.raises(sqlite3.OperationalError):
        await hub.prune()
    for _ in range(4):
        await hub.publish(EventDraft("stream.state", "s1", None, state()))  # the writer thread goes on
    store.prune = prune  # type: ignore[method-assign]
    assert await hub.prune() == 2
    assert [e.seq for e in store.since(0)] == [3, 4]
    await hub.close()


def test_evidence_of_an_alert_never_published_is_pruned_after_an_hour(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "events.sqlite3"
    jpeg = _image_bytes("JPEG")
    with EventStore(path, synchronous="NORMAL") as s:
        for aid in ("ghost", "fresh-ghost", "kept"):
            s.put_evidence(aid, "crop", "image/jpeg", jpeg)
        s.append(EventDraft("alert.raised", "s1", "p1", raised("kept")))
    with sqlite3.connect(path) as db:  # stored two hours ago; the process died before publishing "ghost"
        db.execute("UPDATE evidence SET stored_ts = stored_ts - 7200 WHERE alert_id IN ('ghost', 'kept')")
    with EventStore(path, synchronous="NORMAL") as s:
        assert s.prune() == 0  # no event was due, but the orphan goes
        assert s.get_evidence("ghost", "crop") is None
        assert s.get_evidence("fresh-ghost", "crop") is not None  # its alert may still be on its way
        assert s.get_evidence("kept", "crop") is not None  # its alert exists


def test_a_layout_1_store_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "events.sqlite3"
    with EventStore(path) as s:
        s.put_evidence("a1", "crop", "image/jpeg", _image_bytes("JPEG"))
    with sqlite3.connect(path) as db:  # what layout 1 looked like: evidence without stored_ts
        db.executescript("ALTER TABLE evidence DROP COLUMN stored_ts; PRAGMA user_version=1;")
    with EventStore(path) as s:
        assert s.get_evidence("a1", "crop") is not None
        assert s.prune() == 0 and s.get_evidence("a1", "crop") is None  # an old orphan: stored_ts 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == DB_SCHEMA_VERSION == 4


def test_presence_is_kept_with_the_log_and_rebuilt_from_it_for_a_layout_2_store(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "events.sqlite3"
    with EventStore(path, synchronous="NORMAL") as s:
        for kind, sid, pid in [("joined", "cam", "cam/p1"), ("joined", "whip:a", "alice"), ("left", "cam", "cam/p1"),
                               ("joined", "cam", "cam/p2"), ("left", "whip:a", "alice"), ("joined", "whip:b", "alice")]:
            s.append(EventDraft(f"participant.{kind}", sid, pid, {}))
        present = [(p.stream_id, p.participant_id) for p in s.present()]
    assert present == [("cam", "cam/p2"), ("whip:b", "alice")]  # joined, not (yet) left, by join order
    with sqlite3.connect(path) as db:  # layout 2 had no presence table, and alerts without their label
        db.executescript("DROP TABLE presence; ALTER TABLE alerts DROP COLUMN label; PRAGMA user_version=2;")
    with EventStore(path, synchronous="NORMAL") as s:
        assert [(p.stream_id, p.participant_id) for p in s.present()] == present
        s.append(EventDraft("alert.raised", "cam", "cam/p2", {**raised("a1"), "label": "Lobby guest"}))
        assert s.get_alert("a1").label == "Lobby guest"


def test_alerts_keep_the_raising_faces_size_and_a_layout_3_store_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "events.sqlite3"
    with EventStore(path, synchronous="NORMAL") as s:
        s.append(EventDraft("alert.raised", "cam", "cam/p1", {**raised("old"), "face_px": 52.5}))
        assert s.get_alert("old").face_px == 52.5
    with sqlite3.connect(path) as db:  # layout 3: alerts had no face_px
        db.executescript("ALTER TABLE alerts DROP COLUMN face_px; PRAGMA user_version=3;")
    with EventStore(path, synchronous="NORMAL") as s:
        assert s.get_alert("old").face_px is None  # not known for alerts raised before
        s.append(EventDraft("alert.raised", "cam", "cam/p2", {**raised("new"), "face_px": 181.0}))
        s.append(EventDraft("alert.raised", "cam", "cam/p3", raised("replayed")))  # no crop at hand: no size
        assert (s.get_alert("new").face_px, s.get_alert("replayed").face_px) == (181.0, None)
        with pytest.raises(ValueError):
            s.append(EventDraft("alert.raised", "cam", "cam/p4", {**raised("bad"), "face_px": -1}))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
