"""NVDEC decoding for pull sources: the choice the service makes at start, and the CPU fallback when the GPU cannot
decode. Real PyAV and FFmpeg throughout. Without a GPU these check the fallback paths (a CUDA `HWAccel` that cannot
create its device); on a GPU machine the same tests check that NVDEC is chosen and samples the same frames.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from av.codec.hwaccel import HWAccel
from serve_helpers import Feed, fast_settings, media_tool

from streamguard.ingest.av_source import DecodeStats, iter_sampled_frames, open_container
from streamguard.ingest.nvdec import _h264_test_clip, choose_hwdecode, decode_test_clip, nvdec_hwaccel

GPU_DECODES = nvdec_hwaccel() is not None and decode_test_clip() is None


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s of 320x240 H.264 at 25 fps, B-frames on, panning and frame-stamped (a wrong frame would show)."""
    tool = media_tool()
    out = tmp_path_factory.mktemp("nvdec") / "moving.mp4"
    return tool.make_slideshow(tool.synthetic_images(3, (320, 240)), out, fps=25, seconds_per_image=2.0,
                               size=(320, 240))


def test_the_probe_clip_is_valid_h264():
    with av.open(_h264_test_clip()) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = list(container.decode(stream))
    assert len(frames) == 3 and frames[0].format.name == "yuv420p"


def test_off_never_touches_the_gpu():
    choice = choose_hwdecode("off")
    assert choice.hwaccel is None and not choice.degraded and "off" in choice.reason


@pytest.mark.skipif(GPU_DECODES, reason="this machine decodes on NVDEC: the no-GPU paths cannot be seen")
def test_without_nvdec_auto_is_quietly_cpu_and_nvdec_is_degraded_with_the_reason():
    auto = choose_hwdecode("auto")
    assert auto.hwaccel is None and not auto.degraded
    required = choose_hwdecode("nvdec")
    assert required.hwaccel is None and required.degraded
    assert "NVDEC unusable" in required.reason
    # The strict probe itself says why (here: the CUDA device cannot be created).
    why = decode_test_clip()
    assert why is not None and why


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_DECODES, reason="needs an NVIDIA GPU with NVDEC and a PyAV build with CUDA")
def test_with_nvdec_both_modes_choose_it():
    for mode in ("auto", "nvdec"):
        choice = choose_hwdecode(mode)
        assert choice.hwaccel is not None and not choice.degraded, choice.reason


def test_hwaccel_sampling_matches_cpu_sampling(clip, caplog):
    """Same frames at the same times with a CUDA hwaccel as without: on NVDEC (pixels within YUV rounding), or,
    where the device cannot be created, through the CPU fallback open_container takes (identical, with a warning)."""
    cpu = list(iter_sampled_frames(str(clip), fps=2.0))
    with caplog.at_level(logging.WARNING, logger="streamguard.ingest.av_source"):
        stats = DecodeStats()
        gpu = list(iter_sampled_frames(str(clip), fps=2.0, hwaccel=HWAccel("cuda"), stats=stats))
    assert [f.pts_s for f in gpu] == [f.pts_s for f in cpu] and len(cpu) == 12
    assert stats.skipped_nonref > 0  # skip_frame still applies on the hwaccel path
    for a, b in zip(cpu, gpu, strict=True):
        assert a.rgb.shape == b.rgb.shape
        assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() < (2.0 if GPU_DECODES else 1e-9)
    if not GPU_DECODES:
        assert "cannot decode on the GPU" in caplog.text and "decoding on the CPU" in caplog.text


def test_a_dead_url_with_hwaccel_fails_once_with_the_source_error(silent_port):
    """The CPU retry is only for a device that fails: a source that fails is not opened twice."""
    from streamguard.ingest.av_source import SourceError

    with pytest.raises(SourceError, match="timed out"):
        open_container(f"rtsp://127.0.0.1:{silent_port}/x", timeout_s=1.0, hwaccel=HWAccel("cuda"))


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.skipif(GPU_DECODES, reason="this machine decodes on NVDEC: no degraded state to see")
async def test_service_asked_for_nvdec_without_it_is_degraded_and_still_decodes(tmp_path, clip):
    import httpx
    from serve_helpers import LiveServer

    settings = fast_settings(tmp_path / "data", sources={"hwdecode": "nvdec"})
    server = LiveServer(settings).start()
    try:
        async with Feed(server.url, since=0) as feed, httpx.AsyncClient(base_url=server.url) as http:
            degraded = await feed.wait_for(lambda e: e["type"] == "service.degraded", 10, "service.degraded")
            assert degraded["data"]["component"] == "ingest" and "NVDEC unusable" in degraded["data"]["reason"]
            created = await http.post("/v1/streams", json={"id": "cam", "url": str(clip)})
            assert created.status_code == 201
            await feed.wait_for(lambda e: e["type"] == "stream.state" and e["data"]["state"] == "live", 20, "live")
            metrics = (await http.get("/metrics")).text
            assert "streamguard_degraded 1" in metrics
            await asyncio.sleep(0)
    finally:
        server.stop()


@pytest.mark.skipif(GPU_DECODES, reason="this machine decodes on NVDEC: the refusal cannot be seen")
def test_scan_refuses_nvdec_without_it_and_auto_scans_on_the_cpu(clip, tmp_path):
    import json

    from typer.testing import CliRunner

    from streamguard.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["scan", str(clip), "--hwdecode", "nvdec", "-q"])
    assert refused.exit_code == 2 and "--hwdecode" in refused.output and "NVDEC unusable" in refused.output
    out = tmp_path / "report.json"
    done = runner.invoke(app, ["scan", str(clip), "--hwdecode", "auto", "-q", "--json", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert report["settings"]["hwdecode"] == "auto" and report["files"][0]["sampled_frames"] == 6
