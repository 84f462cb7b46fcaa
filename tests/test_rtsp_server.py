"""tools/rtsp_server.py (GStreamer's gst-rtsp-server, Debian's /usr/bin/python3) read by real PyAV clients.

The server is a stand-in camera for the pull and serve tests and the benchmark, so it has to behave like one: a
short clip loops forever with timestamps that keep increasing, a client joining the shared mount does not restart
it for the others, and a crowd of clients arriving at once all get frames.

The clip is 2 s at 25 fps (keyframe every second) and every frame carries its index (make_test_media's stamp), so a
client can tell which source frame it got: a loop shows as ...48, 49, 0, 1...; a restart as a jump back mid-clip.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import pytest
from serve_helpers import RtspServer, gst_available

FPS = 25
CLIP_FRAMES = 2 * FPS  # 2 s
SIZE = (320, 240)

pytestmark = pytest.mark.skipif(not gst_available(), reason="/usr/bin/python3 cannot import gi/GstRtspServer "
                                "(apt: python3-gi gir1.2-gst-rtsp-server-1.0)")


@pytest.fixture(scope="module")
def clip(media, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rtsp") / "clip.mp4"
    return media.make_slideshow(media.synthetic_images(2, SIZE), out, fps=FPS, seconds_per_image=1.0, size=SIZE,
                                gop=FPS)


@pytest.fixture(scope="module")
def long_clip(media, tmp_path_factory) -> Path:
    """8 s: the crowd reads well within it, so what it sees is the crowd's doing, not the loop's."""
    out = tmp_path_factory.mktemp("rtsp") / "long.mp4"
    return media.make_slideshow(media.synthetic_images(4, SIZE), out, fps=FPS, seconds_per_image=2.0, size=SIZE,
                                gop=FPS)


@pytest.fixture(scope="module")
def server(clip, long_clip) -> Iterator[RtspServer]:
    """One server, one mount per test: each mount is its own shared media, prepared by that test's first client."""
    rtsp = RtspServer({"loop": clip, "crowd": long_clip}).start()
    try:
        yield rtsp
    finally:
        rtsp.kill()


def open_rtsp(url: str) -> av.container.InputContainer:
    return av.open(url, options={"rtsp_transport": "tcp", "timeout": "5000000"}, timeout=(10.0, 5.0))


@dataclass
class Reading:
    pts: list[float] = field(default_factory=list)  # seconds, in decode output order
    stamps: list[int] = field(default_factory=list)  # source frame index of each frame
    walls: list[float] = field(default_factory=list)  # time.monotonic() of each frame
    error: BaseException | None = None


def read(url: str, *, media_seconds: float = 0.0, frames: int = 0, wall_limit_s: float = 15.0,
         stamps: bool = False, media=None, started: threading.Event | None = None) -> Reading:
    """Decode from url until `media_seconds` of pts span or `frames` frames (or the wall limit, or the end)."""
    r = Reading()
    t0 = time.monotonic()
    try:
        with open_rtsp(url) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is None:  # the first frame(s), before RTCP gives the RTP clock a reference
                    continue
                r.pts.append(float(frame.pts * stream.time_base))
                r.walls.append(time.monotonic())
                if stamps:
                    r.stamps.append(media.read_stamp(frame.to_ndarray(format="rgb24")))
                if started is not None and r.pts[-1] - r.pts[0] >= 1.0:
                    started.set()
                if (media_seconds and r.pts[-1] - r.pts[0] >= media_seconds) or (frames and len(r.pts) >= frames):
                    break
                if time.monotonic() - t0 > wall_limit_s:
                    break
    except BaseException as e:  # noqa: BLE001 - reported by the test
        r.error = e
    return r


def test_loops_forever_with_increasing_timestamps_and_a_joining_client_restarts_nothing(server, media):
    url = server.url("loop")
    joined = threading.Event()
    second: list[Reading] = []

    def join_later() -> None:  # a second client on the same shared mount, once the first is 1 s in
        if joined.wait(15):
            second.append(read(url, frames=2 * FPS, wall_limit_s=10))

    joiner = threading.Thread(target=join_later, daemon=True)
    joiner.start()
    first = read(url, media_seconds=3.5 * CLIP_FRAMES / FPS, stamps=True, media=media, started=joined)
    joiner.join(15)

    assert first.error is None, first.error
    span = first.pts[-1] - first.pts[0]
    # Frames kept coming past the end of the 2 s clip: three and a half times through it.
    assert span >= 3.5 * CLIP_FRAMES / FPS, f"the stream ended after {span:.2f} s of media ({len(first.pts)} frames)"
    # Timestamps strictly increase, frame after frame, across every loop (no repeat, no jump back, no gap).
    steps = [b - a for a, b in zip(first.pts, first.pts[1:], strict=False)]
    assert min(steps) > 0, f"pts went back or repeated: min step {min(steps):.3f} s"
    assert max(steps) < 2.5 / FPS, f"a gap of {max(steps):.3f} s in the pts"
    # It loops: the source frames run 0..49, 0..49, ... in order; the joining client restarted nothing (a restart
    # would jump back to frame 0 mid-clip).
    jumps = [(a, b) for a, b in zip(first.stamps, first.stamps[1:], strict=False) if (b - a) % CLIP_FRAMES != 1]
    assert not jumps, f"source frames out of sequence: {jumps[:5]} in {first.stamps}"
    wraps = sum(1 for a, b in zip(first.stamps, first.stamps[1:], strict=False) if b < a)
    assert wraps >= 3, f"only {wraps} loop(s) in {first.stamps}"
    # Paced in real time (FFmpeg buffers about a second while it opens, which then arrives at once).
    assert span <= first.walls[-1] - first.walls[0] + 1.5, "faster than real time"

    assert second and second[0].error is None, second[0].error if second else "the second client never started"
    assert len(second[0].pts) >= 2 * FPS, f"the joining client got {len(second[0].pts)} frames"
    assert all(b > a for a, b in zip(second[0].pts, second[0].pts[1:], strict=False))


def test_twenty_clients_at_once_all_get_frames(server):
    n, want = 20, 2 * FPS
    url = server.url("crowd")  # not prepared yet: every client arrives while the shared media prepares
    barrier = threading.Barrier(n)
    results: dict[int, tuple[Reading, float]] = {}

    def client(i: int) -> None:
        barrier.wait(10)
        t0 = time.monotonic()
        r = read(url, frames=want, wall_limit_s=15)
        results[i] = (r, time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(25)

    failed = {i: (len(r.pts), round(s, 1), repr(r.error)) for i, (r, s) in results.items()
              if r.error is not None or len(r.pts) < want or any(b <= a for a, b in itertools.pairwise(r.pts))}
    assert len(results) == n, f"{n - len(results)} clients still waiting after 25 s"
    assert not failed, f"clients without {want} frames in order (frames, seconds, error): {failed}"
    slowest = max(s for _, s in results.values())
    assert slowest < 8.0, f"the slowest client took {slowest:.1f} s to get {want} frames"
