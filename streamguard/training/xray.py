"""Cross-identity blended images: pseudo-fakes that put another real person's face onto a real face.

After Li et al., "Face X-ray for More General Face Forgery Detection" (CVPR 2020): for a target face, take a donor
face of another person whose landmarks are nearest (so the blend is plausible), align the donor to the target with a
similarity transform on their 468 face-mesh landmarks, match its colour to the target's inside the face region, and
blend it in with the target's deformed face mask. What a face swap leaves — an identity seam, a second face's
texture and sharpness inside the first's outline — appears without any fake-generating network, and from real faces
only. The mask pipeline (convex hull, elastic deformation, two-blur soft edge, blend ratio) and the source-target
augmentation are the SBI ones (`sbi.py`), so the two kinds of pseudo-fake differ only in where the inside comes from.

Donor choice: the nearest of `candidates` random other-identity faces in normalised landmark space (Face X-ray
searches a whole set; a random subset per sample costs microseconds and still gives a well-matched pose).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from streamguard.training.sbi import (
    SelfBlend,
    augment_one_side,
    check_image,
    compose,
    deform_mask,
    face_landmarks,
    hull_mask,
)


class _Faces(Protocol):
    identities: Sequence[str]


def normalised_shapes(landmarks: np.ndarray) -> np.ndarray:
    """(N, 468, 2) landmarks → the same, centred and scaled to unit RMS radius: pose without position or size."""
    centred = landmarks - landmarks.mean(axis=1, keepdims=True)
    scale = np.sqrt((centred**2).sum(axis=2).mean(axis=1))[:, None, None]
    return (centred / np.maximum(scale, 1e-6)).astype(np.float32)


def pick_donor(index: int, landmarks: np.ndarray, faces: _Faces, pool: tuple[np.ndarray, np.ndarray],
               rng: np.random.Generator, candidates: int = 16) -> int | None:
    """The face (an index into `faces`) of another identity whose landmarks are nearest among `candidates` random
    faces of `pool` = (indices, normalised shapes); None without landmarks or another identity to draw from."""
    indices, shapes = pool
    if len(indices) == 0 or not np.all(np.isfinite(landmarks)):
        return None
    picks = rng.integers(len(indices), size=candidates)
    me = faces.identities[index]
    picks = np.array([p for p in picks if faces.identities[int(indices[p])] != me], np.int64)
    if len(picks) == 0:
        return None
    target = normalised_shapes(landmarks[None])[0]
    dist = ((shapes[picks] - target) ** 2).sum(axis=(1, 2))
    return int(indices[picks[int(np.argmin(dist))]])


def align(donor: np.ndarray, donor_lm: np.ndarray, target_lm: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """The donor image warped so its landmarks fall on the target's (rotation, uniform scale, translation)."""
    m, _ = cv2.estimateAffinePartial2D(donor_lm.astype(np.float32), target_lm.astype(np.float32), method=cv2.LMEDS)
    if m is None:
        return None
    return cv2.warpAffine(donor, m, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def match_colour(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer in Lab: the source's mean and spread inside `region` set to the target's."""
    src = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float32)
    tgt = cv2.cvtColor(target, cv2.COLOR_RGB2LAB).astype(np.float32)
    inside = region > 0.5
    if inside.sum() < 16:
        return source.astype(np.float32)
    s_mean, s_std = src[inside].mean(axis=0), src[inside].std(axis=0) + 1e-3
    t_mean, t_std = tgt[inside].mean(axis=0), tgt[inside].std(axis=0) + 1e-3
    out = np.clip((src - s_mean) * (t_std / s_std) + t_mean, 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB).astype(np.float32)


def cross_blend(
    img: np.ndarray,
    landmarks: np.ndarray,
    donor: np.ndarray,
    donor_landmarks: np.ndarray,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
) -> SelfBlend:
    """Blend `donor`'s face into `img` (both (H, W, 3) uint8 crops with their landmarks) inside `img`'s deformed face
    mask. Returned as a `SelfBlend` (fake, target, mask) so that it trains exactly like an SBI."""
    check_image(img)
    check_image(donor)
    h, w = img.shape[:2]
    target_lm = face_landmarks(landmarks, img.shape)
    warped = align(donor, donor_landmarks, target_lm, (h, w))
    if warped is None:
        raise ValueError("could not align the donor's landmarks to the target's")
    mask = hull_mask(target_lm, (h, w), rng)
    source = match_colour(warped, img, mask)
    source, target = augment_one_side(source, img.astype(np.float32), rng, None)
    return compose(source, target, deform_mask(mask, rng), img, valid)
