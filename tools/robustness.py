#!/usr/bin/env python3
"""Robustness report (the DuckDuckGoose study's five perturbations): how far a model's score moves under them.

For each face of the real photos, a wide crop (2.4 × the face box) serves as a small "frame" in which the face box
is known; its pseudo-fake is a self-blended copy (the SBI recipe, `streamguard.training.sbi`). Each perturbation
is applied to that frame and the face is cropped again at the model's margin:

- brightness ×0.6 and ×1.4;  - resolution: the frame downscaled to 1/2 and 1/4 and back;
- rotation ±15°;  - scale: crop margins 1.3 and 2.0 instead of the card's;
- face detector: the box from mediapipe's short-range model instead of the full-range one;
- face size (`--face-sizes`): the frame scaled so that the face box's long side is N pixels, cropped from there (a
  face that small in a live frame: the crop is upscaled to the model's input, as the service does).

Prints a table of mean |ΔP(fake)|, the share of decisions flipped at the card threshold, for reals and
pseudo-fakes, and the AUC of reals against pseudo-fakes under each change; `--update-card` stores it in the model
card under metrics.robustness.

    python tools/robustness.py [--model streamguard-sbi] [--faces 40] [--update-card]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import mediapipe as mp
import numpy as np

from streamguard.faces.crop import square_crop
from streamguard.faces.detector import FaceDetector
from streamguard.inference.models import load_classifier, resolve_model
from streamguard.training.sbi import self_blend
from streamguard.types import Box

WIDE = 2.4  # the frame around each face: room for rotation and wide margins


def wide_frames(photos: Path, limit: int) -> list[np.ndarray]:
    frames = []
    with FaceDetector(min_confidence=0.5) as detector:
        for path in sorted(photos.glob("*.jpg")):
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            for det in detector.detect(rgb)[:1]:
                if det.box.long_side >= 64:
                    frames.append(square_crop(rgb, det.box, margin=WIDE, out_size=384))
            if len(frames) >= limit:
                break
    return frames


def center_box(size: int) -> Box:
    side = size / WIDE
    c = size / 2
    return Box(c - side / 2, c - side / 2, c + side / 2, c + side / 2)


def pseudo_fake(frame: np.ndarray, margin: float, rng: np.random.Generator) -> np.ndarray:
    """Self-blend the face's crop at the model's margin (what SBI's face mask is drawn for), pasted back."""
    size = frame.shape[0]
    side = int(round(size * margin / WIDE))
    x0 = (size - side) // 2
    out = frame.copy()
    out[x0:x0 + side, x0:x0 + side] = self_blend(frame[x0:x0 + side, x0:x0 + side].copy(), None, rng,
                                                 augment_side="source").fake
    return out


def short_range_box(frame: np.ndarray) -> Box | None:
    with mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5) as fd:
        found = fd.process(frame).detections
    if not found:
        return None
    b = found[0].location_data.relative_bounding_box
    h, w = frame.shape[:2]
    return Box(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h)


def auc(real: np.ndarray, fake: np.ndarray) -> float:
    """Reals (label 0) against pseudo-fakes (label 1), faces lost to a change left out."""
    from sklearn.metrics import roc_auc_score

    r, f = real[~np.isnan(real)], fake[~np.isnan(fake)]
    return float(roc_auc_score(np.r_[np.zeros(len(r)), np.ones(len(f))], np.r_[r, f]))


Perturbed = tuple[np.ndarray, Box, float] | None  # (image, face box, crop margin), None: no face found
Perturbation = Callable[[np.ndarray, Box], Perturbed]


def perturbations(margin: float, face_sizes: tuple[int, ...] = ()) -> dict[str, Perturbation]:
    def brightness(f: float) -> Perturbation:
        return lambda img, box: (np.clip(img.astype(np.float32) * f, 0, 255).astype(np.uint8), box, margin)

    def resolution(f: float) -> Perturbation:
        def apply(img: np.ndarray, box: Box) -> Perturbed:
            h, w = img.shape[:2]
            small = cv2.resize(img, (int(w * f), int(h * f)), interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), box, margin
        return apply

    def rotation(deg: float) -> Perturbation:
        def apply(img: np.ndarray, box: Box) -> Perturbed:
            h, w = img.shape[:2]
            m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
            return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), box, margin
        return apply

    def face_size(px: int) -> Perturbation:
        def apply(img: np.ndarray, box: Box) -> Perturbed:
            f = px / box.long_side
            h, w = img.shape[:2]
            small = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            return small, Box(box.x0 * f, box.y0 * f, box.x1 * f, box.y1 * f), margin
        return apply

    def detector(img: np.ndarray, _box: Box) -> Perturbed:
        box = short_range_box(img)
        return None if box is None else (img, box, margin)

    return {
        "brightness x0.6": brightness(0.6), "brightness x1.4": brightness(1.4),
        "resolution 1/2": resolution(0.5), "resolution 1/4": resolution(0.25),
        "rotation +15°": rotation(15), "rotation -15°": rotation(-15),
        "margin 1.3": lambda img, box: (img, box, 1.3), "margin 2.0": lambda img, box: (img, box, 2.0),
        "detector short-range": detector,
        **{f"face {px} px": face_size(px) for px in face_sizes},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real_faces")
    ap.add_argument("--faces", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--face-sizes", default="32,40,48,56,64,72,80,96",
                    help="face box long sides (pixels) to score faces at, comma-separated; '' for none")
    ap.add_argument("--update-card", action="store_true")
    args = ap.parse_args()
    clf = load_classifier(args.model)
    card, size, margin = clf.card, clf.input_size, clf.card.preprocess.crop_margin
    rng = np.random.default_rng(args.seed)
    reals = wide_frames(args.photos, args.faces)
    box = center_box(reals[0].shape[0])
    fakes = [pseudo_fake(f, margin, rng) for f in reals]

    def score(frames: list[np.ndarray], change: Perturbation) -> np.ndarray:
        out = []
        for f in frames:
            r = change(f, box)
            crop = None if r is None else square_crop(r[0], r[1], margin=r[2], out_size=size)
            out.append(np.nan if crop is None else clf.predict(crop[None])[0])
        return np.asarray(out, np.float64)

    base = {k: score(v, lambda img, b: (img, b, margin)) for k, v in (("real", reals), ("fake", fakes))}
    face_sizes = tuple(int(v) for v in args.face_sizes.split(",") if v.strip())
    rows = {}
    for name, change in perturbations(margin, face_sizes).items():
        row: dict = {}
        scores = {}
        for kind, frames in (("real", reals), ("fake", fakes)):
            p = scores[kind] = score(frames, change)
            ok = ~np.isnan(p)
            delta = np.abs(p[ok] - base[kind][ok])
            flips = ((p[ok] >= card.threshold) != (base[kind][ok] >= card.threshold)).mean()
            row[kind] = {"mean_abs_delta": round(float(delta.mean()), 4), "flipped": round(float(flips), 4),
                         "mean_score": round(float(p[ok].mean()), 4), "n": int(ok.sum())}
        row["auc"] = round(auc(scores["real"], scores["fake"]), 4)
        rows[name] = row
    print(f"model {card.name}, threshold {card.threshold}, {len(reals)} real faces and their self-blended fakes")
    print(f"baseline mean P(fake): real {base['real'].mean():.3f}, pseudo-fake {base['fake'].mean():.3f}, "
          f"AUC {auc(base['real'], base['fake']):.3f}\n")
    print("| perturbation | real: mean |Δ|, flipped, mean P | pseudo-fake: mean |Δ|, flipped, mean P | AUC |\n"
          "|---|---|---|---|")
    for name, row in rows.items():
        r, f = row["real"], row["fake"]
        print(f"| {name} | {r['mean_abs_delta']:.3f}, {r['flipped']:.0%}, {r['mean_score']:.2f} "
              f"| {f['mean_abs_delta']:.3f}, {f['flipped']:.0%}, {f['mean_score']:.2f} | {row['auc']:.3f} |")
    if args.update_card:
        onnx_path, _ = resolve_model(args.model)
        card_path = onnx_path.with_suffix(".json")
        data = json.loads(card_path.read_text())
        data.setdefault("metrics", {})["robustness"] = {
            "what": "mean |ΔP(fake)| and decisions flipped at the threshold under DuckDuckGoose's perturbations, "
                    "and the AUC of reals against pseudo-fakes under each "
                    f"(tools/robustness.py --faces {args.faces} --seed {args.seed} --face-sizes '{args.face_sizes}')",
            "baseline": {**{k: round(float(v.mean()), 4) for k, v in base.items()},
                         "auc": round(auc(base["real"], base["fake"]), 4)}, "rows": rows}
        card_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote metrics.robustness into {card_path}")


if __name__ == "__main__":
    main()
