"""Face detection with mediapipe's BlazeFace full-range model (legacy `mp.solutions.face_detection`, offline).

Why full-range (`model_selection=1`): faces in gallery views and camera shots are small. Measured on real faces from
../shared/data/real_faces pasted alone into grey frames (30 faces): it finds every face whose box is >= 48 px in a
1920x1080 frame (40 px: 24/30), >= 40 px at 1280x720 and 640x480, and >= 96 px at 3840x2160 (64 px: 6/30): the limit
is relative, ~2.5 % of the frame's long side (the model letterboxes the frame to its own input size).

But several small faces suppress each other. Real faces pasted as galleries (black frame, one face per tile) and as
pairs on grey 1280x720 frames, faces found by the full-frame pass alone -> with adaptive tiling (the default):
    3x3 gallery 1920x1080, 108 px faces     9/27 -> 27/27        3x3 gallery 1280x720, 72 px faces   9/27 -> 27/27
    4x4 gallery 1920x1080, 121 px faces    15/48 -> 47/48        4x4 gallery, 81 px faces            1/48 -> 16/48
    two people, 64 px faces in 1280x720     9/24 -> 16/24        two people, 100 px faces           24/24 -> 24/24
Adaptive tiling: when the full-frame pass finds a face smaller than `tile_below` (10 %) of the frame's long side, the
frame is also run as an overlapping grid of tiles (2x2, or 3x3 when that face is under 5 %) and the detections are
merged. It costs 4 or 9 extra passes on such frames only; a webcam call with one large face pays nothing, and an
empty frame is not tiled (it would cost 5 passes on every sample of an empty room, and on 225 face-free photo regions
it raised false faces from 6 to 15). When no face at all is found in dense scenes, tiling cannot trigger: `tiles=3`
forces a 3x3 grid on every frame (4x4 gallery with 81 px faces: 47/48), `tiles=2` suits 4K cameras whose faces are all
under ~2.5 % of the long side (a 64 px face in 3840x2160 is found only with tiles).

Its blind spot is the opposite: large faces (a webcam close-up, a tight portrait) are sometimes missed. Cropping the 62
single-face photos to a square of 1.0 / 1.2 / 1.5 x the face box, it missed 27 / 7 / 1 of them, and it misses
img61.jpg as shipped (face 43 % of the long side). When a frame yields no face, we retry once on a small copy of the
frame letterboxed into a black border, which makes the face relatively smaller: that recovers all of those, costs
one extra ~5 ms pass on faceless frames only, and keeps only faces >= 35 % of the long side (see below).
The short-range model (model_selection=0) recovers them too, but found 6 "faces" in 219 face-free photo regions where
the padded full-range retry found 3.

Large photos need no downscaling: mediapipe resizes internally and a cv2.INTER_AREA pre-resize costs more than it saves
(1920x1080: 5.0 ms to detect, 8.9 ms to pre-resize; 4352x2903: 27 ms vs 46 ms) without finding more faces.

Scores: the full-range model scores real frontal faces ~0.75-0.9 (62 single-face photos: min 0.67, median 0.90,
one >= 0.98), so deepware's "keep faces with probability > 0.98" (a RetinaFace score) does not transfer: it would
drop nearly every real face. Default `min_confidence` is mediapipe's own 0.5; the quality gate may ask for more.

Threading: a mediapipe graph is not thread-safe. One FaceDetector per worker thread gives parallelism (mediapipe
releases the GIL while it runs); calls on one shared instance are serialised by a lock rather than corrupting it.
"""

from __future__ import annotations

import math
import threading
from types import TracebackType

import cv2
import mediapipe as mp
import numpy as np

from streamguard.types import Box, Detection

# The retry for close-ups: shrink the frame so its long side is at most this, then letterbox it with this border
# (fraction of the long side, each side). A face filling the frame then fills ~2/3 of the padded image.
_CLOSE_UP_SIDE = 512
_CLOSE_UP_PAD = 0.25
# ...and a tiny one (a face crop of ~60 px, like DFDC's prepared crops) that still shows none is tried once more
# enlarged to this long side: the model finds no face in a 62x50 crop padded as it is, and finds it at 256 px (but
# enlarging every small crop first lost two 100-140 px DFDC crops that are found as they are).
_CLOSE_UP_MIN_SIDE = 256
# The retry exists for close-ups, so it keeps only faces at least this fraction of the frame's long side: on 219
# face-free photo regions the padded pass found 3 "faces", all < 0.33 (hair, background crowd, a chest).
_CLOSE_UP_MIN_FRACTION = 0.35
# Tiles overlap by this fraction of the frame side, so every face up to that size lies whole inside some tile; larger
# faces are found by the full-frame pass (the suppression hits faces under ~8 % of the long side). Larger overlaps make
# larger tiles, which suppress again: with 0.15 a 2x2 grid found 12/48 faces of a 4x4 gallery where 0.08 found 31/48.
_TILE_OVERLAP = 0.08
# Two detections of one face (full frame vs tile, or a tile cut) overlap by more than this fraction of the smaller box.
_DUPLICATE_OVERLAP = 0.5
# Dark frames (mean luma under this, 0-255) are detected on a gamma-brightened copy, brought to about _DARK_TARGET.
# Measured on the DFDC sample's dim 1080p room (mean luma 35, a 125 px face): the full-range pass found the face in
# 3 of 10 samples as decoded and in 10 of 10 brightened (gamma 0.6). The classifier still sees the frame's own pixels.
_DARK_LUMA = 60.0
_DARK_TARGET = 80.0


class FaceDetector:
    """Finds faces in RGB frames: pixel boxes clipped to the frame, detector score, 6 keypoints in pixels.

    Keypoints, in mediapipe's order: right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion
    ("right" is the subject's right, on the image's left for a frontal face). They are not clipped: for a face cut by
    the frame edge they are the model's estimate of where the feature is.
    """

    def __init__(
        self,
        min_confidence: float = 0.5,
        *,
        tiles: int | None = None,
        tile_below: float = 0.1,
        max_tiles: int = 3,
        retry_close_ups: bool = True,
    ):
        """tiles: None tiles adaptively (see module docstring); n forces an n x n grid on every frame (1: never).
        tile_below: the adaptive trigger, the smallest face found as a fraction of the frame's long side.
        max_tiles: the adaptive grid is ceil(tile_below / that fraction) per side, between 2 and this."""
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if tiles is not None and tiles < 1:
            raise ValueError(f"tiles must be >= 1, got {tiles}")
        if max_tiles < 2:
            raise ValueError(f"max_tiles must be >= 2, got {max_tiles}")
        self.min_confidence = min_confidence
        self.tiles = tiles
        self.tile_below = tile_below
        self.max_tiles = max_tiles
        self.retry_close_ups = retry_close_ups
        self._lock = threading.Lock()
        self._mp = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence
        )
        self._closed = False

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an (H, W, 3) RGB uint8 frame (grey (H, W) and RGBA are converted), highest score first."""
        rgb = _as_rgb(rgb)
        h, w = rgb.shape[:2]
        view = _brightened(rgb)  # what the detector looks at; boxes are the same in both
        with self._lock:
            if self._closed:
                raise RuntimeError("FaceDetector is closed")
            found = self._run(view, scale=1.0, off_x=0.0, off_y=0.0)
            grid = self._grid(found, max(h, w))
            if grid > 1:
                found = _dedupe(found + self._tiled(view, grid))
            if not found and self.retry_close_ups:
                found = self._close_up(view)
        dets = [d for d in (_clip(d, w, h) for d in found) if d is not None]
        return sorted(dets, key=lambda d: -d.score)

    def _grid(self, found: list[Detection], long_side: int) -> int:
        if self.tiles is not None:
            return self.tiles
        if not found:
            # Small faces can all suppress each other (both of two 64 px faces lost in 8/24 frames), but tiling every
            # empty frame costs 5 passes and, on 225 face-free photo regions, raised false faces from 6 to 15.
            return 1
        smallest = min(d.box.long_side for d in found) / long_side
        if smallest >= self.tile_below:
            return 1
        return min(self.max_tiles, max(2, math.ceil(self.tile_below / max(smallest, 1e-6))))

    def _run(self, img: np.ndarray, scale: float, off_x: float, off_y: float) -> list[Detection]:
        """Runs the graph on `img`; maps its pixels to frame pixels as frame = img / scale - offset."""
        result = self._mp.process(np.ascontiguousarray(img))
        ih, iw = img.shape[:2]
        out = []
        for det in result.detections or ():
            rb = det.location_data.relative_bounding_box
            box = Box(
                rb.xmin * iw / scale - off_x,
                rb.ymin * ih / scale - off_y,
                (rb.xmin + rb.width) * iw / scale - off_x,
                (rb.ymin + rb.height) * ih / scale - off_y,
            )
            kps = tuple(
                (kp.x * iw / scale - off_x, kp.y * ih / scale - off_y) for kp in det.location_data.relative_keypoints
            )
            out.append(Detection(box=box, score=float(det.score[0]), keypoints=kps))
        return out

    def _close_up(self, rgb: np.ndarray) -> list[Detection]:
        long_side = max(rgb.shape[:2])
        found = self._letterboxed(rgb, min(1.0, _CLOSE_UP_SIDE / long_side))
        if not found and long_side < _CLOSE_UP_MIN_SIDE:
            found = self._letterboxed(rgb, _CLOSE_UP_MIN_SIDE / long_side)
        return found

    def _letterboxed(self, rgb: np.ndarray, scale: float) -> list[Detection]:
        h, w = rgb.shape[:2]
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        small = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=interp)
        pad = round(_CLOSE_UP_PAD * max(small.shape[:2]))
        padded = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))
        found = self._run(padded, scale=scale, off_x=pad / scale, off_y=pad / scale)
        return [d for d in found if d.box.long_side >= _CLOSE_UP_MIN_FRACTION * max(h, w)]

    def _tiled(self, rgb: np.ndarray, n: int) -> list[Detection]:
        h, w = rgb.shape[:2]
        tw, th = w / n + _TILE_OVERLAP * w, h / n + _TILE_OVERLAP * h
        found = []
        for row in range(n):
            for col in range(n):
                x0 = round(min(max(col * w / n - _TILE_OVERLAP * w / 2, 0), w - tw))
                y0 = round(min(max(row * h / n - _TILE_OVERLAP * h / 2, 0), h - th))
                x1, y1 = round(x0 + tw), round(y0 + th)
                for det in self._run(rgb[y0:y1, x0:x1], scale=1.0, off_x=-x0, off_y=-y0):
                    # A face cut by an inner tile edge is whole in a neighbouring tile (overlap) or the full pass.
                    b = det.box
                    cut = (x0 > 0 and b.x0 <= x0 + 1) or (y0 > 0 and b.y0 <= y0 + 1)
                    cut = cut or (x1 < w and b.x1 >= x1 - 1) or (y1 < h and b.y1 >= y1 - 1)
                    if not cut:
                        found.append(det)
        return found

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._mp.close()
                self._closed = True

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return img


def _brightened(rgb: np.ndarray) -> np.ndarray:
    """`rgb` itself, or for a dark frame a gamma-brightened copy whose mean luma is about _DARK_TARGET."""
    mean = float(rgb[::8, ::8].mean())  # a 1/64 sample: the mean of a frame, for ~0.1 ms
    if mean >= _DARK_LUMA:
        return rgb
    gamma = math.log(_DARK_TARGET / 255.0) / math.log(max(mean, 1.0) / 255.0)
    lut = np.round(255.0 * np.linspace(0.0, 1.0, 256) ** gamma).astype(np.uint8)
    return cv2.LUT(rgb, lut)


def _clip(det: Detection, w: int, h: int) -> Detection | None:
    b = det.box
    box = Box(min(max(b.x0, 0.0), w), min(max(b.y0, 0.0), h), min(max(b.x1, 0.0), w), min(max(b.y1, 0.0), h))
    if box.width <= 0 or box.height <= 0:
        return None
    return Detection(box=box, score=det.score, keypoints=det.keypoints)


def _overlap_of_smaller(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    smaller = min(a.width * a.height, b.width * b.height)
    return ix * iy / smaller if smaller > 0 else 0.0


def _dedupe(dets: list[Detection]) -> list[Detection]:
    """Greedy suppression by score; overlap is measured on the smaller box so a partial box inside a whole one goes."""
    kept: list[Detection] = []
    for det in sorted(dets, key=lambda d: -d.score):
        if all(_overlap_of_smaller(det.box, k.box) <= _DUPLICATE_OVERLAP for k in kept):
            kept.append(det)
    return kept
