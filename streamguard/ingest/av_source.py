"""Decode files and network streams with PyAV and hand back the frames the sampler keeps, in RGB.

Cost model: at 1 FPS almost every decoded frame is thrown away, so the decoder is told to skip non-reference frames
(``skip_frame = "NONREF"``: nothing else depends on them, so the frames that remain decode correctly and keep their
own timestamps), and only kept frames are converted to RGB (measured on a 640×480 H.264 clip: ~1.1 ms per frame to
convert, ~1.4 ms CPU to decode). On that clip skip_frame cut decoded frames from 751 to 485 and CPU time by ~20 %.
Streams whose keyframes come at least every sampling period decode keyframes only (`streamguard.ingest.gop`): on a
720p30 RTSP stream with a 1 s GOP and no B-frames, 1 frame of 30 decoded, and the pull source's CPU (demuxing
included) 0.008-0.011 core instead of 0.049-0.054 (tools/bench_serve.py --gop 1 --no-bframes, README).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

import av
import av.container

from streamguard.ingest.gop import DecodeMode, GopWatch
from streamguard.ingest.sampler import TimestampSampler
from streamguard.types import SampledFrame

log = logging.getLogger(__name__)

# A run of demux errors this long without a good packet means the source is gone, not a damaged patch.
_MAX_CONSECUTIVE_DEMUX_ERRORS = 32
# FFmpeg protocols each kind of source may use (its protocol_whitelist). HLS: segments over http(s), AES-128
# encrypted ones through crypto; RTSP: interleaved over TCP or RTP over UDP, TLS for rtsps.
PROTOCOLS = {
    "file": "file",
    "http": "http,https,tls,tcp,crypto,httpproxy",
    "https": "http,https,tls,tcp,crypto,httpproxy",
    "rtsp": "rtsp,rtsps,rtp,srtp,tcp,udp,tls",
    "rtsps": "rtsp,rtsps,rtp,srtp,tcp,udp,tls",
    "rtmp": "rtmp,rtmps,tcp,tls",
    "rtmps": "rtmp,rtmps,tcp,tls",
}


class SourceError(Exception):
    """A source that cannot be opened or read: the message says which source and why."""


@dataclass(slots=True)
class DecodeStats:
    """What one decode run did; filled in as frames go by, complete when the iterator ends."""

    packets: int = 0  # non-empty video packets read from the demuxer
    decoded: int = 0  # frames the decoder output
    sampled: int = 0  # frames the sampler kept (and converted to RGB)
    corrupt: int = 0  # packets the demuxer or the decoder rejected; skipped, decoding went on
    # Packets that gave no frame and no error: with skip_nonref, the non-reference frames the decoder skipped
    # (derived as packets - skipped_nonkey - decoded - corrupt, so it can be off by a packet that carried no picture).
    skipped_nonref: int = 0
    skipped_nonkey: int = 0  # packets never decoded because the stream was decoded keyframes-only
    # Frames decoded after a damaged packet and before the next keyframe (or max_resync_s): not sampled, since error
    # concealment smears them and smears look like manipulation to a deepfake classifier.
    concealed: int = 0
    restarts: int = 0  # jumps back in time the sampler treated as a stream restart
    duration_s: float = 0.0  # media time covered: last frame time - first frame time + one frame


def _is_url(source: str) -> bool:
    # Only the scheme matters, so only the scheme is parsed: urlsplit() also checks the authority and raises on a
    # malformed one ("rtsp://[::1"), which is still a URL, not a file name. (StreamSpec refuses such URLs.)
    scheme, colon, _ = source.partition(":")
    valid = bool(colon) and scheme[:1].isascii() and scheme[:1].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "+-.") for c in scheme)
    # A one-letter "scheme" is a Windows drive letter; "file:" URLs are files for our purposes too.
    return "://" in source and valid and len(scheme) > 1 and scheme.lower() != "file"


def open_container(
    url_or_path: str, *, timeout_s: float = 10.0, rtsp_transport: str = "tcp", hwaccel: Any | None = None,
    extra_options: dict[str, str] | None = None,
) -> av.container.InputContainer:
    """Open a file or a network source (RTSP, RTMP, HLS, HTTP…) for reading, or raise SourceError saying why.

    timeout_s bounds opening and each later read (PyAV's interrupt callback, all protocols). For RTSP the transport
    defaults to TCP (no UDP packet loss or NAT trouble) and `timeout` (FFmpeg ≥ 5: socket I/O timeout in
    microseconds; it was `stimeout` before) makes a dead server fail instead of hang. `extra_options` go to FFmpeg
    too (the source policy's `http_proxy`).

    hwaccel: a PyAV `HWAccel` (see `streamguard.ingest.nvdec`) to decode on the GPU. PyAV creates the hardware
    device after the input is open, so a device that fails there (GPU gone, out of decode memory) would fail a
    source that opens fine: the source is then opened again without it, and a warning says so.
    """
    is_url = _is_url(url_or_path)
    target = url_or_path
    if not is_url:
        path = Path(url_or_path.removeprefix("file:"))
        if not path.exists():
            raise SourceError(f"{url_or_path}: no such file")
        if path.is_dir():
            raise SourceError(f"{url_or_path}: is a directory, not a video file")
        if path.stat().st_size == 0:
            raise SourceError(f"{url_or_path}: empty file")
        # Always through FFmpeg's file protocol: a name like "concat:a|b" or "pipe:0" is then a file name, never a
        # protocol.
        target = "file:" + os.path.abspath(path)
    else:
        try:
            urlsplit(url_or_path).port  # noqa: B018 - parses the authority: a malformed one raises here
        except ValueError as exc:
            raise SourceError(f"{url_or_path}: not a valid URL ({exc})") from None
    scheme = url_or_path.partition(":")[0].lower() if is_url else "file"
    # Only the protocols this kind of source needs, nested ones included (an HLS playlist naming file: or data:
    # URLs, an RTSP server redirecting to another protocol): FFmpeg refuses the others.
    options: dict[str, str] = {"protocol_whitelist": PROTOCOLS[scheme]} if scheme in PROTOCOLS else {}
    if scheme in ("rtsp", "rtsps"):
        options |= {"rtsp_transport": rtsp_transport, "timeout": str(int(timeout_s * 1_000_000))}
    options |= extra_options or {}
    started = time.monotonic()
    try:
        if hwaccel is not None:
            try:
                return av.open(
                    target, mode="r", container_options=options, timeout=(timeout_s, timeout_s), hwaccel=hwaccel
                )
            except (av.FFmpegError, OSError) as exc:
                if not _raised_by_hwaccel(exc):
                    raise  # the source itself failed: no second try
                log.warning("%s: cannot decode on the GPU (%s); decoding on the CPU", redact_url(url_or_path), exc)
                started = time.monotonic()
        container = av.open(target, mode="r", container_options=options, timeout=(timeout_s, timeout_s))
    except (av.FFmpegError, OSError) as exc:
        elapsed = time.monotonic() - started
        reason = getattr(exc, "strerror", None) or str(exc)
        if isinstance(exc, av.error.ExitError) or (is_url and elapsed >= 0.9 * timeout_s):
            # ExitError: PyAV's interrupt callback fired. Protocol timeouts (RTSP `timeout`) surface as other
            # errors, e.g. InvalidDataError from an empty reply, so the clock is the reliable witness.
            message = f"timed out after {timeout_s:g} s while opening ({reason})"
        elif is_url:
            message = f"cannot open URL: {reason}"
        elif isinstance(exc, av.error.InvalidDataError):
            message = f"not a video or an unsupported format ({reason})"
        else:
            message = f"cannot open file: {reason}"
        raise SourceError(f"{url_or_path}: {message}") from exc
    return container


def _raised_by_hwaccel(exc: BaseException) -> bool:
    """Whether PyAV raised `exc` while creating the hardware device (its Cython frames name their module)."""
    tb = exc.__traceback__
    while tb is not None:
        if "hwaccel" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def redact_url(url: str) -> str:
    """The URL without its password (cameras carry credentials in RTSP URLs; reasons end up in events and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _video_stream(container: av.container.InputContainer, source: str) -> av.VideoStream:
    # Cover art in audio files is a one-picture "video" stream: not something to scan.
    candidates = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not candidates:
        raise SourceError(f"{source}: no video stream (not a video)")
    best = container.streams.best("video")
    return best if best in candidates else candidates[0]


class ProbeInfo(TypedDict):
    duration_s: float | None
    fps: float | None
    width: int
    height: int
    codec: str
    frames: int | None


def probe(path: str) -> ProbeInfo:
    """Duration (s), nominal fps, size, codec and frame count of the best video stream; for reports and benchmarks."""
    with open_container(path) as container:
        stream = _video_stream(container, path)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        return {  # a ProbeInfo
            "duration_s": duration,
            "fps": float(rate) if rate else None,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "codec": stream.codec_context.name,
            "frames": stream.frames or None,
        }


def _packets(
    container: av.container.InputContainer, stream: av.VideoStream, source: str, stats: DecodeStats
) -> Iterator[av.Packet]:
    """Demux the stream's packets, stepping over damaged ones (a fresh demux() resumes where reading stopped)."""
    errors_in_a_row = 0
    while True:
        try:
            for packet in container.demux(stream):
                errors_in_a_row = 0
                yield packet
            return
        except av.error.InvalidDataError as exc:
            stats.corrupt += 1
            errors_in_a_row += 1
            log.debug("%s: damaged data while demuxing: %s", source, exc)
            if errors_in_a_row >= _MAX_CONSECUTIVE_DEMUX_ERRORS:
                raise SourceError(f"{source}: unreadable stream ({errors_in_a_row} demux errors in a row)") from exc
        except av.error.ExitError as exc:
            raise SourceError(f"{source}: read timed out (no data)") from exc
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"{source}: read failed: {exc}") from exc


def _rgb(frame: av.VideoFrame, max_side: int | None) -> av.VideoFrame:
    """The frame in RGB, scaled down (area filter, one swscale pass) when its long side exceeds max_side."""
    w, h = frame.width, frame.height
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        # Even sizes keep chroma subsampling exact; never below 2 px.
        w, h = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
    return frame.reformat(format="rgb24")


@dataclass(slots=True)
class DecodedFrame:
    """A frame out of the decoder, with its own time and whether it may be sampled."""

    frame: av.VideoFrame
    pts_s: float | None  # its presentation time in seconds; None when it carries none
    # Decoded after a damaged packet and before the next keyframe (or max_resync_s): error concealment smears such
    # frames and smears look like manipulation to a deepfake classifier, so they are never sampled. The sampler
    # has already observed their time.
    concealed: bool


class _ResyncGate:
    """After a decode error, holds sampling back until a keyframe or `max_resync_s` of media time has passed."""

    def __init__(self, max_resync_s: float) -> None:
        self.max_resync_s = max_resync_s
        self.active = False
        self._since: float | None = None  # media time of the last good frame before the damage

    def damaged(self, last_good_s: float | None) -> None:
        if not self.active:
            self.active, self._since = True, last_good_s

    def lets_through(self, key_frame: bool, t_s: float) -> bool:
        if self.active:
            if self._since is None:
                self._since = t_s
            if key_frame or abs(t_s - self._since) >= self.max_resync_s:
                self.active = False
        return not self.active


def decode_video(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    source: str,
    sampler: TimestampSampler,
    stats: DecodeStats,
    *,
    gop: GopWatch,
    max_resync_s: float = 5.0,
    untimed_frames_counted: bool = True,
    on_packet: Callable[[], bool] | None = None,
) -> Iterator[DecodedFrame]:
    """Demux and decode `stream`, counting into `stats`, and yield every decoded frame with its time.

    Damaged packets are counted in ``stats.corrupt`` and skipped; decoding goes on with the next packet, and the
    frames after a failure come out `concealed` until a keyframe (see DecodedFrame). The caller decides which
    unconcealed frames to keep (``sampler.keep``). Raises SourceError when the source stops answering.
    `gop` sees every keyframe and says what to decode (`DecodeMode`); the decoder's skip_frame follows it.
    `untimed_frames_counted`: frames without timestamps get times by counting nominal frame durations (files; live
    sources stamp them with the wall clock instead), so when the packets carry none, no frame may be skipped.
    `on_packet` is called for every packet read (liveness for live sources); decoding stops when it returns False.
    """
    gate = _ResyncGate(max_resync_s)
    time_base = float(stream.time_base) if stream.time_base else None
    for packet in _packets(container, stream, source, stats):
        if on_packet is not None and not on_packet():
            return
        if packet.size and not _admit(packet, stream, gop, stats, time_base, untimed_frames_counted):
            continue
        try:
            frames = packet.decode()  # the final empty packet flushes the decoder's delayed frames
            if packet.size and gop.mode is DecodeMode.KEYFRAMES:
                frames += _drain(stream)
        except av.FFmpegError as exc:  # InvalidDataError mostly; any decode failure is one bad packet
            stats.corrupt += 1
            log.debug("%s: packet at dts %s failed to decode: %s", source, packet.dts, exc)
            gate.damaged(sampler.last_pts_s)
            continue
        for frame in frames:
            stats.decoded += 1
            pts_s = frame.pts * time_base if frame.pts is not None and time_base else None
            guess = pts_s if pts_s is not None else sampler.estimate()
            concealed = not gate.lets_through(frame.key_frame, guess)
            if concealed:
                stats.concealed += 1
                sampler.observe(pts_s)
            yield DecodedFrame(frame, pts_s, concealed)
        if gop.mode is not DecodeMode.ALL or gop.switches:
            stats.skipped_nonref = max(0, stats.packets - stats.skipped_nonkey - stats.decoded - stats.corrupt)
        stats.restarts = sampler.restarts


def _admit(packet: av.Packet, stream: av.VideoStream, gop: GopWatch, stats: DecodeStats, time_base: float | None,
           untimed_frames_counted: bool) -> bool:
    """Count a non-empty packet, let `gop` see it if it is a keyframe, and say whether it goes to the decoder."""
    stats.packets += 1
    if untimed_frames_counted and stats.packets == 1 and packet.pts is None and packet.dts is None:
        # No timestamps (raw Annex-B .h264): frame times can only be counted, one nominal frame duration per
        # decoded frame, and a skipped frame would go uncounted. Decode everything.
        gop.disable()
        stream.codec_context.skip_frame = DecodeMode.ALL.skip_frame
    if packet.is_keyframe:
        mode = gop.mode
        ts = packet.pts if packet.pts is not None else packet.dts
        if gop.keyframe(ts * time_base if ts is not None and time_base else None) is not mode:
            stream.codec_context.skip_frame = gop.mode.skip_frame  # from this keyframe on: it decodes on its own
        return True
    if gop.mode is DecodeMode.KEYFRAMES:
        stats.skipped_nonkey += 1  # never decoded: cheaper than handing it to a decoder that would skip it
        return False
    return True


def _drain(stream: av.VideoStream) -> list[av.VideoFrame]:
    """The frames a decoder holds back for reordering (B-frame streams keep a keyframe for up to two more), let out
    now, and the decoder made ready for the next packet: decoding keyframes alone, nothing is left to reorder."""
    codec = stream.codec_context
    frames = [f for f in codec.decode(None) if isinstance(f, av.VideoFrame)]
    codec.flush_buffers()
    return frames


def configure_decoder(stream: av.VideoStream, gop: GopWatch, *, thread_type: str = "SLICE") -> None:
    """Decoder settings for sampling: the mode `gop` starts in (non-reference frames skipped, unless told not to)."""
    stream.thread_type = thread_type
    stream.codec_context.skip_frame = gop.mode.skip_frame


def iter_sampled_frames(
    source: str,
    *,
    fps: float = 1.0,
    stream_id: str | None = None,
    skip_nonref: bool = True,
    stats: DecodeStats | None = None,
    max_side: int | None = None,
    timeout_s: float = 10.0,
    thread_type: str = "SLICE",
    max_resync_s: float = 5.0,
    hwaccel: Any | None = None,
    keyframes_max_gop_s: float | None = None,
) -> Iterator[SampledFrame]:
    """Decode the best video stream of a file or URL and yield the frames sampled at `fps` by presentation time.

    Damaged packets are counted in ``stats.corrupt`` and skipped; decoding goes on with the next packet. The frames
    that follow a decode error carry concealed damage until the next keyframe, so none of them is sampled until a
    keyframe comes or `max_resync_s` of media time has passed (streams with intra refresh have no keyframes).
    Frames without a timestamp get the previous frame's time + the nominal frame duration (see TimestampSampler).
    `wall_ts` is time.time() when the frame came out of the decoder. Raises SourceError when the source cannot be
    opened, has no video stream, or stops answering. `hwaccel`: see `open_container`. `keyframes_max_gop_s`: decode
    keyframes only once the file's keyframes prove to come at least this often (`GopWatch`); None (scans, training)
    keeps sample times on the sampling grid whatever the GOP.

    thread_type stays PyAV's "SLICE" by default: on a 2-core host, frame threading ("AUTO") cost ~8 % more CPU for
    an uncertain wall-time gain, and it delays every frame by the thread count, which live sources feel; pass "AUTO"
    where cores are spare and only one file is decoded at a time.
    """
    stats = stats if stats is not None else DecodeStats()
    stream_id = stream_id or (Path(source).name if not _is_url(source) else source)
    container = open_container(source, timeout_s=timeout_s, hwaccel=hwaccel)
    first_t: float | None = None
    gop = GopWatch(DecodeMode.NONREF if skip_nonref else DecodeMode.ALL, keyframes_max_gop_s)
    try:
        stream = _video_stream(container, source)
        configure_decoder(stream, gop, thread_type=thread_type)
        rate = stream.average_rate or stream.guessed_rate
        sampler = TimestampSampler(fps, frame_duration_s=1.0 / float(rate) if rate else None)
        decoded = decode_video(container, stream, source, sampler, stats, gop=gop, max_resync_s=max_resync_s)
        for item in decoded:
            kept = not item.concealed and sampler.keep(item.pts_s)
            t = sampler.last_pts_s or 0.0  # the given time, or the estimate for a frame without one
            if first_t is None:
                first_t = t
            stats.duration_s = round(max(0.0, t - first_t) + (sampler.frame_duration_s or 0.0), 6)
            if not kept:
                continue
            stats.sampled += 1
            wall_ts = time.time()
            rgb = _rgb(item.frame, max_side).to_ndarray()
            yield SampledFrame(stream_id=stream_id, pts_s=t, wall_ts=wall_ts, rgb=rgb)
    finally:
        container.close()
