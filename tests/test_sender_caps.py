"""Which sender limits headless Chromium honours when publishing over WHIP (issue 14: decode what 1 FPS needs).

The real app on uvicorn (serve_helpers.LiveServer) and Debian's Chromium with a fake 30 fps camera, driven by
tests/browser/sender_caps.mjs. Three ways to ask a browser for fewer frames are measured, by what it sends
(outbound-rtp) and what the server decodes (streamguard_frames_decoded_total{kind="whip"}):

- the SDP answer's codec hints alone (whip.sender_max_fps / sender_max_height: VP8 max-fr/max-fs, H.264
  max-mbps/max-fs), against a server that gives none;
- RTCRtpSender.setParameters (maxFramerate 5, scaleResolutionDownBy for a 1080p camera), as the console does;
- keyframes on request (whip.keyframes_only, the default): whatever Chromium sends, it answers the server's PLIs
  with keyframes and the server decodes one frame a second.

The first test turns keyframes_only off, so that what the server decodes is what the browser sent.

The assertions pin what Chromium does today (README, WHIP: what publishers should set); a Chromium update that
changes it fails here and says what changed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import BROWSER_DIR, CHROMIUM, LiveServer, fast_settings, need_browser

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice gathers no 127.0.0.1 candidate; Chromium gets --allow-loopback-in-peer-connection (as test_console)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])



def measure(tmp_path: Path, cases: list[dict[str, Any]], **whip: Any) -> list[dict[str, Any]]:
    server = LiveServer(fast_settings(tmp_path / "data", whip={"no_frame_timeout_s": 5.0, **whip})).start()
    try:
        driver = ["node", "sender_caps.mjs", "--url", server.url + "/", "--cases", json.dumps(cases),
                  "--chromium", CHROMIUM, "--seconds", "4", "--warmup", "3",
                  "--chromium-args", "--allow-loopback-in-peer-connection"]
        run = subprocess.run(driver, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=240)
    finally:
        server.stop()
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert out["ok"], out
    for r in out["results"]:
        print("sender caps:", json.dumps(r))
    return out["results"]


def test_chromium_follows_set_parameters_and_not_the_answers_codec_hints(tmp_path, loopback_ice):
    need_browser()
    cases = [{"codec": codec, "height": 720, "cap": cap} for codec in ("VP8", "H264") for cap in (False, True)]
    # Held resolution (see sender_caps.mjs) from a 1080p camera: does max-fs (720p) or scaleResolutionDownBy cap it?
    cases += [{"codec": "VP8", "height": 1080, "cap": cap, "keepResolution": True} for cap in (False, True)]
    vp8, vp8_capped, h264, h264_capped, full_hd, full_hd_capped = measure(tmp_path, cases, keyframes_only=False)
    for hinted in (vp8, h264):  # the answer asks for 5 fps (VP8 max-fr, H.264 max-mbps = 5 x max-fs): ignored
        assert hinted["answerHints"] and hinted["sentFps"] > 20 and hinted["serverFps"] > 20, hinted
    for capped in (vp8_capped, h264_capped):  # maxFramerate 5 by setParameters: followed, and decoded as sent
        assert capped["setParameters"] == "ok" and capped["sentFps"] < 6.5 and capped["serverFps"] < 6.5, capped
    assert full_hd["sentSize"] == "1920x1080", full_hd  # max-fs = 3600 macroblocks (1280x720): ignored
    assert full_hd_capped["sentSize"] == "1280x720", full_hd_capped  # scaleResolutionDownBy 1.5: followed
    for r in (vp8, vp8_capped, h264, h264_capped):
        assert r["serverMode"] == "all", r


def test_chromium_answers_keyframe_requests_and_the_server_decodes_one_frame_a_second(tmp_path, loopback_ice):
    """The default: the server asks for a keyframe when a sample is due (RTCP PLI) and decodes keyframes only."""
    need_browser()
    cases = [{"codec": "VP8", "height": 720, "cap": False}, {"codec": "H264", "height": 720, "cap": True}]
    for r in measure(tmp_path, cases):
        assert r["serverMode"] == "keyframes", r
        assert r["sentFps"] > (20 if not r["cap"] else 3.5), r  # Chromium sends as before...
        assert 0.6 <= r["pliPerS"] <= 1.6 and 0.6 <= r["keyFps"] <= 1.8, r  # ...a keyframe per PLI, one a second
        assert 0.6 <= r["serverFps"] <= 1.8, r  # ...and the server decodes those only (sampling.fps = 1)
