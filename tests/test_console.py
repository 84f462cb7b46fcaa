"""The operator console in a real browser: headless Chromium (Debian's) driven by Playwright, against a real server.

`streamguard serve` runs as a subprocess (the real CLI, a free port, a temp data dir, a bearer token, the meso4
model unless the shipped SBI model exists) with scoring thresholds low enough that a *real* face raises an alert
under meso4: the alert comes through the whole live pipeline (WHIP → sampler → faces → classifier → scorer → store
→ feed). A second stream pulls the FaceForensics++ deepfake of the same clip from its file; with a model other
than meso4 (which may rightly never flag the real face), its alert is the one the test waits for.
Chromium's fake camera plays the first 10 s of a real FaceForensics++ face video (converted to .y4m with PyAV) and
`tests/browser/console.mjs` clicks through the console; see that script for the steps it checks, among them a
cut event feed that must resume with `since=<last seq>` without a gap in the seqs it received.

ICE: the server is started through a small shim that makes aioice gather 127.0.0.1 only (as tests/test_webrtc.py
does in-process) and Chromium gets `--allow-loopback-in-peer-connection`, so both peers offer loopback host
candidates: media never leaves the machine and the test works without any network interface. (Without the shim
and flag it also works on a machine with an interface address: both sides then pair on that address.)
STREAMGUARD_CONSOLE_TEST_ICE=host runs it that way.

Needs: /usr/bin/chromium (apt-get install chromium), node + `npm ci` in tests/browser (playwright-core only; never
`npx playwright install`). Artefacts: test-artifacts/console.png (+ the server log and the driver's JSON);
STREAMGUARD_UPDATE_SCREENSHOT=1 also copies the screenshot to docs/console.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import BROWSER_DIR, CHROMIUM, need_browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "console-test-token"

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.shared]

# Thresholds every face crosses, whatever the model: the alert is real pipeline output (WHIP, faces, model, scorer,
# store, feed); only the operating point is moved, so the camera's own participant always alerts.
CONFIG = """\
scoring:
  raise_threshold: 0.000001
  clear_threshold: 0.0000005
  raise_after: 2
  min_window_samples: 3
sources:
  policy:            # the second stream is a local file, added over the API
    allow_files: true
"""

LOOPBACK_ICE_SHIM = """\
import sys
import aioice.ice
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
from streamguard.cli import app
sys.argv[0] = "streamguard"
app()
"""



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def face_y4m(src: Path, dst: Path, seconds: float = 10.0, fps: int = 10) -> Path:
    """The first `seconds` of a video as a 640x480 yuv420p .y4m at `fps` (what Chromium's fake camera plays)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        n, next_t = 0, 0.0
        for frame in inp.decode(video=0):
            t = float(frame.pts * frame.time_base)
            if t >= seconds:
                break
            if t + 1e-6 < next_t:
                continue
            next_t += 1.0 / fps
            img = frame.reformat(width=640, height=480, format="yuv420p")
            img.pts = n
            n += 1
            for packet in stream.encode(img):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


def model_name() -> str:
    return "streamguard-sbi" if (REPO / "engines" / "streamguard-sbi.onnx").is_file() else "mesonet-meso4-df"


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamguard serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"streamguard serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def add_stream(base: str, spec: dict) -> None:
    req = urllib.request.Request(base + "/v1/streams", data=json.dumps(spec).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_console_monitor_my_camera(tmp_path: Path, shared_data: Path) -> None:
    need_browser()
    video = shared_data / "ffpp_smoke" / "real_519.mp4"
    fake = shared_data / "ffpp_smoke" / "fake_deepfakes_519_515.mp4"
    if not video.is_file():
        pytest.skip(f"needs {video}")
    ARTIFACTS.mkdir(exist_ok=True)
    y4m = face_y4m(video, tmp_path / "face.y4m")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    host_ice = os.environ.get("STREAMGUARD_CONSOLE_TEST_ICE") == "host"
    model = os.environ.get("STREAMGUARD_CONSOLE_TEST_MODEL") or model_name()
    args = ["serve", "--config", str(config), "--port", str(port), "--data-dir", str(tmp_path / "data"),
            "--model", model, "--log-level", "info"]
    shim = ["-m", "streamguard.cli"] if host_ice else ["-c", LOOPBACK_ICE_SHIM]
    cmd = [sys.executable, *shim, *args]
    env = {**os.environ, "STREAMGUARD_TOKEN": TOKEN}
    server_log = ARTIFACTS / "console-server.log"
    shot = ARTIFACTS / "console.png"
    shot.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(server_log, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, proc, server_log)
        ready_s = time.monotonic() - t0
        if fake.is_file():  # a second stream, pulled from a file: the console shows a pull stream's health and alert
            add_stream(base, {"id": "sample-file", "url": str(fake), "name": "Deepfake sample (file)"})
        driver = ["node", "console.mjs", "--url", base + "/", "--video", str(y4m), "--screenshot", str(shot),
                  "--token", TOKEN, "--timeout", "90", "--chromium", CHROMIUM]
        if not host_ice:
            driver += ["--chromium-args", "--allow-loopback-in-peer-connection"]
        driver += ["--alert-of", "mine"]
        run = subprocess.run(driver, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=200)
    finally:
        stop(proc)
    (ARTIFACTS / "console-driver.json").write_text(run.stdout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"], (f"console test failed at step {result.get('failedStep')!r}: {result.get('error')}\n"
                          f"steps: {result.get('steps')}\nbrowser console: {result.get('console')}\n"
                          f"screenshot: {shot}; server log: {server_log}\n{server_log.read_text()[-2000:]}")

    # What the driver saw, checked here too so a failure names it.
    assert result["tokenDialog"], "the console never asked for the token"
    assert result["gaps"] == 0 and result["reconnects"] >= 1
    since = [u for u in result["wsUrls"][1:] if "since=" in u]
    assert since and all("access_token=" in u for u in result["wsUrls"]), result["wsUrls"]
    shown = [a for a in result["alerts"] if (a["participant"] or "").startswith("console-")]
    assert shown and set(shown[0]["evidence"]) == {"crop", "heatmap"}, result["alerts"]
    # the card says how big the raising face was (small faces score unreliably; JS rounds halves up)
    face_px = shown[0]["face_px"]
    assert face_px >= 40 and f"face {math.floor(face_px + 0.5)} px" in shown[0]["nums"], shown[0]
    # A camera that stops sending reads "no frames" (stream and participant), not "no face".
    assert result["noFrames"] == {"stream": "live · no frames", "participant": "no frames"}, result["noFrames"]
    assert "Console test" in result["clearedWho"], result["clearedWho"]  # the display name, after they left
    assert any(w.startswith("DELETE /v1/whip/") for w in result["whip"]), result["whip"]
    assert not [c for c in result["console"] if c.startswith("pageerror")], result["console"]
    assert shot.is_file() and shot.stat().st_size > 10_000
    if not host_ice:
        assert result["icePair"] and result["icePair"].startswith("127.0.0.1:"), result["icePair"]
    print(f"server ready in {ready_s:.1f} s; console steps (s from page open): {result['steps']}; "
          f"ICE pair {result['icePair']}")
    if os.environ.get("STREAMGUARD_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "console.png")
