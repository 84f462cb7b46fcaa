"""Build small, real test videos with PyAV: slideshows of still photos, variable-frame-rate clips, corrupted copies.

Every frame carries its own index as a strip of black/white blocks in the top-left corner (see `read_stamp`), so a
test can check which source frame a decoder handed back and compare it with the timestamp it reported.

Used by tests (they put this folder on sys.path) and from the command line:

    python tools/make_test_media.py slideshow out.mp4 ../shared/data/real_faces/img1.jpg ... --fps 25 --seconds 2
    python tools/make_test_media.py vfr out.mp4 IMAGES... --seconds 10
    python tools/make_test_media.py corrupt in.mp4 out.mp4 --at 0.5 --length 4096
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Collection, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

ImageLike = str | Path | np.ndarray

STAMP_BITS = 12
STAMP_BLOCK = 16  # px; large enough to survive H.264/VP8 at the qualities used here


def load_image(image: ImageLike) -> np.ndarray:
    """An RGB uint8 image from a path or an array (arrays are taken as RGB already)."""
    if isinstance(image, np.ndarray):
        return image
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{image}: cannot read image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def synthetic_images(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[np.ndarray]:
    """Textured stand-ins for photos (gradients + shapes) for when no real photos are at hand."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack(
            [(xx * rng.uniform(0.2, 0.5)) % 256, (yy * rng.uniform(0.2, 0.5)) % 256, ((xx + yy) * 0.3) % 256], -1
        ).astype(np.uint8)
        for _ in range(6):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(base, center, int(rng.integers(20, h // 3)), c, -1)
        out.append(base)
    return out


def fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Letterbox an image into size (w, h), keeping its aspect ratio."""
    w, h = size
    ih, iw = rgb.shape[:2]
    scale = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (nw, nh), interpolation=interp)
    canvas = np.zeros((h, w, 3), np.uint8)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = small
    return canvas


def stamp(rgb: np.ndarray, index: int) -> np.ndarray:
    """Write index into the top-left corner as STAMP_BITS black/white blocks (MSB first)."""
    out = rgb.copy()
    b = STAMP_BLOCK
    for bit in range(STAMP_BITS):
        on = (index >> (STAMP_BITS - 1 - bit)) & 1
        out[0:b, bit * b : (bit + 1) * b] = 255 if on else 0
    return out


def read_stamp(rgb: np.ndarray) -> int:
    """The frame index written by `stamp` (reads the centre of each block, so compression noise does not matter)."""
    b = STAMP_BLOCK
    value = 0
    for bit in range(STAMP_BITS):
        patch = rgb[b // 4 : 3 * b // 4, bit * b + b // 4 : bit * b + 3 * b // 4]
        value = (value << 1) | int(patch.mean() > 127)
    return value


def _frames(
    images: Sequence[ImageLike], n_frames: int, size: tuple[int, int], per_image: float
) -> Iterator[np.ndarray]:
    """n_frames frames: each image shown for `per_image` of the frames, slowly panning so P-frames carry real data."""
    fitted = [fit(load_image(im), (size[0] + 32, size[1] + 24)) for im in images]
    w, h = size
    for i in range(n_frames):
        k = min(int(i / per_image), len(fitted) - 1) if per_image > 0 else 0
        src = fitted[k % len(fitted)]
        phase = 1 - abs((i % 48) / 24 - 1)  # pan 32×24 px and back smoothly: every frame differs, no scene cuts
        dx, dy = round(32 * phase), round(24 * phase)
        yield stamp(np.ascontiguousarray(src[dy : dy + h, dx : dx + w]), i)


def _add_stream(
    container: av.container.OutputContainer,
    codec: str,
    rate: Fraction | int,
    size: tuple[int, int],
    gop: int,
    crf: int,
    options: dict[str, str] | None = None,
) -> av.VideoStream:
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not available in this PyAV build")
    stream = container.add_stream(codec, rate=rate)
    assert isinstance(stream, av.VideoStream)  # a video codec's stream
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        # B-frames on (x264 default 3, with b-pyramid): real files have non-reference frames that skip_frame can drop.
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(gop), "keyint_min": str(gop)}
    elif codec in ("libvpx", "libvpx-vp9"):
        stream.options = {"crf": str(crf), "b": "1M", "g": str(gop), "deadline": "realtime", "cpu-used": "8"}
    else:
        stream.options = {"g": str(gop)}
    stream.options = {**stream.options, **(options or {})}
    return stream


def make_slideshow(
    images: Sequence[ImageLike],
    out_path: str | Path,
    *,
    fps: int = 25,
    seconds_per_image: float = 1.0,
    size: tuple[int, int] = (640, 480),
    codec: str = "libx264",
    gop: int | None = None,
    crf: int = 28,
    options: dict[str, str] | None = None,
    keyframes: Collection[int] = (),
) -> Path:
    """A constant-frame-rate video: each image for seconds_per_image; frame i is stamped with i, at pts i/fps.

    The container follows the suffix (.mp4, .mkv, .webm, .ts, .h264 raw Annex-B); gop defaults to 2 s; options go
    to the encoder last (e.g. ``{"x264-params": "intra-refresh=1"}`` for a stream without periodic keyframes, or
    ``{"bf": "0"}`` for one without B-frames, as IP cameras send). `keyframes`: frame indices forced to be keyframes
    besides the GOP's (a GOP that changes mid-stream: a long `gop` plus the keyframes wanted).
    """
    if not images:
        raise ValueError("no images")
    out_path = Path(out_path)
    n_frames = max(1, round(len(images) * seconds_per_image * fps))
    with av.open(str(out_path), "w") as container:
        stream = _add_stream(container, codec, fps, size, gop or 2 * fps, crf, options)
        for i, rgb in enumerate(_frames(images, n_frames, size, seconds_per_image * fps)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if i in keyframes:
                frame.pict_type = av.video.frame.PictureType.I  # libx264 makes a forced I-frame a keyframe
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out_path


def vfr_times(seconds: float, *, seed: int = 0, gap: tuple[float, float] | None = (4.0, 2.5)) -> list[float]:
    """Irregular presentation times over `seconds`: steps of 10–150 ms, and one gap (start, length) without frames."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while t < seconds:
        if gap and gap[0] <= t < gap[0] + gap[1]:
            t = gap[0] + gap[1]
            continue
        times.append(round(t, 3))
        t += rng.uniform(0.010, 0.150)
    return times


def make_vfr(
    images: Sequence[ImageLike],
    out_path: str | Path,
    times_s: Sequence[float],
    *,
    size: tuple[int, int] = (640, 480),
    codec: str = "libx264",
    crf: int = 28,
) -> Path:
    """A variable-frame-rate video whose frame i is shown at times_s[i] (ms precision), images spread evenly."""
    if not images or not times_s:
        raise ValueError("no images or no times")
    out_path = Path(out_path)
    time_base = Fraction(1, 1000)
    per_image = len(times_s) / len(images)
    with av.open(str(out_path), "w") as container:
        stream = _add_stream(container, codec, 25, size, 50, crf)
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        for t, rgb in zip(times_s, _frames(images, len(times_s), size, per_image), strict=True):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = round(t * 1000)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out_path


def corrupt_copy(
    src: str | Path, dst: str | Path, *, at: float = 0.5, length: int = 4096, seed: int = 0, spots: int = 1
) -> Path:
    """Copy src to dst with `spots` runs of `length` random bytes written from fraction `at` of the file onwards.

    The runs are spread over the middle of the file (from `at` up to at most 80 %), away from the header and the
    trailing index (an .mp4 from PyAV keeps its moov atom at the end), so the container still opens and only the
    coded frames are damaged.
    """
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    start = int(len(data) * at)
    end = max(start + length, int(len(data) * 0.8))
    step = max(length, (end - start) // max(1, spots))
    for k in range(spots):
        pos = start + k * step
        if pos + length > len(data):
            break
        data[pos : pos + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slideshow", help="constant frame rate slideshow")
    s.add_argument("out")
    s.add_argument("images", nargs="+")
    s.add_argument("--fps", type=int, default=25)
    s.add_argument("--seconds", type=float, default=1.0, help="seconds per image")
    s.add_argument("--size", default="640x480")
    s.add_argument("--codec", default="libx264")
    v = sub.add_parser("vfr", help="variable frame rate video with a gap")
    v.add_argument("out")
    v.add_argument("images", nargs="+")
    v.add_argument("--seconds", type=float, default=10.0, help="total length")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--size", default="640x480")
    v.add_argument("--codec", default="libx264")
    c = sub.add_parser("corrupt", help="copy a file with random bytes written into its middle")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--at", type=float, default=0.5)
    c.add_argument("--length", type=int, default=4096)
    c.add_argument("--spots", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "corrupt":
        print(corrupt_copy(args.src, args.dst, at=args.at, length=args.length, spots=args.spots, seed=args.seed))
        return
    w, h = (int(x) for x in args.size.lower().split("x"))
    if args.cmd == "slideshow":
        out = make_slideshow(
            args.images, args.out, fps=args.fps, seconds_per_image=args.seconds, size=(w, h), codec=args.codec
        )
    else:
        times = vfr_times(args.seconds, seed=args.seed)
        out = make_vfr(args.images, args.out, times, size=(w, h), codec=args.codec)
    print(out)


if __name__ == "__main__":
    main()
