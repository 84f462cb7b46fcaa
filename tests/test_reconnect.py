"""A flapping camera comes back within 10 s of its return, and a dead one is not hammered meanwhile: the default
backoff against a real RTSP server killed and restarted (tools/flap_rtsp.py; its 10-cycle numbers are in the
README). One cycle here, with an outage long enough for the old backoff (capped at 30 s) to wait 8-30 s."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from serve_helpers import REPO, LiveServer, fast_settings, gst_available

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def flap():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import flap_rtsp
    finally:
        sys.path.remove(str(REPO / "tools"))
    return flap_rtsp


@pytest.mark.asyncio
async def test_a_camera_that_returns_is_live_within_10_s_and_a_dead_one_is_not_hammered(tmp_path: Path, flap) -> None:
    if not gst_available():
        pytest.skip("/usr/bin/python3 cannot import gi/GstRtspServer (apt: python3-gi gir1.2-gst-rtsp-server-1.0)")
    rtsp = flap.RtspProcess(flap.camera_clip(tmp_path), flap.free_port())
    rtsp.start()
    # The shipped backoff (sources.backoff_*); only the dead-connection timeouts are short, so the outage is seen fast.
    settings = fast_settings(tmp_path / "data", streams=[{"id": "cam", "url": rtsp.url}])
    settings["sources"] = {"connect_timeout_s": 3.0, "read_timeout_s": 3.0, "watchdog_s": 5.0,
                           "policy": settings["sources"]["policy"]}
    server = await asyncio.to_thread(LiveServer(settings).start)
    try:
        (cycle,) = await flap.run_cycles(server.url, rtsp, "cam", cycles=1, up_s=3.0, down_s=20.0, limit_s=30.0)
    finally:
        rtsp.kill()
        await server.astop()
    assert cycle.recovery_s is not None and cycle.recovery_s <= 10.0, cycle
    assert cycle.max_retry_in_s <= 5.0, cycle  # no wait so long that a return could go unnoticed for over 10 s
    assert 4 <= cycle.attempts <= 20 / 2.5 + 2, cycle  # tried all along, at most one attempt per 2.5 s
