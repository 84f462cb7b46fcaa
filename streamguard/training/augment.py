"""Training augmentations for face crops (numpy/cv2 only), applied alike to real faces and fakes.

They mimic what a live call does to a face before we see it, so the classifier does not read "compressed",
"soft" or "filtered" as fake: flips, sensor noise, defocus blur, exposure and white-balance changes, the skin
smoothing of a phone's beauty filter, JPEG re-encoding, a real H.264 or VP8 encode at a random quality (PyAV, the
codecs calls use), and the downscale-upscale of an adaptive-bitrate stream; plus a small roll, because heads tilt.
The crop's scale and position jitter (detector boxes move from frame to frame; DuckDuckGoose: the crop scale matters)
is done by the data set when it cuts the model's crop out of the cached wider one.

Every function takes a uint8 (H, W, 3) image and an explicit numpy Generator and returns a new uint8 image of the
same shape, so a sample is reproducible from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Probabilities and ranges. The defaults are the field's usual mild settings (SBI, DFDC winners)."""

    p_flip: float = 0.5
    p_geometry: float = 0.6
    max_shift: float = 0.05  # of the crop side
    max_zoom: float = 0.08  # crop scale 1 +- this
    max_rotate: float = 8.0  # degrees (head roll)
    p_brightness_contrast: float = 0.3
    p_colour: float = 0.2
    p_blur: float = 0.1
    p_noise: float = 0.1
    p_downscale: float = 0.2
    min_downscale: float = 0.4
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 95)
    p_beauty: float = 0.0
    p_sharpen: float = 0.0
    p_codec: float = 0.0
    p_dim: float = 0.0  # a dim room: darker, gamma, the sensor noise of a camera's gain (DFDC's night scenes)
    # A pair made at low resolution: the face is downscaled *before* the blend (training/data.py), so a small fake
    # keeps the artefacts its label stands for; `downscale` after the blend smooths them away (README: tried).
    p_low_res_blend: float = 0.0
    low_res_range: tuple[float, float] = (0.25, 0.5)  # of the crop side
    vp8_share: float = 0.3  # of the codec draws; the rest are H.264
    h264_crf: tuple[int, int] = (18, 40)  # x264 CRF: 23 is its default, ~35-40 a congested call
    vp8_q: tuple[int, int] = (8, 50)  # libvpx quantiser (0..63), fixed per frame


# What a live call does (the default model's recipe): a codec on half the faces, beauty filters, rolls.
# Global sharpness matters most: SBI alters the sharpness of one side of a blend, so a model trained without whole-
# frame blur and sharpening scores crisp real portraits as fake and flips soft ones (measured on the first phase of
# the default model: a real portrait 0.998 as it is, 0.135 blurred by sigma 1).
CALL_AUGMENT = AugmentConfig(
    p_geometry=0.3, max_shift=0.0, max_zoom=0.0, max_rotate=10.0, p_colour=0.3, p_blur=0.2, p_noise=0.15,
    p_downscale=0.35, min_downscale=0.35, p_jpeg=0.2, p_beauty=0.15, p_sharpen=0.25, p_codec=0.5, p_dim=0.1,
)


def _check(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")


def hflip(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def geometry_matrix(
    size: tuple[int, int], rng: np.random.Generator, max_shift: float = 0.05, max_zoom: float = 0.08,
    max_rotate: float = 8.0,
) -> np.ndarray:
    """A small zoom, roll and shift of the crop (detector box jitter, head roll) as a 2x3 affine matrix."""
    h, w = size
    angle = rng.uniform(-max_rotate, max_rotate)
    m = np.asarray(cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0 + rng.uniform(-max_zoom, max_zoom)),
                   np.float64)
    m[:, 2] += (rng.uniform(-max_shift, max_shift) * w, rng.uniform(-max_shift, max_shift) * h)
    return m


def geometry(img: np.ndarray, rng: np.random.Generator, max_shift: float = 0.05, max_zoom: float = 0.08,
             max_rotate: float = 8.0) -> np.ndarray:
    """Small zoom, roll and shift of the crop; borders are replicated, not black."""
    h, w = img.shape[:2]
    m = geometry_matrix((h, w), rng, max_shift, max_zoom, max_rotate)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def brightness_contrast(img: np.ndarray, rng: np.random.Generator, limit: float = 0.2) -> np.ndarray:
    alpha = 1.0 + rng.uniform(-limit, limit)
    beta = rng.uniform(-limit, limit) * 128.0
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A global white-balance and saturation change (camera auto white balance), the same over the whole crop."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-5, 5)) % 180.0
    hsv[..., 1] *= rng.uniform(0.7, 1.3)
    out = cv2.cvtColor(np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out *= rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (0.3, 1.5)) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(*sigma))


def gaussian_noise(img: np.ndarray, rng: np.random.Generator, std: tuple[float, float] = (2.0, 8.0)) -> np.ndarray:
    noise = rng.normal(0.0, rng.uniform(*std), img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def downscale(img: np.ndarray, rng: np.random.Generator, min_scale: float = 0.4) -> np.ndarray:
    """Down to a random fraction of the side and back up: a low-resolution camera or a low-bitrate stream layer."""
    h, w = img.shape[:2]
    s = rng.uniform(min_scale, 0.9)
    small = cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG (8x8 DCT blocks and chroma subsampling, like H.264 intra frames)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def beauty_filter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A phone/meeting app's skin smoothing: an edge-preserving (bilateral) blur mixed back over the whole frame.

    Applied to real faces and fakes alike it teaches that a smooth, filtered face is not in itself a blend."""
    d = int(rng.choice([5, 7, 9]))
    smooth = cv2.bilateralFilter(img, d, float(rng.uniform(30, 80)), float(rng.uniform(3, 9)))
    a = float(rng.uniform(0.4, 1.0))
    return np.clip(a * smooth.astype(np.float32) + (1 - a) * img.astype(np.float32), 0, 255).astype(np.uint8)


def unsharp(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A camera's or an editor's sharpening over the whole frame (unsharp mask). SBI sharpens one side of a blend,
    so without this a uniformly crisp real photo (a retouched red-carpet portrait) reads as fake."""
    blur = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.6, 1.6)))
    amount = float(rng.uniform(0.3, 1.2))
    return np.clip(img.astype(np.float32) * (1 + amount) - blur.astype(np.float32) * amount, 0, 255).astype(np.uint8)


def dim_light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dim room as a webcam records it: less light (gain 0.25-0.6 after a gamma that darkens the shadows
    more), then the sensor noise the camera's gain brings up, stronger in chroma than in luma."""
    x = (img.astype(np.float32) / 255.0) ** rng.uniform(1.0, 1.5) * rng.uniform(0.25, 0.6) * 255.0
    luma = rng.normal(0.0, rng.uniform(1.0, 4.0), img.shape[:2]).astype(np.float32)[..., None]
    chroma = rng.normal(0.0, rng.uniform(0.5, 3.0), img.shape).astype(np.float32)
    return np.clip(x + luma + chroma, 0, 255).astype(np.uint8)


def _even(img: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: pad one replicated row/column where a side is odd."""
    h, w = img.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return img
    return cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)


def video_codec(img: np.ndarray, codec: str, quality: int) -> np.ndarray:
    """Encode the image as one frame of H.264 (x264 at CRF `quality`) or VP8 (libvpx at quantiser `quality`) and
    decode it again, with PyAV: the 4:2:0 chroma, block transform, deblocking and ringing of a real call's codec."""
    import av  # PyAV: a serving dependency already; imported here so augment stays cheap to import

    h, w = img.shape[:2]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(_even(img)), format="rgb24").reformat(format="yuv420p")
    frame.pts = 0
    if codec == "h264":
        enc = av.CodecContext.create("libx264", "w")
        enc.options = {"crf": str(int(quality)), "preset": "ultrafast", "tune": "zerolatency"}
        decoder = "h264"
    elif codec == "vp8":
        enc = av.CodecContext.create("libvpx", "w")
        # libvpx ignores crf without a bitrate cap; a fixed quantiser is the quality knob that works.
        enc.options = {"qmin": str(int(quality)), "qmax": str(int(quality)), "deadline": "realtime",
                       "cpu-used": "8", "lag-in-frames": "0"}
        enc.bit_rate = 20_000_000
        decoder = "vp8"
    else:
        raise ValueError(f"codec must be 'h264' or 'vp8', got {codec!r}")
    enc.width, enc.height, enc.pix_fmt = frame.width, frame.height, "yuv420p"
    enc.time_base = Fraction(1, 30)
    packets = [*enc.encode(frame), *enc.encode(None)]
    dec = cast(av.VideoCodecContext, av.CodecContext.create(decoder, "r"))
    frames = [f for p in packets for f in dec.decode(p)] + list(dec.decode(None))
    if not frames:
        raise RuntimeError(f"{codec} round trip gave no frame")
    return np.ascontiguousarray(frames[0].to_ndarray(format="rgb24")[:h, :w])


def random_codec(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.vp8_share:
        return video_codec(img, "vp8", int(rng.integers(cfg.vp8_q[0], cfg.vp8_q[1] + 1)))
    return video_codec(img, "h264", int(rng.integers(cfg.h264_crf[0], cfg.h264_crf[1] + 1)))


def h264_like(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """What a video call does to a frame: downscale-upscale, then block-DCT coding at a random quality."""
    return jpeg(downscale(img, rng, cfg.min_downscale), int(rng.integers(cfg.jpeg_quality[0], 60)))


def augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None) -> np.ndarray:
    """The training pipeline: geometry and photometric changes first, then the codec, as in a real capture chain."""
    return augment_with_mask(img, None, rng, cfg)[0]


def augment_with_mask(
    img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, cfg: AugmentConfig | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """`augment`, moving a per-pixel mask (e.g. an SBI blend mask) with the image's flip and geometry.

    The random draws do not depend on the mask, so an image with and without its mask gets the same augmentation.
    """
    _check(img)
    cfg = cfg or AugmentConfig()
    out = img
    if rng.random() < cfg.p_flip:
        out = hflip(out)
        mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
    if rng.random() < cfg.p_geometry:
        h, w = out.shape[:2]
        m = geometry_matrix((h, w), rng, cfg.max_shift, cfg.max_zoom, cfg.max_rotate)
        out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if mask is not None:
            mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=(0,))
    if rng.random() < cfg.p_brightness_contrast:
        out = brightness_contrast(out, rng)
    if rng.random() < cfg.p_colour:
        out = colour(out, rng)
    if rng.random() < cfg.p_beauty:
        out = beauty_filter(out, rng)
    if rng.random() < cfg.p_sharpen:
        out = unsharp(out, rng)
    if rng.random() < cfg.p_blur:
        out = gaussian_blur(out, rng)
    if cfg.p_dim and rng.random() < cfg.p_dim:  # drawn only when enabled: older configs keep their random stream
        out = dim_light(out, rng)
    if rng.random() < cfg.p_noise:
        out = gaussian_noise(out, rng)
    r = rng.random()
    if r < cfg.p_downscale / 2:
        out = downscale(out, rng, cfg.min_downscale)
    elif r < cfg.p_downscale:
        out = h264_like(out, rng, cfg)
    if rng.random() < cfg.p_codec:
        out = random_codec(out, rng, cfg)
    if rng.random() < cfg.p_jpeg:
        out = jpeg(out, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return np.ascontiguousarray(out), mask

