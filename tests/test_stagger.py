"""Per-stream sampling phases in the live service: streams that share a clock do not sample the same instant.

Real parts: the app on uvicorn in-process (serve_helpers.LiveServer), file pull streams of one clip (one clock, the
case of N cameras on one RTSP server) and an aiortc peer publishing over WHIP. What is recorded is every sample the
sources hand to their stream's worker, with its media time.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from serve_helpers import LiveServer, fast_settings, media_tool

pytestmark = pytest.mark.timeout(180)

# A sample may come a few frames after its tick: pull sources skip decoding non-reference frames between samples.
# Well under the 0.25 s between the phases this test expects.
LATE_S = 0.2


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 s of 320x240 H.264 at 25 fps (faces do not matter here)."""
    media = media_tool()
    out = tmp_path_factory.mktemp("stagger") / "clip.mp4"
    return media.make_slideshow(media.synthetic_images(2, (320, 240)), out, fps=25, seconds_per_image=6.0,
                                size=(320, 240))


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice gathers no 127.0.0.1 candidate; make both peers (same process) use loopback only (as test_webrtc)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def samples(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """stream id -> media times of the samples its source kept, in order."""
    from streamguard.worker import StreamWorker

    kept: dict[str, list[float]] = defaultdict(list)
    put = StreamWorker.put

    def record(self: StreamWorker, frame) -> None:
        kept[self.stream_id].append(frame.pts_s)
        put(self, frame)

    monkeypatch.setattr(StreamWorker, "put", record)
    return kept


async def until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


def assert_on_phase(times: list[float], phase: float) -> None:
    """After the first sample (kept at once), each one is the first decoded frame at or after first + phase + k."""
    offsets = [((t - times[0]) - phase + 1e-6) % 1.0 for t in times[1:]]
    assert all(o < LATE_S for o in offsets), (phase, times)


@pytest.mark.asyncio
async def test_streams_sample_at_their_own_phases(tmp_path, clip, samples, loopback_ice):
    from aiortc.mediastreams import VideoStreamTrack

    from streamguard.client import publish

    streams = [{"id": "a", "url": str(clip)}, {"id": "b", "url": str(clip)}]
    # WHIP decodes every frame here: with keyframes on request (the default) a sample is the first keyframe the
    # publisher sends after the gate's PLI at the tick, one round trip and an encode late, which a loaded 2-core CI
    # machine stretches past LATE_S. The phases are the sampler's; tests/test_keyframe_gate.py times the gate.
    settings = fast_settings(tmp_path / "data", streams=streams, whip={"keyframes_only": False})
    server = LiveServer(settings).start()
    track = VideoStreamTrack()
    try:
        pub = await publish(f"{server.url}/v1/whip", track, participant_id="w", audio=False, ice_servers=[],
                            connect_timeout_s=20)
        whip = f"whip:{pub.session_id}"
        try:
            await until(lambda: all(len(samples[s]) >= 4 for s in ("a", "b", whip)), 60, "4 samples per stream")
        finally:
            await pub.close()
        # Phases in the order the streams came: the config's two, then the WHIP session between them.
        phases = {s: server.call(lambda s=s: server.service.sampling_phase(s)) for s in ("a", "b", whip)}
        assert phases == {"a": 0.0, "b": 0.5, whip: 0.25}
        for stream_id, phase in phases.items():
            assert_on_phase(samples[stream_id], phase)
        # One clip, one clock: without phases "a" and "b" would sample the same frames.
        assert samples["a"][0] == samples["b"][0] == 0.0
        assert not set(samples["a"][1:4]) & set(samples["b"][1:4])
    finally:
        track.stop()
        await server.astop()


def test_without_stagger_every_stream_has_phase_0(tmp_path):
    from streamguard.config import ServiceConfig
    from streamguard.service import Service

    config = ServiceConfig(**fast_settings(tmp_path / "data", sampling={"stagger": False}))
    service = Service(config)
    assert [service.sampling_phase(s) for s in ("a", "b", "whip:x")] == [0.0, 0.0, 0.0]
