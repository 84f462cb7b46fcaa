"""Ingest: the timestamp sampler alone, then real decoding of H.264 videos built from photos with PyAV."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamguard.ingest.av_source import DecodeStats, SourceError, iter_sampled_frames, open_container, probe
from streamguard.ingest.gop import DecodeMode, GopWatch
from streamguard.ingest.image import is_image, is_video, read_image
from streamguard.ingest.sampler import TimestampSampler, spread_phase

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = (320, 240)  # small frames keep encoding fast; the frame-index stamp needs 192 px of width
FPS = 25


@pytest.fixture(scope="session")
def photos(media) -> list:
    """Real face photos from ../shared/data when present, synthetic textures otherwise."""
    real = sorted((SHARED / "real_faces").glob("img*.jpg"))[:4]
    return real if len(real) == 4 else media.synthetic_images(4, SIZE)


@pytest.fixture(scope="session")
def cfr_video(media, photos, tmp_path_factory) -> Path:
    """8 s at 25 fps, H.264 with B-frames, a keyframe every 2 s."""
    out = tmp_path_factory.mktemp("media") / "cfr.mp4"
    return media.make_slideshow(photos, out, fps=FPS, seconds_per_image=2.0, size=SIZE, gop=2 * FPS)


@pytest.fixture(scope="session")
def vfr(media, photos, tmp_path_factory) -> tuple[Path, list[float]]:
    """10 s of irregular frame intervals (10–150 ms) with no frames from 4.0 s to 6.5 s."""
    times = media.vfr_times(10.0, seed=3, gap=(4.0, 2.5))
    out = tmp_path_factory.mktemp("media") / "vfr.mp4"
    return media.make_vfr(photos, out, times, size=SIZE), times


def samples(source: Path, **kwargs) -> tuple[list, DecodeStats]:
    stats = DecodeStats()
    return list(iter_sampled_frames(str(source), stats=stats, **kwargs)), stats


# --- sampler -------------------------------------------------------------------------------------------------------


def kept(sampler: TimestampSampler, times) -> list[float]:
    out = []
    for t in times:
        if sampler.keep(t):
            out.append(sampler.last_pts_s)
    return out


def test_constant_rate_keeps_one_frame_per_second():
    times = [i / 25 for i in range(250)]  # i / 25 is inexact in floats: ticks must not slip to the next frame
    assert kept(TimestampSampler(1.0), times) == pytest.approx([float(s) for s in range(10)])


@pytest.mark.parametrize(
    ("fps", "expected"),
    [(2.0, [math.ceil(k * 12.5) / 25 for k in range(20)]), (0.5, [0.0, 2.0, 4.0, 6.0, 8.0])],  # 0.5 s ticks: 0.52 s
)
def test_other_rates(fps, expected):
    assert kept(TimestampSampler(fps), [i / 25 for i in range(250)]) == pytest.approx(expected)


def test_ntsc_rate_does_not_drift():
    times = [i * 1001 / 30000 for i in range(30000 * 60 // 1001)]  # 60 s at 29.97 fps
    out = kept(TimestampSampler(1.0), times)
    assert len(out) == 60
    assert all(k <= t < k + 1001 / 30000 for k, t in enumerate(out))


def test_variable_rate_keeps_first_frame_at_or_after_each_tick():
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.01, 0.2, 400)).tolist()
    out = kept(TimestampSampler(1.0), times)
    t0 = times[0]
    assert out[0] == t0
    for k, t in enumerate(out[1:], start=1):
        tick = t0 + k
        assert t >= tick - 1e-9
        assert max(x for x in times if x < t) < tick  # nothing earlier was already past the tick
    assert len(out) == int(times[-1] - t0) + 1


def test_gap_gives_one_frame_not_a_burst():
    times = [i / 25 for i in range(51)] + [7.3 + i / 25 for i in range(60)]
    assert kept(TimestampSampler(1.0), times) == pytest.approx([0.0, 1.0, 2.0, 7.3, 8.3, 9.3])


def test_late_frame_reanchors_instead_of_doubling_up():
    # Frames from 2.04 to 3.66 lost (undecodable): 3.70 is kept for tick 3, and 4.00 must not follow 0.3 s later.
    times = [i / 25 for i in range(51)] + [3.7 + i / 25 for i in range(40)]
    assert kept(TimestampSampler(1.0), times) == pytest.approx([0.0, 1.0, 2.0, 3.7, 4.7])


def test_jump_backwards_is_a_restart():
    sampler = TimestampSampler(1.0)
    times = [100 + i / 25 for i in range(100)] + [i / 25 for i in range(60)]
    assert kept(sampler, times) == pytest.approx([100.0, 101.0, 102.0, 103.0, 0.0, 1.0, 2.0])
    assert sampler.restarts == 1


def test_small_step_backwards_is_jitter_not_a_restart():
    sampler = TimestampSampler(1.0)
    # 5.20, 6.64 then 5.96: the out-of-order output of a decoder after a damaged packet
    out = kept(sampler, [0.0, 1.0, 2.0, 3.0, 4.0, 5.2, 6.64, 5.96, 6.96, 7.96, 8.96])
    assert out == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.2, 6.64, 7.96, 8.96])
    assert sampler.restarts == 0


def test_missing_timestamps_use_nominal_frame_duration():
    sampler = TimestampSampler(1.0, frame_duration_s=0.04)
    out = kept(sampler, [None] * 100)
    assert out == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # Timestamps that come and go: a missing one continues from the last known time.
    sampler = TimestampSampler(1.0, frame_duration_s=0.04)
    assert kept(sampler, [10.0, 10.5, None, None]) == [10.0]
    assert sampler.last_pts_s == pytest.approx(10.58)


def test_missing_timestamps_without_nominal_rate_use_the_wall_clock():
    now = [50.0]
    sampler = TimestampSampler(1.0, clock=lambda: now[0])
    out = []
    for _ in range(30):  # 30 frames, 0.25 s of wall time apart, none stamped
        if sampler.keep(None):
            out.append(sampler.last_pts_s)
        now[0] += 0.25
    assert out == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])


@pytest.mark.parametrize("fps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rate_is_refused(fps):
    with pytest.raises(ValueError):
        TimestampSampler(fps)


# A phase moves a stream's ticks within the period; the first frame is still kept at once.
@pytest.mark.parametrize(
    ("phase", "expected"),
    [(0.25, [0.0] + [k + 0.28 for k in range(1, 10)]),  # next tick 1.25 periods on: never closer than half a period
     (0.75, [0.0] + [k + 0.76 for k in range(10)])],  # 0.75 periods on
)
def test_phase_shifts_the_ticks(phase, expected):
    assert kept(TimestampSampler(1.0, phase=phase), [i / 25 for i in range(250)]) == pytest.approx(expected)


@pytest.mark.parametrize("phase", [0.0, 0.1, 0.3, 0.5, 0.7, 0.99])
def test_phase_keeps_one_frame_per_tick_with_variable_rate(phase):
    rng = np.random.default_rng(2)
    times = np.cumsum(rng.uniform(0.01, 0.2, 400)).tolist()
    out = kept(TimestampSampler(1.0, phase=phase), times)
    t0 = times[0]
    first = phase if phase >= 0.5 else 1.0 + phase
    assert out[0] == t0
    for k, t in enumerate(out[1:]):
        tick = t0 + first + k
        assert t >= tick - 1e-9
        assert max(x for x in times if x < t) < tick  # the first frame at or after its tick, no burst
    assert len(out) == 1 + int(times[-1] - t0 - first) + 1
    assert min(np.diff(out)) >= 0.5


def test_phase_gap_gives_one_frame_and_restart_reanchors_on_the_phase():
    gap = [i / 25 for i in range(51)] + [7.3 + i / 25 for i in range(60)]
    assert kept(TimestampSampler(1.0, phase=0.5), gap) == pytest.approx([0.0, 0.52, 1.52, 7.3, 8.3, 9.3])
    sampler = TimestampSampler(1.0, phase=0.5)
    restart = [100 + i / 25 for i in range(100)] + [i / 25 for i in range(60)]
    assert kept(sampler, restart) == pytest.approx([100.0, 100.52, 101.52, 102.52, 103.52, 0.0, 0.52, 1.52])
    assert sampler.restarts == 1


@pytest.mark.parametrize("phase", [0.25, 0.75])
def test_phase_costs_a_source_at_the_sampling_rate_one_frame_at_most(phase):
    # Frames 1 s apart sampled at 1 FPS: every frame is a sample; a phase may skip the second, then the grid
    # follows the frames again.
    out = kept(TimestampSampler(1.0, phase=phase), [float(s) for s in range(10)])
    assert len(out) >= 9 and out[0] == 0.0 and out[-1] == 9.0


def test_phase_with_the_wall_clock():
    now = [50.0]
    sampler = TimestampSampler(1.0, phase=0.5, clock=lambda: now[0])
    out = []
    for _ in range(30):  # 30 unstamped frames, 0.25 s of wall time apart (a live track without pts)
        if sampler.keep(None):
            out.append(sampler.last_pts_s)
        now[0] += 0.25
    assert out == pytest.approx([0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5])


@pytest.mark.parametrize("phase", [-0.1, 1.0, float("nan"), float("inf")])
def test_bad_phase_is_refused(phase):
    with pytest.raises(ValueError):
        TimestampSampler(1.0, phase=phase)


def test_spread_phase_halves_the_widest_gap():
    phases: list[float] = []
    for _ in range(8):
        phases.append(spread_phase(phases))
    assert phases == [0.0, 0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875]
    phases.remove(0.25)  # a stream left: the next one takes its place
    assert spread_phase(phases) == 0.25
    phases = []
    for _ in range(20):
        phases.append(spread_phase(phases))
    gaps = np.diff(sorted(phases) + [1.0])
    assert len(set(phases)) == 20 and min(gaps) >= 1 / 40


# --- decoding ------------------------------------------------------------------------------------------------------


def test_decode_cfr_samples_once_per_second(cfr_video, media):
    frames, stats = samples(cfr_video)
    assert len(frames) == 8 == stats.sampled
    assert [f.pts_s for f in frames][0] == 0.0
    gaps = np.diff([f.pts_s for f in frames])
    assert np.all(np.abs(gaps - 1.0) <= 1 / FPS + 1e-6)
    for f in frames:
        assert f.rgb.shape == (SIZE[1], SIZE[0], 3) and f.rgb.dtype == np.uint8
        assert f.stream_id == "cfr.mp4"
        assert media.read_stamp(f.rgb) == round(f.pts_s * FPS)  # the picture is the frame its timestamp names
    assert stats.corrupt == 0
    assert stats.packets == 8 * FPS
    assert stats.duration_s == pytest.approx(8.0)
    assert frames[0].wall_ts <= frames[-1].wall_ts <= time.time()


def test_skip_nonref_decodes_fewer_frames_and_keeps_sample_times(cfr_video, media):
    full, full_stats = samples(cfr_video, skip_nonref=False)
    fast, fast_stats = samples(cfr_video, skip_nonref=True)
    assert full_stats.decoded == 8 * FPS
    assert fast_stats.decoded < 0.75 * full_stats.decoded  # x264's non-reference B-frames were never decoded
    assert fast_stats.skipped_nonref == fast_stats.packets - fast_stats.decoded
    assert len(fast) == len(full)
    for a, b in zip(full, fast, strict=True):
        assert 0 <= b.pts_s - a.pts_s <= 1 / FPS + 1e-6  # within one frame
        assert media.read_stamp(b.rgb) == round(b.pts_s * FPS)


@pytest.mark.parametrize("fps", [2.0, 0.5])
def test_decode_other_rates(cfr_video, fps):
    frames, _ = samples(cfr_video, fps=fps)
    assert len(frames) == round(8 * fps)
    # The first decoded frame at or after each tick; skip_nonref may skip up to two B-frames past the tick.
    late = np.array([f.pts_s - k / fps for k, f in enumerate(frames)])
    assert np.all((late >= 0) & (late < 3 / FPS))


def test_decode_vfr(vfr, media):
    path, times = vfr
    frames, stats = samples(path, skip_nonref=False)
    pts = [f.pts_s for f in frames]
    assert stats.decoded == len(times)
    # Ticks 0..3, then the gap 4.0–6.5 s gives one frame (6.5), then one per second of the new grid.
    assert len(frames) == 8
    assert pts[4] == pytest.approx(6.5)
    for f in frames:
        assert times[media.read_stamp(f.rgb)] == pytest.approx(f.pts_s, abs=1e-3)
    fast, _ = samples(path, skip_nonref=True)
    assert len(fast) == len(frames)
    for a, b in zip(frames, fast, strict=True):
        assert 0 <= b.pts_s - a.pts_s <= 0.31  # at most two skipped frames of ≤ 150 ms later
        assert times[media.read_stamp(b.rgb)] == pytest.approx(b.pts_s, abs=1e-3)


def test_missing_timestamps_raw_h264(media, photos, tmp_path):
    # A raw Annex-B stream carries no timestamps at all: times come from the nominal rate, and skip_nonref is
    # turned off for it (a skipped frame could not be counted).
    path = media.make_slideshow(photos, tmp_path / "raw.h264", fps=FPS, seconds_per_image=1.0, size=SIZE)
    frames, stats = samples(path)
    assert [f.pts_s for f in frames] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert [media.read_stamp(f.rgb) for f in frames] == [0, 25, 50, 75]
    assert stats.decoded == 4 * FPS


def test_corrupt_packets_are_counted_and_decoding_goes_on(cfr_video, media, tmp_path):
    bad = media.corrupt_copy(cfr_video, tmp_path / "bad.mp4", at=0.4, length=2048, spots=2)
    for skip in (True, False):
        frames, stats = samples(bad, skip_nonref=skip)
        assert stats.corrupt > 0
        assert stats.concealed > 0
        assert stats.sampled == len(frames) >= 5
        # Decoding went on to the end (the clip's last frame is at 7.96 s): sampling resumed after the damage.
        assert frames[-1].pts_s >= 7.0
        # No smeared frame (one decoded from a damaged reference) was sampled: each picture is its own frame.
        assert all(media.read_stamp(f.rgb) == round(f.pts_s * FPS) for f in frames)
        # Out-of-order or late frames around the damage added no extra samples.
        assert np.all(np.diff([f.pts_s for f in frames]) >= 0.5)


def test_resync_is_bounded_without_keyframes(media, photos, tmp_path):
    # x264 intra refresh: no IDR frame after the first one, so after damage only max_resync_s ends the wait.
    clean = media.make_slideshow(
        photos, tmp_path / "ir.mp4", fps=FPS, seconds_per_image=2.0, size=SIZE,
        options={"x264-params": "intra-refresh=1"},
    )
    bad = media.corrupt_copy(clean, tmp_path / "ir_bad.mp4", at=0.3, length=1500)
    patient, stats = samples(bad, max_resync_s=5.0)
    assert stats.corrupt > 0 and stats.concealed > 0
    eager, _ = samples(bad, max_resync_s=1.0)
    damage_at = max(f.pts_s for f in patient if f.pts_s < 4.0)
    resumed = [f.pts_s for f in eager if f.pts_s > damage_at]
    assert resumed and resumed[0] <= damage_at + 1.0 + 1.0  # waited at most max_resync_s, then the next tick
    assert len(eager) > len(patient)


def test_max_side_downscales(cfr_video):
    frames, _ = samples(cfr_video, max_side=160)
    assert frames[0].rgb.shape == (120, 160, 3)


def test_probe(cfr_video):
    info = probe(str(cfr_video))
    assert info["codec"] == "h264" and info["width"] == SIZE[0] and info["height"] == SIZE[1]
    assert info["fps"] == pytest.approx(FPS)
    assert info["duration_s"] == pytest.approx(8.0, abs=0.05)


# --- keyframes-only decoding ---------------------------------------------------------------------------------------


def watch(times: list[float], max_gop_s: float | None = 1.0) -> tuple[GopWatch, list[DecodeMode]]:
    gop = GopWatch(DecodeMode.NONREF, max_gop_s)
    return gop, [gop.keyframe(t) for t in times]


def test_gop_watch_switches_after_two_short_intervals_and_back_at_a_long_one():
    K, N = DecodeMode.KEYFRAMES, DecodeMode.NONREF
    gop, modes = watch([0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0])
    assert modes == [N, N, K, K, N, N, K]
    assert gop.gop_s == 1.0 and gop.switches == 3
    # 29.97 fps with "GOP = 30 frames": 1.001 s intervals still count as 1 s (timestamps are rounded to a clock)
    assert watch([k * 1.001 for k in range(4)])[1][-1] is K
    assert watch([0.0, 1.2, 2.4, 3.6])[1][-1] is N  # a 1.2 s GOP gets fewer than 1 sample/s keyframes-only
    assert watch([0.0, 1.2, 2.4, 3.6], max_gop_s=1.5)[1][-1] is K  # unless the operator allows it
    assert watch([0.0, 1.0, 2.0], max_gop_s=None)[1] == [N, N, N]  # offline scans never switch


def test_gop_watch_measures_afresh_after_a_restart_and_ignores_untimed_keyframes():
    gop, modes = watch([10.0, 11.0, 12.0, 0.0, 1.0, None, 2.0])  # a new session: timestamps start over
    assert modes[2] is DecodeMode.KEYFRAMES
    assert modes[3:] == [DecodeMode.KEYFRAMES] * 4  # the same GOP after the restart: no reason to leave
    gop, modes = watch([0.0, 1.0, 0.5, 3.5])  # back, then a 3 s interval: fallback at once
    assert modes[-1] is DecodeMode.NONREF
    with pytest.raises(ValueError, match="fallback"):
        GopWatch(DecodeMode.KEYFRAMES, 1.0)
    with pytest.raises(ValueError, match="positive"):
        GopWatch(DecodeMode.NONREF, 0.0)


@pytest.fixture(scope="session")
def camera_video(media, photos, tmp_path_factory) -> Path:
    """8 s at 25 fps as an IP camera sends it: a keyframe every second, no B-frames."""
    out = tmp_path_factory.mktemp("media") / "camera.mp4"
    return media.make_slideshow(photos, out, fps=FPS, seconds_per_image=2.0, size=SIZE, gop=FPS,
                                options={"bf": "0"})


def test_short_gop_decodes_keyframes_only_with_the_same_samples(camera_video, media):
    full, full_stats = samples(camera_video)
    fast, fast_stats = samples(camera_video, keyframes_max_gop_s=1.0)
    assert full_stats.decoded == 8 * FPS and full_stats.skipped_nonref == 0  # no B-frames: nothing to skip
    # Every frame until two 1 s intervals are measured (keyframes at 0, 1, 2 s), then the 5 keyframes after
    assert fast_stats.decoded == 2 * FPS + 1 + 5
    assert fast_stats.skipped_nonkey == fast_stats.packets - fast_stats.decoded
    assert [f.pts_s for f in fast] == [f.pts_s for f in full] == pytest.approx([float(k) for k in range(8)])
    assert [media.read_stamp(f.rgb) for f in fast] == [k * FPS for k in range(8)]
    for a, b in zip(full, fast, strict=True):
        assert np.array_equal(a.rgb, b.rgb)  # a keyframe decodes alone: the same picture as a full decode


def test_short_gop_with_b_frames_lets_out_each_keyframe_held_for_reordering(media, photos, tmp_path):
    path = media.make_slideshow(photos, tmp_path / "b.mp4", fps=FPS, seconds_per_image=2.0, size=SIZE, gop=FPS)
    fast, stats = samples(path, keyframes_max_gop_s=1.0)
    assert stats.skipped_nonkey > 4 * FPS
    assert [f.pts_s for f in fast] == pytest.approx([float(k) for k in range(8)])
    assert [media.read_stamp(f.rgb) for f in fast] == [k * FPS for k in range(8)]


def test_long_gop_falls_back_to_skipping_nonref(cfr_video):
    default, _ = samples(cfr_video)
    fast, stats = samples(cfr_video, keyframes_max_gop_s=1.0)  # keyframes every 2 s: 1 sample per 2 s at most
    assert stats.skipped_nonkey == 0 and stats.skipped_nonref > 0
    assert [f.pts_s for f in fast] == [f.pts_s for f in default]


def test_gop_growing_mid_stream_switches_back_then_keyframes_again(media, photos, tmp_path):
    # Keyframes every second for 0-4 s, one 2 s GOP (4-6 s), every second again from 6 s (12 s in all)
    keys = {k * FPS for k in (0, 1, 2, 3, 4, 6, 8, 9, 10, 11)}
    path = media.make_slideshow(photos, tmp_path / "mixed.mp4", fps=FPS, seconds_per_image=3.0, size=SIZE,
                                gop=10 * FPS, options={"bf": "0"}, keyframes=keys)
    frames, stats = samples(path, keyframes_max_gop_s=1.0)
    pts = [f.pts_s for f in frames]
    # Keyframes-only from 2 s; the long GOP's 5 s sample is lost (its frames were not decoded, and the keyframe at
    # 6 s is where that shows); decoding falls back for 6-8 s and goes keyframes-only again from 10 s.
    assert pts == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert [media.read_stamp(f.rgb) for f in frames] == [round(t * FPS) for t in pts]
    assert stats.decoded == 2 * FPS + 1 + 2 + 4 * FPS + 2
    assert stats.concealed == 0 and stats.corrupt == 0


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        next(iter_sampled_frames(str(tmp_path / "nope.mp4")))


def test_text_file_named_mp4(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n" * 50)
    with pytest.raises(SourceError, match="not a video"):
        next(iter_sampled_frames(str(fake)))


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(SourceError, match="empty file"):
        open_container(str(tmp_path / "empty.mp4"))
    with pytest.raises(SourceError, match="directory"):
        open_container(str(tmp_path))


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(SourceError, match="no video stream"):
        next(iter_sampled_frames(str(path)))


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_unresponsive_url_times_out(silent_port, scheme):
    started = time.monotonic()
    with pytest.raises(SourceError, match="timed out"):
        open_container(f"{scheme}://127.0.0.1:{silent_port}/live", timeout_s=0.5)
    assert time.monotonic() - started < 3.0


def test_refused_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match="cannot open URL"):
        open_container(f"rtsp://127.0.0.1:{port}/live", timeout_s=2.0)


# --- images --------------------------------------------------------------------------------------------------------


def test_read_image(tmp_path):
    bgr = np.zeros((40, 60, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    frame = read_image(tmp_path / "red.png")
    assert frame.rgb.shape == (40, 60, 3)
    assert tuple(frame.rgb[0, 0]) == (255, 0, 0)
    assert frame.stream_id == "red.png" and frame.pts_s == 0.0


def test_unreadable_images(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        read_image(tmp_path / "missing.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match="not a readable image"):
        read_image(junk)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SourceError, match="not a readable image"):
        read_image(tmp_path / "empty.png")


def test_suffixes():
    assert is_image("a/B.JPG") and is_image("x.png") and not is_image("x.mp4")
    assert is_video("clip.MP4") and is_video("x.webm") and is_video("x.mov") and not is_video("x.jpg")
    assert not is_image("notes.txt") and not is_video("notes.txt")


# --- shared data ---------------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_ffpp_real_clip_one_sample_per_second():
    path = SHARED / "ffpp_smoke" / "real_519.mp4"
    if not path.exists():
        pytest.skip(f"{path} is absent (needs ../shared/data next to the repo)")
    frames, stats = samples(path)
    assert abs(len(frames) - 30) <= 1
    assert frames[0].rgb.shape == (480, 640, 3)
    assert np.all(np.abs(np.diff([f.pts_s for f in frames]) - 1.0) <= 0.04 + 1e-6)
    assert stats.corrupt == 0 and stats.duration_s == pytest.approx(30.0, abs=0.1)
    assert stats.decoded < stats.packets  # non-reference frames were skipped


@pytest.mark.parametrize("url", ["rtsp://[::1", "rtsp://h:abc/x", "rtsp://127.0.0.1:99999/x"])
def test_malformed_urls_are_a_source_error_naming_the_problem(url):
    with pytest.raises(SourceError, match="not a valid URL"):
        open_container(url, timeout_s=1.0)
