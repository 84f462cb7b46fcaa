"""The live service end to end, with real parts only: the app on a real uvicorn server (in-process in a thread, or
`streamguard serve` as a subprocess), GStreamer's RTSP server in a subprocess, aiortc peers publishing over WHIP,
a local http.server, and real WebSocket clients on /v1/events.

Model: engines/streamguard-sbi.onnx (the default) once it exists; until then `mesonet-meso4-df`;
STREAMGUARD_TEST_MODEL=<name> overrides (see serve_helpers).
Timeouts are small (watchdog 2 s, backoff 0.2-1 s, WHIP no-frame 5 s) so the file runs in a few minutes.
Needs ../shared/data (real face photos, the FF++ pair); tests skip with the reason when it is absent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import (
    SHARED,
    Feed,
    LiveServer,
    RawWebSocket,
    RtspServer,
    ServeProcess,
    face_photos,
    fast_settings,
    free_port,
    gst_available,
    http_folder,
    is_,
    media_tool,
    state,
    stored_events,
    until,
)

from streamguard.ingest.policy import OPAQUE_OPEN_FAILURE

pytestmark = pytest.mark.timeout(180)

FFPP = SHARED / "ffpp_smoke"
FAKE = FFPP / "fake_deepfakes_519_515.mp4"
REAL = FFPP / "real_519.mp4"


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slides_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 s of 640x480 H.264 at 25 fps made from 4 real face photos, 4 s each (one face at a time)."""
    photos = face_photos(4)
    if len(photos) < 4:
        pytest.skip(f"needs real face photos in {SHARED / 'real_faces'} (../shared is absent in a user's clone)")
    out = tmp_path_factory.mktemp("serve") / "slides.mp4"
    return media_tool().make_slideshow(photos, out, fps=25, seconds_per_image=4.0, size=(640, 480))


@pytest.fixture(scope="session")
def camera_mp4(slides_mp4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 s of the same photos as IP cameras send them: a keyframe every second, no B-frames."""
    out = tmp_path_factory.mktemp("serve") / "camera.mp4"
    return media_tool().make_slideshow(face_photos(4), out, fps=25, seconds_per_image=2.0, size=(640, 480), gop=25,
                                       options={"bf": "0"})


@pytest.fixture(scope="session")
def ffpp() -> dict[str, Path]:
    if not (FAKE.is_file() and REAL.is_file()):
        pytest.skip(f"needs the FF++ smoke pair in {FFPP} (../shared is absent in a user's clone)")
    return {"real": REAL, "fake": FAKE}


@pytest.fixture
def gst() -> None:
    if not gst_available():
        pytest.skip("/usr/bin/python3 cannot import gi/GstRtspServer (apt: python3-gi gir1.2-gst-rtsp-server-1.0)")


@pytest.fixture
def servers() -> Iterator[Callable[..., LiveServer]]:
    """Starts in-process servers (settings dict → LiveServer); every one still running is stopped at teardown."""
    started: list[LiveServer] = []

    def start(settings: dict[str, Any], **kwargs: Any) -> LiveServer:
        server = LiveServer(settings, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def rtsp_servers() -> Iterator[Callable[..., RtspServer]]:
    started: list[RtspServer] = []

    def start(mounts: dict[str, Path], port: int | None = None) -> RtspServer:
        server = RtspServer(mounts, port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice gathers no 127.0.0.1 candidate; make both peers (same process) use loopback only (as test_webrtc)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def scored(stream_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e["type"] == "participant.score" and e["stream_id"] == stream_id
                      and e["data"]["p_fake"] is not None)


def check_order(events: list[dict[str, Any]]) -> list[int]:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "events out of order or repeated"
    return seqs


# --- RTSP ----------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rtsp_streams_go_live_with_participants_and_scores(tmp_path, gst, slides_mp4, camera_mp4, servers,
                                                                rtsp_servers):
    mounts = {"slides": slides_mp4, "camera": camera_mp4}
    if FAKE.is_file() and REAL.is_file():
        mounts |= {"real": REAL, "fake": FAKE}
    rtsp = rtsp_servers(mounts)
    srv = servers(fast_settings(tmp_path / "data"))
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        for name in mounts:
            r = await http.post("/v1/streams", json={"id": name, "url": rtsp.url(name), "name": f"cam {name}"})
            assert r.status_code == 201, r.text
            assert r.json()["kind"] == "rtsp" and r.json()["state"] == "connecting"
        for name in mounts:
            await feed.wait_for(state(name, "connecting"), 5, f"{name} connecting")
            await feed.wait_for(state(name, "live"), 15, f"{name} live")
            joined = await feed.wait_for(is_("participant.joined", name), 20, f"{name} participant.joined")
            assert joined["participant_id"].startswith(f"{name}/")
        for name in mounts:
            await feed.wait_count(scored(name), 3, 20, f"{name} scores")
        for e in feed.of(lambda e: e["type"] == "participant.score"):
            assert e["data"]["p_fake"] is None or 0.0 <= e["data"]["p_fake"] <= 1.0
            assert e["data"]["state"] in ("warming_up", "ok", "suspicious", "alert", "low_quality", "no_face")

        people = (await http.get("/v1/participants")).json()
        states = {"warming_up", "ok", "suspicious", "alert", "low_quality", "no_face"}
        assert all(p["state"] in states and p["stream_id"] in mounts for p in people), people
        scored_now = {p["stream_id"]: p for p in people if p["p_fake"] is not None}
        assert set(scored_now) == set(mounts), people  # every stream has a participant with a score
        for p in scored_now.values():
            assert p["samples"] >= 1 and 0.0 <= p["p_fake"] <= 1.0
            assert p["sparkline"] and all(0.0 <= v <= 1.0 for _, v in p["sparkline"])
        only = (await http.get("/v1/participants", params={"stream_id": "slides"})).json()
        assert only and {p["stream_id"] for p in only} == {"slides"}
        streams = {s["id"]: s for s in (await http.get("/v1/streams")).json()}
        assert all(streams[n]["state"] == "live" and streams[n]["participants"] >= 1 for n in mounts), streams
        for n in set(mounts) - {"fake"}:  # no alert on real faces: each real camera is clear or still warming up
            assert streams[n]["verdict"] in ("clear", "pending") and streams[n]["alerts_active"] == 0, streams[n]
        # The FF++ deepfake reads suspicious within its first scores (its alert needs 3 samples over the raise
        # threshold: test_alert_on_the_ffpp_fake_and_none_on_its_real follows it that far).
        assert "fake" not in mounts or streams["fake"]["verdict"] in ("pending", "suspicious", "alert"), streams
        assert (await http.get("/v1/streams/slides")).json()["frames_sampled"] >= 3
        # Keyframes every second: decoded keyframes-only; every 2 s (slides) or 10 s (FF++): non-reference skipping
        async def camera_mode() -> bool:
            return (await http.get("/v1/streams/camera")).json()["decode_mode"] == "keyframes"

        await until(camera_mode, 5, "the camera decoded keyframes-only")
        streams = {s["id"]: s for s in (await http.get("/v1/streams")).json()}
        assert streams["camera"]["keyframe_interval_s"] == pytest.approx(1.0, abs=0.01)
        assert all(streams[n]["decode_mode"] == "nonref" for n in mounts if n != "camera"), streams
        metrics = (await http.get("/metrics")).text
        assert 'streamguard_frames_sampled_total{kind="rtsp"}' in metrics
        assert f'streamguard_streams{{kind="rtsp",state="live"}} {len(mounts)}.0' in metrics
        assert "streamguard_sample_to_score_seconds_count" in metrics
        check_order(feed.events)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_rtsp_server_killed_and_restarted_stream_recovers(tmp_path, gst, slides_mp4, servers, rtsp_servers):
    video = REAL if REAL.is_file() else slides_mp4  # 30 s: the file's end (the server closes at EOF) stays away
    rtsp = rtsp_servers({"cam": video})
    # A participant unseen for 4 s leaves: with no frames at all (the camera is down) as with frames without them.
    srv = servers(fast_settings(tmp_path / "data", participants={"min_samples": 2, "leave_after_s": 4.0}))
    async with Feed(srv.url, since=0, stream_id="cam") as feed, httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.post("/v1/streams", json={"id": "cam", "url": rtsp.url("cam")})).status_code == 201
        await feed.wait_for(state("cam", "live"), 15, "live")
        await feed.wait_count(scored("cam"), 2, 20, "first scores")

        mark = len(feed.events)
        rtsp.kill()
        stalled = await feed.wait_for(state("cam", "stalled"), 10, "stalled", after=mark)
        assert stalled["data"]["reason"]
        assert (await http.get("/v1/streams/cam")).json()["verdict"] == "pending"  # no verdict on a stream down
        retry = await feed.wait_for(state("cam", "reconnecting"), 5, "reconnecting", after=mark)
        assert retry["data"]["attempt"] >= 1 and retry["data"]["reason"] and retry["data"]["retry_in_s"] > 0
        # While the server is down the attempts fail and say why.
        refused = await feed.wait_for(lambda e: state("cam", "reconnecting")(e) and e["data"]["attempt"] >= 2, 10,
                                      "a failed reconnect attempt", after=mark)
        assert refused["data"]["reason"]
        left = await feed.wait_for(is_("participant.left", "cam"), 15, "the participant to leave", after=mark)
        assert "no frames" in left["data"]["reason"]
        assert (await http.get("/v1/participants", params={"stream_id": "cam"})).json() == []

        mark = len(feed.events)
        rtsp_servers({"cam": video}, port=rtsp.port)
        live = await feed.wait_for(state("cam", "live"), 15, "live again", after=mark)
        resumed = await feed.wait_for(scored("cam"), 15, "scores after the restart", after=feed.events.index(live))
        assert resumed["seq"] > live["seq"]
        assert (await http.get("/v1/streams/cam")).json()["state"] == "live"
        metrics = (await http.get("/metrics")).text
        assert 'streamguard_reconnects_total{kind="rtsp"}' in metrics
        check_order(feed.events)


# --- WHIP ----------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_whip_publisher_joins_is_scored_and_leaves(tmp_path, loopback_ice, slides_mp4, servers):
    from streamguard.client import publish

    video = REAL if REAL.is_file() else slides_mp4
    srv = servers(fast_settings(tmp_path / "data"))
    async with (Feed(srv.url, since=0) as feed, Feed(srv.url, since=0, types="participant.joined,participant.left")
                as roster, httpx.AsyncClient(base_url=srv.url) as http):
        pub = await publish(f"{srv.url}/v1/whip", str(video), participant_id="alice", display_name="Alice Example",
                            connect_timeout_s=20)
        try:
            joined = await feed.wait_for(is_("participant.joined"), 10, "participant.joined")
            assert joined["participant_id"] == "alice" and joined["data"]["label"] == "Alice Example"
            stream_id = joined["stream_id"]
            assert stream_id == f"whip:{pub.session_id}"
            assert (await feed.wait_for(is_("stream.state", stream_id), 5, "stream state"))["data"]["state"] == "live"
            scores = await feed.wait_count(scored(stream_id), 3, 30, "scores")
            assert all(e["participant_id"] == "alice" for e in scores)
            people = (await http.get("/v1/participants")).json()
            assert [(p["id"], p["label"], p["stream_id"]) for p in people] == [("alice", "Alice Example", stream_id)]
            assert people[0]["samples"] >= 3 and people[0]["p_fake"] is not None

            r = await http.delete(f"/v1/whip/{pub.session_id}")
            assert r.status_code == 200
            left = await feed.wait_for(is_("participant.left"), 10, "participant.left")
            assert left["participant_id"] == "alice" and left["data"]["reason"] == "deleted by client"
            assert left["data"]["samples"] >= 3 and 0.0 <= left["data"]["score"] <= 1.0
            closed = await feed.wait_for(state(stream_id, "closed"), 5, "stream closed")
            assert closed["seq"] > left["seq"]
            assert (await http.get("/v1/participants")).json() == []
            assert (await http.delete(f"/v1/whip/{pub.session_id}")).status_code == 404
        finally:
            await pub.close()
        check_order(feed.events)
        # A type filter (streamguard.client's comma-separated form) gets just those types.
        await roster.wait_count(is_("participant.left"), 1, 5, "filtered left")
        assert [e["type"] for e in roster.events] == ["participant.joined", "participant.left"]


@pytest.mark.asyncio
async def test_whip_sessions_end_cleanly_on_stream_removal_and_on_shutdown(tmp_path, loopback_ice, slides_mp4,
                                                                           servers):
    from streamguard.client import publish

    srv = servers(fast_settings(tmp_path / "data"))
    whip = f"{srv.url}/v1/whip"
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
        carol = await publish(whip, str(slides_mp4), participant_id="carol", connect_timeout_s=20)
        bob = await publish(whip, str(slides_mp4), participant_id="bob", connect_timeout_s=20)
        try:
            carol_stream, bob_stream = f"whip:{carol.session_id}", f"whip:{bob.session_id}"
            for sid in (carol_stream, bob_stream):
                await feed.wait_for(scored(sid), 30, f"{sid} scored")
            # Removing a WHIP stream through the streams API ends its session too (no orphaned peer connection).
            assert (await http.delete(f"/v1/streams/{carol_stream}")).status_code == 204
            left = await feed.wait_for(is_("participant.left", carol_stream), 10, "carol left")
            assert left["participant_id"] == "carol"
            await feed.wait_for(state(carol_stream, "closed"), 10, "carol's stream closed")
            assert carol.session_id not in srv.service.whip.sessions
            assert (await http.delete(f"/v1/whip/{carol.session_id}")).status_code == 404
            # Shutdown with bob still publishing: he leaves and his stream closes, both stored.
            await srv.astop()
        finally:
            await asyncio.gather(carol.close(), bob.close())
    events = stored_events(tmp_path / "data")
    mine = [e for e in events if e["stream_id"] == bob_stream]
    assert [e["data"].get("reason") for e in mine if e["type"] == "participant.left"] == ["server shutdown"], mine[-3:]
    assert mine[-1]["type"] == "stream.state" and mine[-1]["data"] == {
        "state": "closed", "reason": "server shutdown", "attempt": None, "retry_in_s": None}
    check_order(events)


# --- resume with since ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.slow
async def test_resume_with_since_gets_every_missed_event_once_across_a_restart(tmp_path, slides_mp4, servers):
    from streamguard.client import events

    settings = fast_settings(tmp_path / "data")
    srv = servers(settings)
    got: list[dict[str, Any]] = []
    reconnects: list[str] = []

    async def follow() -> None:  # the bot client: reconnects by itself, resuming after its last seq
        async for event in events(srv.url, since=0, backoff_initial_s=0.2, backoff_max_s=1.0,
                                  on_reconnect=lambda n, d, why: reconnects.append(why)):
            got.append(event)

    follower = asyncio.create_task(follow())
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            async with Feed(srv.url, since=0) as early:
                assert (await http.post("/v1/streams", json={"id": "a", "url": str(slides_mp4)})).status_code == 201
                await early.wait_count(scored("a"), 2, 20, "scores on a")
                cut = early.last_seq
            assert cut is not None
            # While `early` is away: more scores, then a restart (graceful: a closes, its participant leaves).
            await until(lambda: sum(1 for e in got if scored("a")(e)) >= 4, 20, "more scores on a")
            before_stop = len(got)
            await srv.astop()
        first_run = stored_events(tmp_path / "data")
        last_first_run = first_run[-1]["seq"]
        assert [e["data"]["state"] for e in first_run if e["type"] == "stream.state"][-1] == "closed"

        srv2 = servers(settings)  # same port, same data dir
        async with httpx.AsyncClient(base_url=srv2.url) as http:
            assert (await http.post("/v1/streams", json={"id": "b", "url": str(slides_mp4)})).status_code == 201
            await until(lambda: any(scored("b")(e) for e in got), 30, "the follower to get scores of b")
            async with Feed(srv2.url, since=cut) as resumed:
                await resumed.wait_for(scored("b"), 10, "replay up to b's scores")
                await asyncio.sleep(0.5)
            reference = resumed.events
            async with Feed(srv2.url, since=0) as everything:
                await until(lambda: everything.last_seq is not None and everything.last_seq >= reference[-1]["seq"],
                            10, "a full replay")
        # seq continues across the restart
        b_events = [e for e in reference if e["stream_id"] == "b"]
        assert b_events[0]["seq"] == last_first_run + 1
        # The resumed client got exactly the events after `cut`, once each, in order, as stored.
        full = everything.events
        assert check_order(reference) == [e["seq"] for e in full if cut < e["seq"] <= reference[-1]["seq"]]
        assert reference == [e for e in full if cut < e["seq"] <= reference[-1]["seq"]]
        assert [e["seq"] for e in full] == list(range(1, full[-1]["seq"] + 1))  # no gap in the store either
        # The follower was disconnected by the restart, came back with since=<its last seq> and missed nothing,
        # including the events stored during shutdown after its connection was closed.
        assert reconnects, "the follower was never disconnected"
        n = len(got)
        assert check_order(got) == [e["seq"] for e in full[:n]] and got == full[:n]
        assert any(e["type"] == "participant.left" and e["stream_id"] == "a" for e in got[before_stop:])
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


# --- alerts --------------------------------------------------------------------------------------------------------


def _summary(feed: Feed, name: str) -> dict[str, Any]:
    smoothed = [e["data"]["smoothed"] for e in feed.of(scored(name)) if e["data"]["smoothed"] is not None]
    return {"samples": len(feed.of(scored(name))), "max_smoothed": round(max(smoothed, default=0.0), 3),
            "median_smoothed": round(sorted(smoothed)[len(smoothed) // 2], 3) if smoothed else None,
            "alerts": len(feed.of(is_("alert.raised", name)))}


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_alert_on_the_ffpp_fake_and_none_on_its_real(tmp_path, ffpp, servers, gst):
    """Default thresholds, default model, live over RTSP (the cameras' protocol; the server loops each 30 s file
    seamlessly): the deepfake raises `alert.raised` within 15 s of its first scored sample, and the real video of the
    same scene raises none over 60 s of scoring."""
    from streamguard.config import CardThresholds

    rtsp = RtspServer(dict(ffpp)).start()
    srv = servers(fast_settings(tmp_path / "data"))
    try:
        async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
            for name in ffpp:
                assert (await http.post("/v1/streams", json={"id": name, "url": rtsp.url(name)})).status_code == 201
            first_real = await feed.wait_for(scored("real"), 40, "the real video's first scored sample")
            await feed.wait_for(lambda e: scored("real")(e) and e["ts"] >= first_real["ts"] + 60, 90,
                                "60 s of scores on the real video")
            raise_at, clear_at = srv.config.scoring.thresholds(CardThresholds.from_card(srv.service.classifier.card))
            summary = {name: _summary(feed, name) for name in ffpp}
            print("ffpp alert run:", srv.service.classifier.card.name, json.dumps(summary), raise_at, clear_at)
            assert summary["real"]["samples"] >= 50 and summary["fake"]["samples"] >= 50, summary
            assert summary["real"]["alerts"] == 0, f"a false alert on the real video: {summary}"
            assert summary["fake"]["alerts"] >= 1, f"no alert on the FF++ deepfake: {summary}"
            raised = feed.of(is_("alert.raised", "fake"))[0]
            first_fake = feed.of(scored("fake"))[0]
            assert raised["ts"] - first_fake["ts"] <= 15.0, (raised, first_fake)
            assert raised["data"]["smoothed"] >= raised["data"]["threshold"] == pytest.approx(raise_at)
            page = (await http.get("/v1/alerts")).json()
            assert {a["stream_id"] for a in page["items"]} == {"fake"}
            assert any(a["alert_id"] == raised["data"]["alert_id"] for a in page["items"])
            await check_evidence(http, raised)
    finally:
        rtsp.kill()


@pytest.mark.asyncio
@pytest.mark.slow
async def test_no_alert_on_any_real_talking_head(tmp_path, servers):
    """The 8 real talking-head clips (webcam, phone selfie with beauty filter, studio; a child), each played live
    over its whole length at once: not one alert."""
    clips = sorted((SHARED / "talking_heads").glob("*.mp4"))
    if len(clips) < 8:
        pytest.skip(f"needs the talking-head clips in {SHARED / 'talking_heads'} (absent in a user's clone)")
    srv = servers(fast_settings(tmp_path / "data"))
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
        for clip in clips:
            r = await http.post("/v1/streams", json={"id": clip.stem, "url": f"file://{clip}"})
            assert r.status_code == 201, r.text
        for clip in clips:
            await feed.wait_for(state(clip.stem, "closed"), 60, f"{clip.name} to play to its end")
        summary = {clip.stem: _summary(feed, clip.stem) for clip in clips}
        print("talking heads:", srv.service.classifier.card.name, json.dumps(summary))
        assert sum(s["samples"] for s in summary.values()) >= 60, summary  # ~80 s of video at 1 FPS
        assert not feed.of(is_("alert.raised")), summary
        assert (await http.get("/v1/alerts")).json()["items"] == []


async def check_evidence(http: httpx.AsyncClient, raised: dict[str, Any]) -> None:
    evidence = raised["data"]["evidence"]
    assert set(evidence) == {"crop", "heatmap"}, raised
    crop = await http.get(evidence["crop"])
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg" and crop.content[:2] == b"\xff\xd8"
    heat = await http.get(evidence["heatmap"])
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png" and heat.content[:4] == b"\x89PNG"
    alert = (await http.get(f"/v1/alerts/{raised['data']['alert_id']}")).json()
    assert alert["participant_id"] == raised["participant_id"] and alert["raised_seq"] == raised["seq"]
    assert alert["evidence"] == ["crop", "heatmap"]


@pytest.mark.asyncio
async def test_alert_evidence_end_to_end(tmp_path, slides_mp4, servers):
    """The alert path itself, independent of any model's calibration: thresholds low enough that every face alerts."""
    settings = fast_settings(tmp_path / "data", scoring={"raise_threshold": 1e-6, "clear_threshold": 5e-7,
                                                          "min_window_samples": 2, "raise_after": 1})
    srv = servers(settings)
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.post("/v1/streams", json={"id": "cam", "url": str(slides_mp4)})).status_code == 201
        raised = await feed.wait_for(is_("alert.raised", "cam"), 20, "alert.raised")
        assert raised["participant_id"].startswith("cam/")
        page = (await http.get("/v1/alerts")).json()
        assert [a["alert_id"] for a in page["items"]] == [raised["data"]["alert_id"]]
        assert page["items"][0]["cleared_seq"] is None
        await check_evidence(http, raised)
        people = (await http.get("/v1/participants")).json()
        assert any(p["alert_active"] and p["alert_id"] == raised["data"]["alert_id"] for p in people)
        cam = (await http.get("/v1/streams/cam")).json()  # the stream's own verdict follows its participants'
        assert cam["verdict"] == "alert" and cam["alerts_active"] >= 1 and cam["max_smoothed"] > 0
        # Removing the stream clears the open alert (participant left) and closes the stream.
        assert (await http.delete("/v1/streams/cam")).status_code == 204
        cleared = await feed.wait_for(is_("alert.cleared", "cam"), 10, "alert.cleared")
        assert cleared["data"]["alert_id"] == raised["data"]["alert_id"]
        assert (await http.get("/v1/alerts", params={"open_only": True})).json()["items"] == []


# --- bad input -----------------------------------------------------------------------------------------------------


def offer_sdp() -> str:
    """A real offer from an aiortc peer (what a WHIP client sends)."""
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import VideoStreamTrack

    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def assert_json_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["error"] and body["message"], body
    if code is not None:
        assert body["error"] == code, body
    return body


async def ws_close(url: str) -> tuple[int | None, str]:
    """Connect to the WebSocket at url and return the close code and reason the server ends it with."""
    from websockets.asyncio.client import connect

    async with connect(url, open_timeout=10) as ws:
        with pytest.raises(Exception):  # noqa: B017 - ConnectionClosed of either kind
            await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code, ws.close_reason or ""


@pytest.mark.asyncio
async def test_bad_requests_are_refused_with_json_and_bad_streams_say_why(tmp_path, loopback_ice, slides_mp4,
                                                                          servers, monkeypatch):
    sdp = await asyncio.to_thread(offer_sdp)
    srv = servers(fast_settings(tmp_path / "data", whip={"max_sdp_bytes": 16 * 1024}))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "readme.txt").write_text("this is a text file, not a video\n" * 100)
    dead_port = free_port()  # nothing listens there
    with http_folder(tmp_path / "site") as site:
        async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
            # A good stream first: it must keep serving through everything below.
            assert (await http.post("/v1/streams", json={"id": "good", "url": str(slides_mp4)})).status_code == 201

            await _whip_refusals(http, sdp)
            await _route_and_body_errors(http)
            await _stream_refusals(http, srv, monkeypatch, slides_mp4)
            await _feed_refusals(srv)

            # Streams that cannot work are told so, the same way whatever the cause (the log says which: the API
            # maps no network, see test_source_policy), and keep trying (network) or fail (nothing to retry).
            for sid, url in [("text", f"{site}/readme.txt"), ("dead", f"rtsp://127.0.0.1:{dead_port}/cam"),
                             ("missing", str(tmp_path / "no such file.mp4"))]:
                assert (await http.post("/v1/streams", json={"id": sid, "url": url})).status_code == 201
            text = await feed.wait_for(lambda e: e["stream_id"] == "text" and e["data"].get("state") in
                                       ("reconnecting", "failed"), 10, "text: reconnecting or failed")
            assert text["data"]["reason"] == OPAQUE_OPEN_FAILURE, text
            dead = await feed.wait_for(state("dead", "reconnecting"), 10, "dead: reconnecting")
            assert dead["data"]["reason"] == OPAQUE_OPEN_FAILURE, dead
            assert dead["data"]["attempt"] == 1 and dead["data"]["retry_in_s"] > 0, dead
            missing = await feed.wait_for(state("missing", "failed"), 10, "missing: failed")
            assert missing["data"]["reason"] == OPAQUE_OPEN_FAILURE, missing
            info = (await http.get("/v1/streams/dead")).json()
            assert info["state"] in ("reconnecting", "connecting") and info["reason"] in (None, dead["data"]["reason"])

            # ... and the good stream was scored all along.
            mark = len(feed.events)
            await feed.wait_for(scored("good"), 10, "a score on the good stream", after=mark)
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            for sid in ("text", "dead", "missing"):
                assert (await http.delete(f"/v1/streams/{sid}")).status_code == 204
            closed = await feed.wait_for(state("dead", "closed"), 10, "dead closed")
            assert closed["data"]["reason"]


async def _whip_refusals(http: httpx.AsyncClient, sdp: str) -> None:
    """WHIP: every refusal is a JSON error with the API's keys."""
    # WHIP
    whip = {"Content-Type": "application/sdp"}
    assert_json_error(await http.post("/v1/whip", content=b"v=0\r\nthis is not sdp\r\n", headers=whip), 400)
    assert_json_error(await http.post("/v1/whip", content=b"hello", headers=whip), 400, "malformed_sdp")
    assert_json_error(await http.post("/v1/whip", content=sdp.encode(), headers={"Content-Type": "text/plain"}),
                      415, "unsupported_media_type")
    big = sdp + "a=x-padding:" + "x" * 20000 + "\r\n"
    assert_json_error(await http.post("/v1/whip", content=big.encode(), headers=whip), 413)
    assert_json_error(await http.delete("/v1/whip/nope"), 404)
    # Every WHIP refusal has the API's error keys, whichever layer refused it.
    for r in [await http.post("/v1/whip", content=b"hello", headers=whip),
              await http.post("/v1/whip", content=sdp.encode(), headers={"Content-Type": "text/plain"}),
              await http.post("/v1/whip", content=big.encode(), headers=whip),
              await http.delete("/v1/whip/nope"), await http.patch("/v1/whip/nope")]:
        assert r.status_code in (400, 404, 405, 413, 415) and set(r.json()) == {"error", "message"}, r.text
    assert_json_error(await http.patch("/v1/whip/nope"), 404)  # unknown session (a live one: 405, Allow)


async def _route_and_body_errors(http: httpx.AsyncClient) -> None:
    """Routes and methods that do not exist, and bodies that are not JSON, get JSON errors too."""
    # Routes and methods that do not exist, and bodies that are not JSON, get JSON errors too.
    body = assert_json_error(await http.get("/v1/nothing/here"), 404, "not_found")
    assert "/v1/nothing/here" in body["message"], body
    r = await http.put("/v1/streams")
    body = assert_json_error(r, 405, "method_not_allowed")
    assert "PUT" in body["message"] and "GET" in r.headers["allow"] and "POST" in r.headers["allow"], body
    r = await http.post("/v1/streams", content=b'{"id": "x", "url": "rtsp://h/x"}',
                        headers={"Content-Type": "text/plain"})
    body = assert_json_error(r, 415, "unsupported_media_type")
    assert "application/json" in body["message"] and "text/plain" in body["message"], body
    r = await http.post("/v1/streams", content=b'{"id": "x", "url": "rtsp://h/x"}',
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text  # parameters are fine
    assert (await http.delete("/v1/streams/x")).status_code == 204
    body = assert_json_error(await http.post("/v1/streams", json=["not", "an", "object"]), 400,
                             "invalid_request")


async def _stream_refusals(http: httpx.AsyncClient, srv: Any, monkeypatch: pytest.MonkeyPatch,
                           slides_mp4: Path) -> None:
    """The streams API refuses what no source could open, and lists nothing it did not start."""
    # Streams API
    body = assert_json_error(await http.post("/v1/streams", json={"id": "f", "url": "ftp://example.com/x"}),
                             400)
    assert "url" in body["message"] and "ftp" in body["message"], body
    r = await http.post("/v1/streams", content=b'{"id": "x", "url": ', headers={"Content-Type":
                                                                                  "application/json"})
    body = assert_json_error(r, 400, "invalid_json")
    assert body["message"].startswith("request body is not valid JSON: Expecting value"), body
    assert "column 20" in body["message"] and body["details"][0]["field"] == "body", body
    # URLs no source could open are refused here, the url named, and nothing is started or listed.
    bad_urls = ["rtsp://[::1", "http://[zz/x", "rtsp://cam:0/x", "rtsp://cam:99999/x", "rtsp://cam:abc/x",
                "rtsp:///x", "rtsp:/cam", "", "   ", "file://", "file:", "file://elsewhere/x.mp4",
                "rtsp://cam/a b", "rtsp://cam/\x00", "rtsp://cam/" + "x" * 2048]
    for url in bad_urls:
        body = assert_json_error(await http.post("/v1/streams", json={"id": "s", "url": url}), 400,
                                 "invalid_request")
        assert body["message"].startswith("url: "), (url, body)
    body = assert_json_error(await http.post("/v1/streams", json={"id": "s", "url": "rtsp://cam/x",
                                                                  "name": "n" * 257}), 400)
    assert body["message"].startswith("name: "), body
    # Should the source itself refuse (it has its own checks), the stream is not left listed either.
    with monkeypatch.context() as patch:
        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise ValueError("the source refuses this")

        patch.setattr("streamguard.service.PullSource", refuse)
        body = assert_json_error(await http.post("/v1/streams", json={"id": "s", "url": "rtsp://cam/x"}), 400,
                                 "invalid_request")
        assert "refuses" in body["message"], body
    assert_json_error(await http.get("/v1/streams/s"), 404, "not_found")
    assert [s["id"] for s in (await http.get("/v1/streams")).json()] == ["good"]
    with monkeypatch.context() as patch:  # a bug's 500 is JSON too (the traceback goes to the log)
        def crash(*_args: Any) -> None:
            raise RuntimeError("a bug")

        patch.setattr(srv.service, "participants", crash)
        async with httpx.AsyncClient(base_url=srv.url) as once:  # uvicorn drops the connection after a 500
            body = assert_json_error(await once.get("/v1/participants"), 500, "internal_error")
        assert "a bug" not in body["message"], body
    assert_json_error(await http.post("/v1/streams", json={"url": "rtsp://h/x"}), 400, "invalid_request")
    assert_json_error(await http.post("/v1/streams", json={"id": "good", "url": str(slides_mp4)}), 409,
                      "stream_exists")
    assert_json_error(await http.get("/v1/streams/nope"), 404, "not_found")
    assert_json_error(await http.delete("/v1/streams/nope"), 404, "not_found")
    assert_json_error(await http.get("/v1/alerts/nope"), 404, "not_found")
    assert_json_error(await http.get("/v1/alerts/nope/evidence/crop"), 404, "not_found")


async def _feed_refusals(srv: Any) -> None:
    """The event feed refuses bad queries after the handshake, and the client says what was wrong."""
    from streamguard.client import EventRequestError, events

    # The event feed refuses a bad query after the handshake, with 1008 and the reason (not a bare 403).
    ws_url = srv.url.replace("http://", "ws://") + "/v1/events"
    for query, word in [("since=abc", "since"), ("since=-5", "since"), ("since=", "since"),
                        ("since=99999999999999999999", "since"), ("type=bogus", "type"),
                        ("types=stream.state,bogus", "type")]:
        code, reason = await ws_close(f"{ws_url}?{query}")
        assert code == 1008 and word in reason, (query, code, reason)
    with pytest.raises(EventRequestError) as err:  # and the client says so, instead of "auth failed"
        async for _ in events(srv.url, types=["bogus"]):
            pass
    assert err.value.code == 1008 and "bogus" in str(err.value)
    with pytest.raises(ValueError, match="since"):
        async for _ in events(srv.url, since=-5):
            pass


@pytest.mark.asyncio
async def test_token_guards_http_websocket_and_whip(tmp_path, servers):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from streamguard.client import EventAuthError, WhipClientError, events, publish

    srv = servers(fast_settings(tmp_path / "data", token="s3cret-token"))
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/healthz")).status_code == 200  # probes stay open
        assert (await http.get("/readyz")).status_code == 200
        for method, path in [("GET", "/v1/streams"), ("GET", "/v1/participants"), ("GET", "/v1/alerts"),
                             ("GET", "/metrics"), ("POST", "/v1/streams"), ("DELETE", "/v1/streams/x")]:
            r = await http.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert_json_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_json_error(await http.request(method, path), 401, "unauthorized")
        r = await http.post("/v1/whip", content=b"v=0\r\n", headers={"Content-Type": "application/sdp"})
        assert_json_error(r, 401, "unauthorized")
        # The token is checked before anything else: unknown routes, wrong methods, bodies are not looked at.
        for method, path, content in [("GET", "/v1/nothing", None), ("PUT", "/v1/streams", None),
                                      ("POST", "/v1/streams", b"{not json"), ("PATCH", "/v1/whip/x", None),
                                      ("OPTIONS", "/v1/whip", None), ("GET", "/v1/alerts/x/evidence/crop", None)]:
            r = await http.request(method, path, content=content, headers={"Content-Type": "application/json"})
            assert_json_error(r, 401, "unauthorized")
        # Open, as the README says: the probes, the console's page (it asks for the token itself) and the API's
        # documentation and schemas, none of which holds data.
        for path in ["/", "/docs", "/redoc", "/openapi.json", "/v1/schema/event"]:
            assert (await http.get(path)).status_code == 200, path
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert paths["/v1/streams"]["get"]["security"] and "security" not in paths["/healthz"]["get"], paths
        ok = await http.get("/v1/streams", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json() == []

    ws_url = srv.url.replace("http://", "ws://") + "/v1/events"
    for headers, query in [(None, ""), ({"Authorization": "Bearer wrong"}, ""), (None, "?access_token=wrong")]:
        async with connect(ws_url + query, additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 4401
    async with Feed(srv.url, since=0, access_token="s3cret-token") as feed:  # a browser's way
        await asyncio.sleep(0.3)
        assert feed.close_code is None
    with pytest.raises(EventAuthError):
        async for _ in events(srv.url, token="wrong", since=0):
            pass
    with pytest.raises(WhipClientError) as err:
        await publish(f"{srv.url}/v1/whip", str(REAL if REAL.is_file() else "testsrc"), participant_id="bob",
                      token="wrong", connect_timeout_s=5,
                      **({} if REAL.is_file() else {"player_format": "lavfi"}))
    assert err.value.status == 401


# --- event feed backpressure ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_slow_websocket_client_is_closed_with_4008_while_others_get_everything(tmp_path, servers):
    dead_port = free_port()
    # Streams failing fast (nothing listens on their port): ~100 real stream.state events a second, through a small
    # queue. A burst larger than the queue only sends a client back to the store to catch up; one that has not
    # caught up within the grace period (1 s here) is closed.
    srv = servers(fast_settings(tmp_path / "data", events={"client_queue_size": 64, "slow_consumer_grace_s": 1.0},
                                sources={"backoff_initial_s": 0.05, "backoff_max_s": 0.1}), sndbuf=4096)
    slow = await RawWebSocket.connect("127.0.0.1", srv.config.port, "/v1/events?since=0")  # and never reads
    try:
        async with Feed(srv.url, since=0) as fast, httpx.AsyncClient(base_url=srv.url) as http:
            for i in range(5):
                url = f"rtsp://127.0.0.1:{dead_port}/cam{i}"
                assert (await http.post("/v1/streams", json={"id": f"s{i}", "url": url})).status_code == 201
            await until(lambda: srv.service.hub.dropped_subscribers >= 1, 30, "the slow client to be dropped")
            assert fast.close_code is None and not fast.closed.is_set()
            for i in range(5):
                assert (await http.delete(f"/v1/streams/s{i}")).status_code == 204
            await fast.wait_count(state("s4", "closed"), 1, 10, "the last stream's closed event")
            assert srv.service.hub.dropped_subscribers == 1 and fast.close_code is None
            # The slow client, reading at last, finds a close frame with 4008 after what was already in flight.
            code, reason, received = await slow.read_until_close(10)
            assert code == 4008 and "since=" in reason, (code, reason)
    finally:
        slow.close()
    # The fast client got every event, in order, none twice.
    seqs = check_order(fast.events)
    assert seqs == list(range(1, seqs[-1] + 1)) and len(seqs) > 100
    assert received < len(seqs)


# --- config and process lifecycle (`streamguard serve` subprocesses) ----------------------------------------------


BAD_CONFIGS = [  # (environment, YAML file, the field the error must name)
    ({"STREAMGUARD_PORT": "abc"}, None, "port"),
    ({}, "scoring:\n  window_s: -1\n", "scoring.window_s"),
    ({}, "sources:\n  watchdog_sec: 5\n", "sources.watchdog_sec"),  # a typo is refused, not ignored
]


def test_bad_config_is_refused_at_start_with_the_field_named(tmp_path):
    # All at once: each process start costs seconds on a busy 2-core host.
    procs = [ServeProcess(tmp_path / str(i), env=env, config_text=text, args=["--data-dir", str(tmp_path / f"d{i}")])
             .start() for i, (env, text, _) in enumerate(BAD_CONFIGS)]
    try:
        for i, (proc, (_, _, field)) in enumerate(zip(procs, BAD_CONFIGS, strict=True)):
            assert proc.wait(60) == 2, proc.stderr
            assert field in proc.stderr and "invalid config" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
            assert not (tmp_path / f"d{i}").exists()  # nothing was started
    finally:
        for proc in procs:
            proc.kill()


@pytest.mark.parametrize("token", ["", "   "])
def test_blank_token_is_refused(monkeypatch, token):
    """A blank STREAMGUARD_TOKEN must not count as a token: it would open a public bind to 'Bearer ' requests."""
    from streamguard.config import ConfigError, load_config

    monkeypatch.setenv("STREAMGUARD_TOKEN", token)
    with pytest.raises(ConfigError, match="token"):
        load_config(host="0.0.0.0")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_sigterm_closes_streams_participants_leave_and_exit_0(tmp_path, slides_mp4):
    settings = fast_settings(tmp_path / "data", streams=[{"id": "cam", "url": str(slides_mp4)},
                                                         {"id": "cam2", "url": str(slides_mp4)}])
    proc = ServeProcess(tmp_path, settings).start()
    try:
        await asyncio.to_thread(proc.wait_ready)
        async with Feed(proc.url, since=0) as feed:
            for sid in ("cam", "cam2"):
                await feed.wait_for(is_("participant.joined", sid), 20, f"{sid}: participant.joined")
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 30)
            await asyncio.wait_for(feed.closed.wait(), 5)
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        proc.kill()
    events = stored_events(tmp_path / "data")
    check_order(events)
    for sid in ("cam", "cam2"):
        mine = [e for e in events if e["stream_id"] == sid]
        joined = {e["participant_id"] for e in mine if e["type"] == "participant.joined"}
        left = {e["participant_id"] for e in mine if e["type"] == "participant.left"}
        assert joined and joined == left, (sid, joined, left)
        assert mine[-1]["type"] in ("stream.state", "participant.left")
        closed = [e for e in mine if e["type"] == "stream.state" and e["data"]["state"] == "closed"]
        assert len(closed) == 1 and closed[0]["data"]["reason"], mine[-4:]
        assert all(e["type"] != "participant.score" for e in mine[mine.index(closed[0]):])
    assert code == 0, f"exit code {code} after a graceful shutdown"


@pytest.mark.asyncio
@pytest.mark.slow
async def test_sigterm_sends_websocket_clients_the_last_events_then_1001(tmp_path, slides_mp4):
    """uvicorn closes WebSockets with 1012 before the app's shutdown runs: the service drains first on the signal,
    so a client gets its participants' participant.left and the stream's `closed`, then 1001 with a since= hint."""
    settings = fast_settings(tmp_path / "data", streams=[{"id": "cam", "url": str(slides_mp4)}])
    proc = ServeProcess(tmp_path, settings).start()
    try:
        await asyncio.to_thread(proc.wait_ready)
        async with Feed(proc.url, since=0) as feed, Feed(proc.url, type="stream.state") as states:
            await feed.wait_for(is_("participant.joined", "cam"), 30, "cam: participant.joined")
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 30)
            await asyncio.wait_for(feed.closed.wait(), 5)
            await asyncio.wait_for(states.closed.wait(), 5)
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        proc.kill()
    assert code == 0, f"exit code {code} after a graceful shutdown"
    for client in (feed, states):
        assert client.close_code == 1001, (client.close_code, client.close_reason)
        assert f"since={client.last_seq}" in (client.close_reason or ""), (client.close_reason, client.last_seq)
    joined = {e["participant_id"] for e in feed.of(is_("participant.joined", "cam"))}
    left = {e["participant_id"] for e in feed.of(is_("participant.left", "cam"))}
    assert joined and left == joined, (joined, left)
    assert len(feed.of(state("cam", "closed"))) == 1, feed.events[-4:]
    assert states.events[-1]["data"]["state"] == "closed" and all(e["type"] == "stream.state" for e in states.events)
    assert [e["seq"] for e in feed.events] == [e["seq"] for e in stored_events(tmp_path / "data")]


# --- the order of a participant's and a stream's last events -------------------------------------------------------


@pytest.mark.asyncio
async def test_a_replaced_whip_session_leaves_before_its_replacement_joins(tmp_path, loopback_ice, slides_mp4,
                                                                           servers):
    from streamguard.client import publish

    srv = servers(fast_settings(tmp_path / "data"))
    async with Feed(srv.url, since=0) as feed:
        first = await publish(f"{srv.url}/v1/whip", str(slides_mp4), participant_id="bob", connect_timeout_s=20)
        second = None
        try:
            await feed.wait_for(is_("participant.joined"), 10, "bob joined")
            second = await publish(f"{srv.url}/v1/whip", str(slides_mp4), participant_id="bob", connect_timeout_s=20)
            old, new = f"whip:{first.session_id}", f"whip:{second.session_id}"
            joined = await feed.wait_for(lambda e: is_("participant.joined", new)(e), 10, "bob joined again")
            left = await feed.wait_for(is_("participant.left", old), 10, "the replaced session left")
            closed = await feed.wait_for(state(old, "closed"), 10, "the replaced stream closed")
            assert left["seq"] < closed["seq"] < joined["seq"], (left, closed, joined)
            assert left["data"]["reason"].startswith("replaced by a new session")
            assert not [e for e in feed.events if e["stream_id"] == old and e["seq"] > closed["seq"]]
        finally:
            for pub in (first, second):
                if pub is not None:
                    await pub.close()
        check_order(feed.events)


@pytest.mark.asyncio
async def test_participants_leave_before_a_file_stream_closes(tmp_path, servers):
    photos = face_photos(2)
    if len(photos) < 2:
        pytest.skip(f"needs real face photos in {SHARED / 'real_faces'}")
    clip = media_tool().make_slideshow(photos, tmp_path / "short.mp4", fps=25, seconds_per_image=2.5,
                                       size=(640, 480))
    srv = servers(fast_settings(tmp_path / "data"))
    async with Feed(srv.url, since=0, stream_id="f") as feed, httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.post("/v1/streams", json={"id": "f", "url": str(clip)})).status_code == 201
        closed = await feed.wait_for(state("f", "closed"), 20, "end of file")
        left = [e for e in feed.events if e["type"] == "participant.left"]
        assert left and all(e["seq"] < closed["seq"] for e in left)
        assert all(e["seq"] <= closed["seq"] for e in feed.events)


@pytest.mark.asyncio
async def test_alerts_left_open_by_a_dead_process_are_cleared_at_start(tmp_path, servers):
    from streamguard.events.schema import EventDraft, new_alert_id
    from streamguard.events.store import EventStore

    data = tmp_path / "data"
    aid = new_alert_id()
    with EventStore(data / "events.sqlite3") as store:  # what a killed process leaves: raised, never cleared
        store.append(EventDraft("alert.raised", "cam", "cam/p1", {
            "alert_id": aid, "score": 0.97, "smoothed": 0.95, "threshold": 0.93, "window_s": 10.0, "samples": 10,
            "evidence": {}}))
    srv = servers(fast_settings(data))
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
        cleared = await feed.wait_for(is_("alert.cleared", "cam"), 10, "the dangling alert cleared")
        assert cleared["data"]["alert_id"] == aid and "service restarted" in cleared["data"]["reason"]
        assert (await http.get("/v1/alerts", params={"open_only": True})).json()["items"] == []


@pytest.mark.asyncio
async def test_presence_left_open_by_a_dead_process_ends_at_start(tmp_path, servers):
    """kill -9 mid-call: the store says two participants joined and never left. The restart says they left (after
    clearing the alert one of them had open), before anything else can join."""
    from streamguard.events.schema import EventDraft, new_alert_id
    from streamguard.events.store import EventStore

    data = tmp_path / "data"
    aid = new_alert_id()
    with EventStore(data / "events.sqlite3") as store:
        store.append(EventDraft("participant.joined", "cam", "cam/p1", {}))
        store.append(EventDraft("participant.joined", "whip:s1", "alice", {"label": "Alice"}))
        store.append(EventDraft("alert.raised", "whip:s1", "alice", {
            "alert_id": aid, "score": 0.97, "smoothed": 0.95, "threshold": 0.93, "window_s": 10.0, "samples": 10,
            "evidence": {}}))
        store.append(EventDraft("participant.joined", "cam", "cam/p2", {}))
        store.append(EventDraft("participant.left", "cam", "cam/p2", {"reason": "not seen for 30 s"}))
    srv = servers(fast_settings(data))
    async with Feed(srv.url, since=5) as feed:
        await feed.wait_for(lambda e: e["type"] == "participant.left" and e["participant_id"] == "alice", 10,
                            "alice left")
        await asyncio.sleep(0.5)  # and nothing else follows for the others
    got = [(e["type"], e["participant_id"]) for e in feed.events]
    assert got == [("alert.cleared", "alice"), ("participant.left", "cam/p1"), ("participant.left", "alice")], got
    assert all("service restarted" in e["data"]["reason"] for e in feed.events)
    with EventStore(data / "events.sqlite3") as store:
        assert store.present() == []
