"""Cluster mode's parts one by one: its config, KV keys, placement (pure), and, against a real `nats-server -js`, the
event log (idempotent publishing through a frozen server), the hubs that materialise it, and the leases.

The whole cluster (3 instances, RTSP streams, kill -9, a NATS restart) is tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nats_helpers import NatsServer, log_messages, needs_nats, needs_nats_py

from streamguard.config import ClusterSettings, ConfigError, StreamSpec, load_config

SECRET = "hunter2-s3cret"


# --- config --------------------------------------------------------------------------------------------------------


def test_cluster_mode_is_off_by_default_and_on_with_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMGUARD_CLUSTER__NATS_URL", raising=False)
    assert not load_config().cluster.enabled
    monkeypatch.setenv("STREAMGUARD_CLUSTER__NATS_URL", f"nats://bob:{SECRET}@nats-1:4222, tls://{SECRET}@nats-2:4222")
    monkeypatch.setenv("STREAMGUARD_CLUSTER__INSTANCE_ID", "sg-1")
    cfg = load_config().cluster
    assert cfg.enabled and cfg.instance_id == "sg-1"
    assert cfg.servers == [f"nats://bob:{SECRET}@nats-1:4222", f"tls://{SECRET}@nats-2:4222"]
    assert cfg.redacted_url == "nats://***@nats-1:4222,tls://***@nats-2:4222"
    assert SECRET not in repr(cfg) and SECRET not in str(load_config())


@pytest.mark.parametrize(("url", "message"), [
    (f"http://bob:{SECRET}@nats:4222", "the scheme must be nats:// or tls://"),
    (f"nats://bob:{SECRET}@nats:99999", "is not a URL with a port in 1-65535"),
    (f"nats://bob:{SECRET}@:4222", "no host"),
    (f"nats://{SECRET}@nats:4222/path", "no path or query"),
    ("nats://a:4222,,nats://b:4222", "empty server in the list"),
])
def test_bad_nats_urls_are_refused_without_their_secret(monkeypatch: pytest.MonkeyPatch, url: str,
                                                         message: str) -> None:
    monkeypatch.setenv("STREAMGUARD_CLUSTER__NATS_URL", url)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert message in str(err.value) and "nats_url" in str(err.value)
    assert SECRET not in str(err.value)


def test_cluster_settings_refuse_what_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="heartbeat_s .* must be at most lease_ttl_s / 4"):
        ClusterSettings(lease_ttl_s=4, heartbeat_s=2)
    with pytest.raises(ValueError, match="instance_id"):
        ClusterSettings(instance_id="has space")
    with pytest.raises(ValueError, match="events_stream"):
        ClusterSettings(events_stream="a.b")
    monkeypatch.setenv("STREAMGUARD_CLUSTER__LEASE_TTL", "5")
    with pytest.raises(ConfigError, match="did you mean cluster.lease_ttl_s"):
        load_config()


def test_the_default_instance_id_is_the_host_name() -> None:
    import socket

    assert ClusterSettings().instance_id == socket.gethostname()[:64].strip(".-")


@needs_nats_py
def test_kv_keys_round_trip_stream_ids() -> None:
    from streamguard.cluster.names import key_of, stream_id_of

    for sid in ["cam-1", "whip:3f2a", "a.b:c_d-e", "x=y"]:
        key = key_of(sid)
        assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-="), key
        assert stream_id_of(key) == sid
    assert key_of("cam-1") == "cam-1"


# --- placement (pure) ----------------------------------------------------------------------------------------------


def _state(instance: str, owned: list[str]) -> Any:
    from streamguard.cluster.members import MemberState

    return MemberState(instance=instance, boot="b", started_at=0.0, owned=owned, streams=[], participants=[])


def _registration(sid: str, assigned: str, created_at: float) -> Any:
    from streamguard.cluster.registry import Registration

    return Registration(spec=StreamSpec(id=sid, url=f"rtsp://cam/{sid}"), created_at=created_at, assigned=assigned)


def _view(me: str, live: dict[str, list[str]], registry: dict[str, str], mine: list[str] | None = None,
          unowned_for: float = 0.0, grace_s: float = 5.0) -> Any:
    from streamguard.cluster.placement import View

    regs = {sid: _registration(sid, assigned, i) for i, (sid, assigned) in enumerate(registry.items())}
    return View(me=me, live={i: _state(i, owned) for i, owned in live.items()}, registry=regs,
                mine=frozenset(mine if mine is not None else live.get(me, [])),
                unowned_since=dict.fromkeys(registry, 100.0 - unowned_for), now=100.0, grace_s=grace_s)


@needs_nats_py
def test_new_streams_spread_over_the_least_loaded_instances() -> None:
    from streamguard.cluster.placement import holders, loads, place

    registry: dict[str, str] = {}
    for n in range(6):
        view = _view("a", {"a": [], "b": [], "c": []}, registry)
        registry[f"s{n}"] = place(view.live, loads(view, holders(view)))
    assert sorted(registry.values()) == ["a", "a", "b", "b", "c", "c"]


@needs_nats_py
def test_a_dead_instances_streams_split_between_the_live_ones_the_same_way_in_every_view() -> None:
    from streamguard.cluster.placement import to_acquire

    live = {"a": ["s0", "s1"], "b": ["s2", "s3"]}  # c (s4, s5) is gone: not in the live set
    registry = {"s0": "a", "s1": "a", "s2": "b", "s3": "b", "s4": "c", "s5": "c"}
    take_a = to_acquire(_view("a", live, registry))
    take_b = to_acquire(_view("b", live, registry))
    assert take_a == ["s4"] and take_b == ["s5"]  # one each, and never the same one


@needs_nats_py
def test_the_assigned_instance_gets_its_grace_and_running_streams_never_move() -> None:
    from streamguard.cluster.placement import to_acquire

    live = {"a": [], "b": ["s0"], "c": []}
    registry = {"s0": "a", "s1": "c"}  # s0 runs on b (taken over); s1 was placed on c, which is starting it
    assert to_acquire(_view("c", live, registry)) == ["s1"]
    assert to_acquire(_view("a", live, registry)) == []  # s0 runs (on b): a comes back and leaves it there
    assert to_acquire(_view("a", live, registry, unowned_for=4.0)) == []  # c within its grace
    assert to_acquire(_view("a", live, registry, unowned_for=6.0)) == ["s1"]  # c did not take it: a is least loaded
    assert to_acquire(_view("b", live, registry, unowned_for=6.0)) == []
    assert to_acquire(_view("b", live, registry, unowned_for=11.0)) == ["s1"]  # nobody did: anyone may


# --- against a real NATS -------------------------------------------------------------------------------------------


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


def settings(url: str, instance: str, **kw: Any) -> ClusterSettings:
    return ClusterSettings(nats_url=url, instance_id=instance, **kw)


class Node:
    """A hub on its own connection and store: what ClusterNode builds, without the service."""

    def __init__(self, url: str, instance: str, data: Path, **kw: Any) -> None:
        from streamguard.cluster.evidence import EvidenceBucket
        from streamguard.cluster.link import NatsLink
        from streamguard.cluster.log import EventLog

        self.settings = settings(url, instance, **kw)
        self.link = NatsLink(self.settings, lambda _c, _r: None)
        self.log = EventLog(self.link, self.settings)
        self.evidence = EvidenceBucket(self.link, self.settings)
        self.data = data

    async def start(self) -> Node:
        from streamguard.cluster.hub import ClusterHub
        from streamguard.events.store import EventStore

        await self.link.connect()
        await self.log.open(0, 0)
        await self.evidence.open(0)
        self.store = EventStore(self.data / "events.sqlite3", synchronous="NORMAL")
        self.hub = ClusterHub(self.store, log=self.log, link=self.link, evidence=self.evidence,
                              flush_timeout_s=self.settings.flush_timeout_s)
        self.publisher = asyncio.create_task(self.log.run())
        try:
            await self.hub.follow()
        except Exception:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        await self.hub.close()
        self.publisher.cancel()
        await asyncio.gather(self.publisher, return_exceptions=True)
        await self.link.close()
        self.store.close()


@pytest_asyncio.fixture
async def nodes(nats: NatsServer, tmp_path: Path) -> AsyncIterator[list[Node]]:
    made: list[Node] = []

    async def make(instance: str, **kw: Any) -> Node:
        node = await Node(nats.url, instance, tmp_path / instance, **kw).start()
        made.append(node)
        return node

    yield make  # type: ignore[misc]
    for node in made:
        await node.stop()


def draft(n: int, stream: str = "cam") -> Any:
    from streamguard.events.schema import EventDraft, EventType

    return EventDraft(EventType.STREAM_STATE, stream, None, {"state": "live", "reason": f"n={n}"})


@needs_nats
@pytest.mark.asyncio
async def test_a_publish_retried_through_a_frozen_server_is_in_the_log_once(nats: NatsServer, nodes: Any) -> None:
    """SIGSTOP freezes NATS with the sends in its socket: they time out and are sent again with the same message
    ids; once it thaws it reads both copies, stores one (duplicate window) and every publisher gets its event."""
    node = await nodes("a", ack_timeout_s=0.3)
    assert nats.proc is not None
    os.kill(nats.proc.pid, signal.SIGSTOP)
    try:
        futures = [node.hub.publish_nowait(draft(n)) for n in range(40)]
        await asyncio.sleep(1.5)  # several ack timeouts: every event is sent more than once
        assert node.log.counters.retries >= 40 and not any(f.done() for f in futures)
    finally:
        os.kill(nats.proc.pid, signal.SIGCONT)
    events = await asyncio.wait_for(asyncio.gather(*futures), 20)
    assert [e.seq for e in events] == list(range(1, 41))
    assert [e.data["reason"] for e in events] == [f"n={n}" for n in range(40)]
    msgs = await log_messages(nats.url, "STREAMGUARD_EVENTS")
    assert len(msgs) == 40 and len({m["msg_id"] for m in msgs}) == 40
    # Every event acknowledged once; those whose first copy JetStream had stored were acknowledged as duplicates.
    assert node.log.counters.published == 40 and node.log.counters.duplicates >= 1
    assert [e.seq for e in node.store.since(0)] == list(range(1, 41))


@needs_nats
@pytest.mark.asyncio
async def test_every_instance_sees_the_one_log_in_the_same_order(nats: NatsServer, nodes: Any) -> None:
    from streamguard.events.hub import CursorAhead

    a, b = await nodes("a"), await nodes("b")
    sub_a, sub_b = a.hub.subscribe(0), b.hub.subscribe(0)
    for n in range(30):
        (a if n % 2 else b).hub.publish_nowait(draft(n, stream=f"cam-{n % 3}"))
    got_a = [await sub_a.get(timeout=10) for _ in range(30)]
    got_b = [await sub_b.get(timeout=10) for _ in range(30)]
    assert [e.seq for e in got_a] == [e.seq for e in got_b] == list(range(1, 31))  # type: ignore[union-attr]
    assert got_a == got_b
    # An instance started later reads the whole log into its store; a filter works on it as in single mode.
    c = await nodes("c")
    assert [e.seq for e in c.store.since(0)] == list(range(1, 31))
    sub = c.hub.subscribe(10, stream_id="cam-1")
    first = await sub.get(timeout=5)
    assert first is not None and first.seq > 10 and first.stream_id == "cam-1"
    # A seq beyond the cluster's log is refused (4409), as beyond the store in single mode.
    ahead = c.hub.subscribe(1000)
    with pytest.raises(CursorAhead):
        await ahead.get(timeout=5)


@needs_nats
@pytest.mark.asyncio
async def test_a_store_that_stopped_catches_up_and_an_unreachable_nats_is_a_clear_error(nats: NatsServer,
                                                                                       nodes: Any,
                                                                                       tmp_path: Path) -> None:
    from streamguard.cluster.link import ClusterUnavailable, probe

    a = await nodes("a")
    for n in range(5):
        await a.hub.publish(draft(n))
    await a.stop()
    b = await nodes("b")
    for n in range(5, 12):
        await b.hub.publish(draft(n))
    again = await nodes("a")  # the same store, which holds 1..5
    assert [e.data["reason"] for e in again.store.since(0)] == [f"n={n}" for n in range(12)]
    # A data dir a single-mode instance used holds other events under the same seqs: refused, not mixed in.
    from streamguard.cluster.hub import ForeignStore
    from streamguard.events.store import EventStore

    with EventStore(tmp_path / "single" / "events.sqlite3") as single:
        single.append(draft(0))
    with pytest.raises(ForeignStore, match="not from the cluster's log"):
        await nodes("single")
    with pytest.raises(ClusterUnavailable) as err:
        await probe(settings(f"nats://bob:{SECRET}@127.0.0.1:1", "x", connect_timeout_s=1.0))
    assert "cannot reach NATS at nats://***@127.0.0.1:1" in str(err.value) and SECRET not in str(err.value)


@needs_nats
@pytest.mark.asyncio
async def test_a_lease_is_held_by_one_instance_renewed_and_taken_over_after_its_ttl(nats: NatsServer,
                                                                                   nodes: Any) -> None:
    from nats.js import api

    from streamguard.cluster.leases import Leases
    from streamguard.cluster.names import key_of

    node = await nodes("a")
    kv = await node.link.js.create_key_value(config=api.KeyValueConfig(bucket="leases", ttl=1.0))
    a, b = Leases(kv, "a", "1", fence_s=0.8), Leases(kv, "b", "1", fence_s=0.8)
    assert await a.acquire("whip:x") and not await b.acquire("whip:x")
    for _ in range(4):  # renewed past the TTL: still a's
        await asyncio.sleep(0.3)
        assert await a.renew(True) == []
    assert not await b.acquire("whip:x")
    # A renewal NATS applied but whose answer a's client gave up on (sent again after a reconnect): a's revision
    # is stale, yet the entry still names a: a keeps it.
    await kv.update(key_of("whip:x"), a._value, last=a.held["whip:x"].revision)
    assert await a.renew(True) == [] and "whip:x" in a.held
    await asyncio.sleep(1.5)  # a stops renewing (as a killed instance): the entry expires
    assert await b.acquire("whip:x")
    assert await a.renew(True) == ["whip:x"] and a.held == {}  # a learns it lost it
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.9:  # b cut off from NATS: it stops the stream itself before the TTL ends
        lost = await b.renew(False)
        if lost:
            break
        await asyncio.sleep(0.1)
    assert lost == ["whip:x"] and time.monotonic() - t0 < 1.0
    await b.release("whip:x")


@needs_nats
@pytest.mark.asyncio
async def test_a_log_that_lost_its_last_events_is_followed_in_its_own_order(nats: NatsServer, nodes: Any) -> None:
    """A single NATS server that crashes may lose its last writes: the log then ends before what an instance had
    read. Simulated exactly: the stream is made again holding only its first 6 messages (same ids, same bodies)."""
    import nats as nats_client

    from streamguard.cluster.log import stream_config
    from streamguard.events.hub import CursorAhead

    a = await nodes("a")
    for n in range(10):
        await a.hub.publish(draft(n))
    ahead = a.hub.subscribe(9)
    kept = (await log_messages(nats.url, "STREAMGUARD_EVENTS"))[:6]
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await js.delete_stream("STREAMGUARD_EVENTS")
    await js.add_stream(stream_config(a.settings, 0, 0))
    for m in kept:
        await js.publish(m["subject"], json.dumps(m["event"], separators=(",", ":")).encode(),
                         headers={"Nats-Msg-Id": m["msg_id"]})
    await nc.close()
    await a.hub.check_log()
    assert [e.data["reason"] for e in a.store.since(0)] == [f"n={n}" for n in range(6)]
    with pytest.raises(CursorAhead, match="lost its events after seq 6"):
        await ahead.get(timeout=5)
    event = await a.hub.publish(draft(99))  # read on from the log's end: the next event gets seq 7 everywhere
    assert event.seq == 7 and [e.seq for e in a.store.since(0)] == list(range(1, 8))
