"""Quality gate: faces too small, too blurry or too uncertain are reported as low quality and never scored.

DuckDuckGoose's robustness study: below half resolution a deepfake classifier's accuracy drops, so such a face would be
scored as real or fake by chance; reporting "low quality" is the honest answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from streamguard.faces.crop import resize_square
from streamguard.types import Detection, Quality, QualityVerdict

# Sharpness is measured on the face box resized to this side, so it compares across face sizes: a sharp 300 px face
# and a sharp 60 px face score alike, and a blur is measured relative to the face, like the classifier sees it.
SHARPNESS_SIDE = 64
# Variance of the Laplacian of the grey 64x64 face, divided by the variance of the face itself and scaled to a face
# of standard deviation 50: how much of the face's contrast is fine detail. Normalised so that exposure does not
# read as blur (the plain Laplacian variance scales with contrast squared, and rejected every face of the DFDC
# sample's dim room, mean luma 35, as "blurry" at 8-17). Measured with `sharpness()` on the 62 single-face photos of
# ../shared/data/real_faces (detector boxes): min / 5th percentile / median / max
#   as shipped                              490 / 553 / 1309 / 3013
#   JPEG quality 30                         485 / 527 / 1318 / 2978 (compression barely moves it)
#   at half brightness, at 0.3x + noise     491 / 556 / 1316 / 3031 and 501 / 564 / 1326 / 3046 (exposure: no change)
#   Gaussian blur sigma = face_px / 64      55 / 75 / 167 / 414 (mild: looks like a soft 64 px face)
#   Gaussian blur sigma = face_px / 32      12 / 16 / 46 / 136
#   Gaussian blur sigma = face_px / 16      5 / 6 / 18 / 55
#   the DFDC sample's dim 125 px face       154-295 (10 samples)
# 120 passes every real face at any exposure (margin 4x) and the dim DFDC face, and rejects all faces blurred with
# sigma >= face_px / 16 and nearly all with face_px / 32 (a 300 px face blurred by sigma 9 px); mild blurs mostly pass
# on purpose.
DEFAULT_MIN_SHARPNESS = 120.0
# Faces flatter than this (grey standard deviation) have no detail to measure: a blank patch, not a face.
_MIN_FACE_STD = 2.0


def sharpness(rgb: np.ndarray, detection: Detection) -> float:
    """Variance of the Laplacian of the face box (clipped to the frame), grey, resized to SHARPNESS_SIDE², relative to
    the face's own variance and scaled to a face of standard deviation 50 (see DEFAULT_MIN_SHARPNESS)."""
    h, w = rgb.shape[:2]
    b = detection.box
    x0, y0 = max(int(b.x0), 0), max(int(b.y0), 0)
    x1, y1 = min(int(np.ceil(b.x1)), w), min(int(np.ceil(b.y1)), h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0.0
    face = rgb[y0:y1, x0:x1]
    grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY) if face.ndim == 3 else face
    grey = resize_square(grey, SHARPNESS_SIDE).astype(np.float64)
    std = float(grey.std())
    if std < _MIN_FACE_STD:
        return 0.0
    return float(cv2.Laplacian(grey, cv2.CV_64F).var()) * (50.0 / std) ** 2


@dataclass(frozen=True, slots=True)
class QualityGate:
    """Decides whether a detected face may be scored.

    min_face_px: box long side in frame pixels. 40 px is where the full-range detector stops finding faces reliably
      (see detector.py); it is past DuckDuckGoose's "below half the resolution" line for any of our models (the
      default model's 1.15-margin crop of a 40 px face is 46 px, upscaled to 160), so lower it only knowingly. Raise
      it where faces can be small: `tools/robustness.py` measures the default model calling 65 % of real faces fake
      at 40 px, 47 % at 48, 10 % at 64 and 2 % at 80 (3 % at full size).
    min_sharpness: see DEFAULT_MIN_SHARPNESS for the measurements.
    min_confidence: detector score. 0.5 mirrors FaceDetector's default; it is a separate knob so the detector can keep
      weaker faces for tracking continuity while only confident ones are scored. On our photos, faces the detector
      found scored >= 0.6 whatever their size, and false detections on face-free regions 0.61-0.72, so no threshold
      separates the two: the tracker's min_samples is what drops one-off false faces.

    Checks run in order too small, low confidence, blurry; the first failure is the verdict.
    """

    min_face_px: float = 40.0
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    min_confidence: float = 0.5

    def assess(self, rgb: np.ndarray, detection: Detection) -> Quality:
        face_px = detection.box.long_side
        sharp = sharpness(rgb, detection)
        if face_px < self.min_face_px:
            verdict = QualityVerdict.TOO_SMALL
        elif detection.score < self.min_confidence:
            verdict = QualityVerdict.LOW_CONFIDENCE
        elif sharp < self.min_sharpness:
            verdict = QualityVerdict.BLURRY
        else:
            verdict = QualityVerdict.OK
        return Quality(verdict=verdict, face_px=face_px, sharpness=sharp)
