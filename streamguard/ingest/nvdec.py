"""Optional NVDEC decoding for pull sources: FFmpeg's NVIDIA decoders through PyAV, when the GPU and build have them.

`choose_hwdecode(mode)` is what the service calls once at start: it returns the `HWAccel` that every pull source
then opens with, after proving it works by decoding a small H.264 clip on the GPU (a GPU that is listed but cannot
decode, e.g. a MIG slice without video engines, is caught there rather than on each stream).

Two ways in, both checked before use:

* `nvdec_hwaccel()` -> an `av.codec.hwaccel.HWAccel("cuda")` to pass as `av.open(url, hwaccel=...)` (PyAV >= 14):
  FFmpeg's generic hwaccel path; it keeps the stream's own decoder (so `skip_frame` and threading settings still
  apply), decodes on NVDEC where the codec and GPU support it, copies frames back to system memory for the sampler,
  and falls back to software by itself (`allow_software_fallback`). This is the one to use.
* `nvdec_decoder_name(codec)` -> "h264_cuvid"-style decoder names, for code that creates a decoder by name
  (`av.CodecContext.create(name, "r")`); these fail at open time without a GPU, so `probe_nvdec` opens one first.

At 1 FPS most decoded frames are thrown away, so decode is where a many-stream host spends its CPU; NVDEC moves
that work to the GPU's video engines, which inference does not use.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal

import numpy as np

# FFmpeg codec name (as PyAV's codec_context.name reports it) -> FFmpeg's NVDEC (cuvid) decoder.
_CUVID: dict[str, str] = {
    "h264": "h264_cuvid",
    "hevc": "hevc_cuvid",
    "h265": "hevc_cuvid",
    "av1": "av1_cuvid",
    "vp8": "vp8_cuvid",
    "vp9": "vp9_cuvid",
    "mpeg1video": "mpeg1_cuvid",
    "mpeg2video": "mpeg2_cuvid",
    "mpeg4": "mpeg4_cuvid",
    "vc1": "vc1_cuvid",
    "mjpeg": "mjpeg_cuvid",
}


def nvdec_codec_name(codec: str) -> str | None:
    """FFmpeg's NVDEC decoder for a codec name ("h264" -> "h264_cuvid"), or None where NVDEC has none."""
    return _CUVID.get(codec.strip().lower())


def nvdec_decoder_name(codec: str, available: Collection[str] | None = None) -> str | None:
    """The NVDEC decoder for `codec` if this FFmpeg build has it (`av.codecs_available` by default), else None."""
    name = nvdec_codec_name(codec)
    if name is None:
        return None
    if available is None:
        import av

        available = av.codecs_available
    return name if name in available else None


@dataclass(frozen=True, slots=True)
class NvdecStatus:
    usable: bool
    reason: str  # why not, or what will be used


def probe_nvdec(codec: str = "h264") -> NvdecStatus:
    """Whether NVDEC can decode `codec` here: the decoder is in FFmpeg's build and opens on a GPU."""
    import av

    name = nvdec_decoder_name(codec)
    if name is None:
        have = nvdec_codec_name(codec)
        why = f"this FFmpeg build has no {have}" if have else f"NVDEC has no decoder for {codec!r}"
        return NvdecStatus(False, why)
    try:
        # PyAV's CodecContext has no close(): the decoder is freed with the object, at the end of this function.
        av.CodecContext.create(name, "r").open()
    except Exception as exc:  # no GPU, no libnvcuvid, a driver too old: all surface here
        return NvdecStatus(False, f"{name} does not open ({exc}): no NVIDIA GPU or driver decode library")
    return NvdecStatus(True, f"{name} opens")


def nvdec_hwaccel(device: str | None = None, allow_software_fallback: bool = True) -> Any | None:
    """An `HWAccel` for `av.open(..., hwaccel=...)` when this FFmpeg has the CUDA device type and the NVIDIA driver
    reports a GPU, else None. (Without a GPU, `av.open` with a CUDA hwaccel raises instead of falling back, so the
    GPU is checked here; callers should still fall back to plain `av.open` if opening with it fails.)"""
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available
    except ImportError:  # PyAV < 14
        return None
    if "cuda" not in hwdevices_available():
        return None
    from streamguard.inference.gpu import driver_gpus

    gpus, _ = driver_gpus()
    if not gpus:
        return None
    return HWAccel(device_type="cuda", device=device, allow_software_fallback=allow_software_fallback)


HwDecodeMode = Literal["auto", "nvdec", "off"]


@dataclass(frozen=True, slots=True)
class HwDecodeChoice:
    hwaccel: Any | None  # the HWAccel to pass to open_container, or None: decode on the CPU
    reason: str  # what was chosen and why, for the log and the service.degraded event
    degraded: bool = False  # NVDEC was asked for explicitly and cannot be used


def choose_hwdecode(mode: HwDecodeMode, device: str | None = None) -> HwDecodeChoice:
    """How pull sources decode: `off` on the CPU; `auto` on NVDEC when it works here, else quietly on the CPU;
    `nvdec` on NVDEC, or on the CPU with `degraded` set and the reason when it cannot be used. `device`: the CUDA
    device index as a string (default: the first GPU)."""
    if mode == "off":
        return HwDecodeChoice(None, "CPU decoding (sources.hwdecode is off)")
    hwaccel = nvdec_hwaccel(device)
    why: str | None = "no NVIDIA GPU, or this FFmpeg build has no CUDA device support"
    if hwaccel is not None:
        why = decode_test_clip(device)
        if why is None:
            return HwDecodeChoice(hwaccel, "NVDEC decoding (checked on a test clip)")
    return HwDecodeChoice(None, f"CPU decoding: NVDEC unusable ({why})", degraded=mode == "nvdec")


def decode_test_clip(device: str | None = None) -> str | None:
    """None when a small H.264 clip decodes on CUDA device `device` (no software fallback), else why not."""
    import av
    from av.codec.hwaccel import HWAccel

    strict = HWAccel(device_type="cuda", device=device, allow_software_fallback=False)
    try:
        clip = _h264_test_clip()
        with av.open(clip, mode="r", hwaccel=strict) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            if not stream.codec_context.is_hwaccel:
                return "the decoder did not attach to the GPU"
    except Exception as exc:  # device creation, decoder open, or decode: any failure means "not here"
        return f"{type(exc).__name__}: {exc}"
    return None if frames else "no frame came out of the GPU decoder"


def _h264_test_clip(size: int = 256, frames: int = 3) -> BytesIO:
    """A few frames of H.264 (yuv420p, the format cameras send) made in memory with FFmpeg's libx264 or h264."""
    import av

    buffer = BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buffer.seek(0)
    return buffer
