"""Self-blended images (SBI): pseudo-fakes made from one real face alone.

After Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images" (CVPR 2022): a face is blended with a
slightly altered copy of itself inside a deformed, blurred face mask. The result carries the generic traces of a face
swap (a blending boundary, a colour or sharpness mismatch, a small misalignment of landmarks) without any identity
change, so a classifier trained on (real, SBI) pairs learns those traces rather than the faces of one fake method.

Our own numpy/cv2 implementation of the paper's recipe (no torch, no albumentations):

- source-target augmentation: one side (source or target, 50/50) gets colour jitter (RGB shift, HSV shift,
  brightness/contrast, each p=0.3) and then either a down-up scale or a sharpen;
- the source gets a small affine (translate x +-3 %, y +-1.5 %, scale 0.95..1/0.95), and so does the mask;
- the mask is the convex hull of the face oval (468 mediapipe landmarks; with p=0.25 cut at the eyebrows, the paper's
  "no forehead" variant; with p=0.15 only the mouth and jaw below the nose tip, ours), then elastic-deformed, and
  blurred twice at a random scale (the paper's get_blend_mask);
- the blend ratio is drawn from {0.25, 0.5, 0.75, 1, 1, 1}.

Landmarks are (468, 2) pixel coordinates (x, y) in the image being blended. Without landmarks, `ellipse_landmarks`
gives a face-shaped stand-in for a square crop at our 1.65 margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)

# mediapipe face mesh indices (mp.solutions.face_mesh.FACEMESH_FACE_OVAL / *_EYEBROW), copied so that this module
# needs no mediapipe import.
FACE_OVAL = (10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172, 176, 234, 251, 284, 288,
             297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389, 397, 400, 454)
EYEBROWS = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
NOSE_TIP = 1
NO_FOREHEAD_P = 0.25
LOWER_FACE_P = 0.15


@dataclass(frozen=True, slots=True)
class SelfBlend:
    """One self-blended image: `fake` equals `target` wherever `mask` is 0."""

    fake: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W, 3) uint8: what the altered copy was blended onto (the input, maybe colour-jittered)
    mask: np.ndarray  # (H, W) float32 in [0, 1]: the blend weight of the altered copy, ratio included


def ellipse_landmarks(size: int, margin: float = 1.65, n: int = 36) -> np.ndarray:
    """A face-oval stand-in (n, 2) for a square crop of side `size` centred on a face box of side size / margin."""
    face = size / margin
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    cx, cy = size / 2.0, size / 2.0 + 0.05 * face
    return np.stack([cx + 0.40 * face * np.cos(t), cy + 0.55 * face * np.sin(t)], axis=1).astype(np.float32)


def hull_mask(landmarks: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Filled convex hull (float32 0/1) of the face landmarks. With p=`NO_FOREHEAD_P` the part above the eyebrows
    is cut off (the paper's variant); with p=`LOWER_FACE_P` only the part below the nose tip is kept: the mouth and
    jaw that expression re-enactment (Face2Face, NeuralTextures) re-renders, whose seam crosses the cheeks."""
    pts = np.asarray(landmarks, np.float32)
    if len(pts) == 468:
        r = rng.random()
        if r < NO_FOREHEAD_P:
            pts = pts[pts[:, 1] >= float(pts[list(EYEBROWS), 1].min())]
        elif r < NO_FOREHEAD_P + LOWER_FACE_P:
            pts = pts[pts[:, 1] >= float(pts[NOSE_TIP, 1])]
    mask = np.zeros(shape, np.float32)
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, (1.0,))
    return mask


def elastic(mask: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Elastic deformation (Simard et al.): displace each pixel by a smoothed random field scaled by alpha."""
    h, w = mask.shape
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) * alpha
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) * alpha
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(mask, x + dx, y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0,))


def _odd(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.choice(np.arange(lo, hi + 1, 2)))


def blend_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's get_blend_mask: at a random 192..256 px scale, blur, keep the inner plateau, blur again.

    The first blur + plateau pulls the boundary inwards by a random amount; the second makes the soft edge whose
    width varies from sample to sample, so the classifier cannot key on one edge profile.
    """
    h, w = mask.shape
    sh, sw = (int(v) for v in rng.integers(192, 257, size=2))
    m = cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_LINEAR)
    k1 = _odd(rng, 5, 25)
    m = cv2.GaussianBlur(m, (k1, k1), 0)
    if m.max() <= 0:
        return np.zeros_like(mask)
    m = m / m.max()
    m[m < 0.999] = 0.0
    k2 = _odd(rng, 5, 25)
    m = cv2.GaussianBlur(m, (k2, k2), 0)
    if m.max() <= 0:
        return np.zeros_like(mask)
    m = m / m.max()
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)


def _rgb_shift(img: np.ndarray, rng: np.random.Generator, limit: float = 20.0) -> np.ndarray:
    return img + rng.uniform(-limit, limit, 3).astype(np.float32)


def _hsv_shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180.0  # OpenCV hue is 0..180
    hsv[..., 1] += rng.uniform(-25, 25)
    hsv[..., 2] += rng.uniform(-25, 25)
    hsv = np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)


def _brightness_contrast(img: np.ndarray, rng: np.random.Generator, limit: float = 0.1) -> np.ndarray:
    alpha = 1.0 + rng.uniform(-limit, limit)
    beta = rng.uniform(-limit, limit) * 255.0
    return img * alpha + beta


def _down_up(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's RandomDownScale: nearest-neighbour down by 2 or 4, linear back up (a resampling trace)."""
    h, w = img.shape[:2]
    r = int(rng.choice([2, 4]))
    small = cv2.resize(img, (max(1, w // r), max(1, h // r)), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """albumentations' Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0)): identity blended with a Laplacian kernel."""
    alpha, lightness = rng.uniform(0.2, 0.5), rng.uniform(0.5, 1.0)
    ident = np.zeros((3, 3), np.float32)
    ident[1, 1] = 1.0
    lap = np.full((3, 3), -1.0, np.float32)
    lap[1, 1] = 8.0 + lightness
    kernel = (1.0 - alpha) * ident + alpha * lap
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def source_target_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour and sharpness jitter for one side of the blend: float32 in, float32 (unclipped until the end) out."""
    out = img.astype(np.float32)
    if rng.random() < 0.3:
        out = _rgb_shift(out, rng)
    if rng.random() < 0.3:
        out = _hsv_shift(out, rng)
    if rng.random() < 0.3:
        out = _brightness_contrast(out, rng)
    out = _down_up(out, rng) if rng.random() < 0.5 else _sharpen(out, rng)
    return np.clip(out, 0.0, 255.0)


def random_affine(
    img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same small translate + scale of the source and its mask (the misalignment of a swapped face)."""
    h, w = mask.shape
    tx, ty = rng.uniform(-0.03, 0.03) * w, rng.uniform(-0.015, 0.015) * h
    scale = rng.uniform(0.95, 1.0 / 0.95)
    m = np.asarray(cv2.getRotationMatrix2D((w / 2.0, h / 2.0), 0.0, scale), np.float64)
    m[:, 2] += (tx, ty)
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0,))
    return img, mask


def check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")


def face_landmarks(landmarks: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The landmarks, or the ellipse stand-in where the face mesh found none."""
    if landmarks is None or not np.all(np.isfinite(landmarks)):
        return ellipse_landmarks(min(shape[:2]))
    return landmarks


def augment_one_side(source: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                     augment_side: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The paper's source-target augmentation on one side (drawn 50/50 unless `augment_side` says which)."""
    side = augment_side or ("source" if rng.random() < 0.5 else "target")
    if side == "source":
        return source_target_augment(source, rng), target
    if side == "target":
        return source, source_target_augment(target, rng)
    raise ValueError(f"augment_side must be 'source', 'target' or None, got {augment_side!r}")


def deform_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation, the two-blur soft edge and a blend ratio: the mask a blend is made with."""
    # albumentations' ElasticTransform(alpha=50, sigma=7) on the paper's 380 px crops, scaled to this size.
    s = min(mask.shape) / 380.0
    mask = elastic(mask, rng, alpha=50.0 * s, sigma=7.0 * s)
    return blend_mask(mask, rng) * float(rng.choice(BLEND_RATIOS))


def compose(source: np.ndarray, target: np.ndarray, mask: np.ndarray, original: np.ndarray,
            valid: np.ndarray | None) -> SelfBlend:
    """fake = mask × source + (1 − mask) × target. Outside `valid` (the crop's black padding) fake and target are
    the original's pixels: a colour-jittered target would otherwise tint the padding of fakes only, and a classifier
    learns that border instead of the blend."""
    if valid is not None:
        mask = mask * valid
    m = mask[..., None]
    fake = m * source + (1.0 - m) * target
    target_u8 = np.clip(np.round(target), 0, 255).astype(np.uint8)
    fake_u8 = np.clip(np.round(fake), 0, 255).astype(np.uint8)
    if valid is not None:
        outside = ~valid.astype(bool)
        fake_u8[outside] = original[outside]
        target_u8[outside] = original[outside]
    return SelfBlend(fake=fake_u8, target=target_u8, mask=mask.astype(np.float32))


def self_blend(
    img: np.ndarray,
    landmarks: np.ndarray | None,
    rng: np.random.Generator,
    augment_side: str | None = None,
    valid: np.ndarray | None = None,
) -> SelfBlend:
    """Blend `img` (H, W, 3) uint8 with an altered copy of itself inside a deformed face mask.

    `augment_side` forces which side gets the source-target augmentation ("source" or "target"); None draws it 50/50
    as the paper does. With "source" the fake equals the input outside the mask. `valid` (H, W) bool marks the part
    of the crop that is picture; the rest (black padding) stays as it is.
    """
    check_image(img)
    h, w = img.shape[:2]
    mask = hull_mask(face_landmarks(landmarks, img.shape), (h, w), rng)
    original = img.astype(np.float32)
    source, target = augment_one_side(original.copy(), original.copy(), rng, augment_side)
    source, mask = random_affine(source, mask, rng)
    return compose(source, target, deform_mask(mask, rng), img, valid)
