"""Square face crops centred on the detector box, at the classifier's margin.

The square has side ``margin × box.long_side`` and keeps the box centre at its centre, even at frame edges: shifting
the square back inside the frame would move the face off-centre, and clipping it would change the face's scale, both
of which the classifier never saw in training (DuckDuckGoose: crop scale < 1.6 already hurts). The part of the square
outside the frame is padded with constant zeros (black) rather than reflected or replicated: reflection mirrors half
a face or shoulder into the crop (a symmetric seam that looks like the blending boundaries a deepfake classifier is
trained to find) and replication smears the edge row into streaks; a flat black band carries no facial structure and
is what letterboxed frames and zero-padded face crops already look like.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from streamguard.types import Box


def crop_box(box: Box, margin: float, frame_w: int, frame_h: int) -> tuple[int, int, int]:
    """Integer geometry of the square crop of `box`: top-left corner (may be negative) and side, in frame pixels.

    The square may extend past the frame (that part is padded by `square_crop`), but it must overlap it: a crop
    entirely outside the frame is a caller bug (a box from another frame size), so it raises ValueError.
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if frame_w <= 0 or frame_h <= 0:
        raise ValueError(f"empty frame {frame_w}x{frame_h}")
    x0, y0, side = _square(box, margin)
    if x0 >= frame_w or y0 >= frame_h or x0 + side <= 0 or y0 + side <= 0:
        raise ValueError(f"crop {x0},{y0}+{side} of {box} lies outside the {frame_w}x{frame_h} frame")
    return x0, y0, side


def to_crop_coords(
    points: Sequence[tuple[float, float]], box: Box, margin: float, crop_size: int
) -> list[tuple[float, float]]:
    """Maps frame pixel coordinates (e.g. a detection's keypoints) into its `square_crop(..., out_size=crop_size)`."""
    x0, y0, side = _square(box, margin)
    s = crop_size / side
    return [((x - x0) * s, (y - y0) * s) for x, y in points]


def _square(box: Box, margin: float) -> tuple[int, int, int]:
    side = max(1, round(margin * box.long_side))
    cx, cy = box.center
    return round(cx - side / 2), round(cy - side / 2), side


def square_crop(rgb: np.ndarray, box: Box, margin: float = 1.65, out_size: int | None = None) -> np.ndarray:
    """The face's square crop (side margin × box long side, centred on the box), zero-padded past the frame edges.

    `out_size` resizes the square to out_size × out_size: INTER_AREA when shrinking (averages, no aliasing of the
    high frequencies the classifier looks at), INTER_LINEAR when growing. None keeps the native side.
    Works on (H, W) and (H, W, C) arrays; returns a new contiguous array of the same dtype.
    """
    h, w = rgb.shape[:2]
    x0, y0, side = crop_box(box, margin, w, h)
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + side, w), min(y0 + side, h)
    crop = cv2.copyMakeBorder(
        rgb[iy0:iy1, ix0:ix1],
        top=iy0 - y0,
        bottom=y0 + side - iy1,
        left=ix0 - x0,
        right=x0 + side - ix1,
        borderType=cv2.BORDER_CONSTANT,
        value=(0, 0, 0, 0),
    )
    if rgb.ndim == 3 and crop.ndim == 2:  # cv2 drops a trailing channel axis of size 1
        crop = crop[:, :, None]
    if out_size is None or out_size == side:
        return np.ascontiguousarray(crop)
    if out_size <= 0:
        raise ValueError(f"out_size must be > 0, got {out_size}")
    return resize_square(crop, out_size)


def resize_square(img: np.ndarray, side: int) -> np.ndarray:
    """`img` resized to side × side: INTER_AREA when shrinking (it averages, so the high frequencies a deepfake
    classifier looks at are not aliased), INTER_LINEAR when growing. The same array when it is that size already;
    a trailing channel axis of size 1 is kept (cv2 drops it)."""
    h, w = img.shape[:2]
    if (h, w) == (side, side):
        return img
    interp = cv2.INTER_AREA if side < max(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(img, (side, side), interpolation=interp)
    if img.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out
