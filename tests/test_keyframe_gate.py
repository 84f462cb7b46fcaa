"""WHIP ingest decodes keyframes only, asked of the publisher when a sample is due (ingest/keyframe_gate.py).

Real parts throughout: frames encoded by libvpx and x264 (PyAV) from a real face video, aiortc's own frame and codec
types, the real TimestampSampler; end to end, real aiortc publishers (`streamguard.client.publish`, which answers
PLIs as any WebRTC sender does, and a relay of pre-encoded packets, which cannot) into the real WhipManager.
Chromium's side is in test_sender_caps.py.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from test_webrtc import (
    BASE,
    Recorder,
    face_video,
    http_client,
    loopback_ice,
    make_manager,
    psnr,
    run,
    source_frames,
    until,
)

from streamguard.client import publish
from streamguard.ingest.keyframe_gate import KeyframeGate, is_keyframe
from streamguard.ingest.sampler import TimestampSampler

__all__ = ["face_video", "loopback_ice"]  # fixtures, imported for the tests below

pytestmark = pytest.mark.timeout(120)
CODECS = {"VP8": "libvpx", "H264": "libx264"}


def encode(path: Path, codec: str, n: int, gop: int) -> list[tuple[bytes, int, bool]]:
    """The first `n` frames of a video encoded as WebRTC senders do (no B-frames, Annex B for H.264), a keyframe
    every `gop` frames, at 320x240 (the gate reads frame headers; smaller frames keep the test fast): (bytes, pts in
    1/25 s, the encoder's keyframe flag) per frame."""
    enc = av.CodecContext.create(CODECS[codec], "w")
    enc.width, enc.height, enc.pix_fmt = 320, 240, "yuv420p"
    enc.time_base = fractions.Fraction(1, 25)
    enc.gop_size = gop
    h264 = {"bf": "0", "keyint_min": str(gop), "sc_threshold": "0", "preset": "ultrafast", "tune": "zerolatency"}
    vp8 = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "kf-max-dist": str(gop)}
    enc.options = h264 if codec == "H264" else vp8
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == n:
                break
            frame = frame.reformat(width=320, height=240, format="yuv420p")
            frame.pts, frame.time_base = i, enc.time_base
            out += [(bytes(p), int(p.pts), bool(p.is_keyframe)) for p in enc.encode(frame)]
    out += [(bytes(p), int(p.pts), bool(p.is_keyframe)) for p in enc.encode(None)]
    return out


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_is_keyframe_agrees_with_the_encoder(face_video, codec):
    frames = encode(face_video, codec, 30, gop=10)
    flags = [is_keyframe(codec, data) for data, _, _ in frames]
    assert flags == [key for _, _, key in frames]
    assert flags.count(True) == 3 and flags[0]  # frames 0, 10, 20
    assert is_keyframe("opus", b"\x00" * 8) is None  # not a codec it knows: the gate passes everything
    assert is_keyframe(codec, b"") is False


class Receiver:
    """A 25 fps publisher that never answers a keyframe request, a gate with a clock that follows the frames, and
    aiortc's decoder thread's end of the queue on this thread: what the gate passes is decoded and offered to the
    sampler, as WhipManager's drain does."""

    def __init__(self, codec: str) -> None:
        self.ctx = av.CodecContext.create(codec.lower(), "r")
        self.params = RTCRtpCodecParameters(mimeType=f"video/{codec}", clockRate=90_000, payloadType=96)
        self.sampler = TimestampSampler(1.0)
        self.now = 0.0
        self.asked: list[float] = []
        self.gate = KeyframeGate(next_tick=lambda: self.sampler.next_tick_s,
                                 request_keyframe=lambda: self.asked.append(self.now), retry_s=0.5, give_up_s=2.5,
                                 clock=lambda: self.now)
        self.decoded: list[float] = []
        self.kept: list[float] = []

    def receive(self, frames: list[tuple[bytes, int, bool]], until_all: bool = False) -> None:
        for data, pts, _ in frames:
            self.now = pts / 25
            self.gate.put((self.params, JitterFrame(data, pts * 3600)))
            self.drain(self.gate)
            if until_all and self.gate.mode == "all":
                return

    def drain(self, gate: KeyframeGate) -> None:
        while not gate.empty():
            _, frame = gate.get_nowait()
            for _ in self.ctx.decode(av.Packet(frame.data)):
                t = frame.timestamp / 90_000
                self.decoded.append(t)
                if self.sampler.keep(t):
                    self.kept.append(t)


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_gate_passes_keyframes_asks_for_one_per_sample_and_falls_back(face_video, codec):
    """A 25 fps publisher with a 2 s GOP that never answers: the gate asks for a keyframe when each sample falls due,
    passes the natural keyframes, and gives up after give_up_s (then every frame is decoded)."""
    rx = Receiver(codec)
    rx.receive(encode(face_video, codec, 250, gop=50), until_all=True)
    gate, dec, asked = rx.gate, rx, rx.asked
    # Keyframes at 0, 2, 4, ... s passed and sampled; every other frame skipped. A sample due at 1 s, 3 s, ...: a
    # request at once and again after retry_s (the first frame 0.5 s on); the 2 s GOP never leaves one due 2.5 s.
    assert gate.mode == "keyframes" and dec.decoded == dec.kept == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert gate.passed == 5 and gate.skipped == 245
    assert np.allclose(asked, [1.0, 1.52, 3.0, 3.52, 5.0, 5.52, 7.0, 7.52, 9.0, 9.52]), asked

    # The same publisher with a 4 s GOP: a sample due at 1 s, no keyframe by 3.5 s: every frame from the next
    # keyframe on (the ones between cannot be decoded without the frames skipped before them).
    rx = Receiver(codec)
    rx.receive(encode(face_video, codec, 200, gop=100))
    gate, dec, asked = rx.gate, rx, rx.asked
    assert gate.mode == "all" and np.allclose(asked, [1.0, 1.52, 2.04, 2.56, 3.08]), asked
    assert gate.skipped == 99 and gate.passed == 101  # frames 1-99 skipped, then every frame from 4 s on
    assert dec.decoded[:3] == [0.0, 4.0, 4.04] and len(dec.decoded) == 101
    assert dec.kept == [0.0, 4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_keyframes_before_the_next_tick_are_not_decoded(face_video, codec):
    """A keyframe every 0.4 s (or a second answer to a retried request): only the first keyframe at or after each
    tick is decoded, the one the sampler keeps; the others would be decoded only to be dropped."""
    rx = Receiver(codec)
    rx.receive(encode(face_video, codec, 100, gop=10))
    assert rx.gate.mode == "keyframes"
    assert rx.decoded == rx.kept == [0.0, 1.2, 2.0, 3.2]  # ticks at 0, 1, 2, 3 s; keyframes every 0.4 s
    assert rx.gate.passed == 4 and rx.gate.skipped == 96


def test_gate_passes_the_stop_signal_and_unknown_codecs():
    gate = KeyframeGate(next_tick=lambda: None, request_keyframe=lambda: None)
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48_000, payloadType=111)
    gate.put((opus, JitterFrame(b"\x01\x02\x03\x04\x05\x06", 0)))
    assert gate.mode == "all" and gate.passed == 1
    gate.put(None)
    assert gate.qsize() == 2 and gate.get_nowait()[0] is opus and gate.get_nowait() is None


# -- end to end: real aiortc peers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["H264", "VP8"])
def test_publisher_answers_plis_and_the_server_decodes_one_frame_a_second(loopback_ice, face_video, codec):
    """streamguard.client at its default 5 fps: the server decodes only the keyframes it asks for, one a second,
    and samples each; the samples are the right pictures, about one a second."""
    reference = source_frames(face_video, 750)

    async def main():
        rec = Recorder()
        manager = make_manager(rec, fps=1.0, keyframes_only=True)
        async with http_client(manager) as http:
            pub = await publish(f"{BASE}/v1/whip", str(face_video), participant_id="kim", codec=codec, http=http)
            (session,) = manager.sessions.values()
            assert session.decode_mode == "keyframes"
            await rec.wait_frames(2, 20)
            decoded0, skipped0, kept0, t0 = session.video_frames, session.skipped_frames, session.kept_frames, \
                time.monotonic()
            await rec.wait_frames(8, 30)
            dt = time.monotonic() - t0
            decoded, skipped = session.video_frames - decoded0, session.skipped_frames - skipped0
            kept = session.kept_frames - kept0
            requests = session._gate.requests if session._gate else 0
            mode = session.decode_mode
            await pub.close()
            await manager.close_all()
        assert mode == "keyframes"
        assert decoded <= kept + 2, (decoded, kept)  # nothing decoded but what is sampled (a spare keyframe or two)
        assert skipped / dt >= 2.5, (skipped, dt)  # ~4 of the 5 frames a second never reach the decoder
        assert requests >= 6, requests
        # One sample a second, each a keyframe that came within half a period after its tick (measured: 0.4 s
        # later with aiortc's sender at 5 fps, which keys the frame after the one it was encoding).
        pts = np.array([f.pts_s for f in rec.frames])
        late = pts - pts[0] - np.arange(len(pts))
        assert np.all((late >= 0) & (late < 0.5)), pts
        for f in rec.frames:  # each sample is the source frame of its time (as in test_webrtc: > 28 dB)
            k = round(f.pts_s * 25)
            best = max(psnr(f.rgb, reference[j]) for j in (k - 1, k, k + 1) if 0 <= j < len(reference))
            assert best > 28, (f.pts_s, best)

    run(main())


class PacketRelay(MediaStreamTrack):
    """A relay of pre-encoded H.264 (a restreamed camera): it sends the packets it has and cannot make a keyframe
    when asked; aiortc packetises av.Packets as they are."""

    kind = "video"

    def __init__(self, frames: list[tuple[bytes, int, bool]]) -> None:
        super().__init__()
        self.frames = frames
        self.index = 0
        self.start: float | None = None

    async def recv(self) -> av.Packet:
        data, pts, _ = self.frames[self.index % len(self.frames)]
        loops = self.index // len(self.frames)
        self.index += 1
        self.start = self.start or time.monotonic()
        pts += loops * len(self.frames)
        await asyncio.sleep(max(0.0, self.start + pts / 25 - time.monotonic()))
        packet = av.Packet(data)
        packet.pts, packet.time_base = pts, fractions.Fraction(1, 25)
        return packet


def test_publisher_that_ignores_keyframe_requests_is_decoded_in_full(loopback_ice, face_video):
    frames = encode(face_video, "H264", 500, gop=250)  # a keyframe every 10 s

    async def main():
        rec = Recorder()
        manager = make_manager(rec, fps=1.0, keyframes_only=True)
        async with http_client(manager) as http:
            track = PacketRelay(frames)
            pub = await publish(f"{BASE}/v1/whip", track, participant_id="relay", codec="H264", http=http,
                                audio=False, max_fps=None)
            (session,) = manager.sessions.values()
            await rec.wait_frames(1, 20)  # the first keyframe
            await until(lambda: session.decode_mode == "all", 10, "the fall-back to decoding every frame")
            await until(lambda: len(rec.frames) >= 4, 20, "samples after the next keyframe")
            decoded0, t0 = session.video_frames, time.monotonic()
            await rec.wait_frames(7, 20)
            rate = (session.video_frames - decoded0) / (time.monotonic() - t0)
            await pub.close()
            track.stop()
            await manager.close_all()
        assert rate > 15, rate  # every frame (25 fps) decoded now
        assert np.allclose(np.diff([f.pts_s for f in rec.frames[-4:]]), 1.0, atol=0.1)

    run(main())


def test_install_leaves_a_receiver_it_does_not_know_alone(caplog):
    from aiortc import RTCRtpReceiver

    from streamguard.ingest import keyframe_gate

    class Transport:  # what RTCRtpReceiver's constructor reads of its DTLS transport
        state = "new"

        def _register_rtp_receiver(self, *args: object) -> None: ...

    receiver = RTCRtpReceiver("video", Transport())
    gate = keyframe_gate.install(receiver, lambda: None, lambda coro: coro.close())
    assert isinstance(gate, KeyframeGate) and receiver._RTCRtpReceiver__decoder_queue is gate  # type: ignore[attr-defined]
    # Another object (aiortc's internals changed, or its decoder already started): nothing touched, every frame decoded.
    assert keyframe_gate.install(object(), lambda: None, lambda coro: coro.close()) is None
    assert "decoding every frame" in caplog.text
