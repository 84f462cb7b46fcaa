#!/usr/bin/env python
"""Train StreamGuard's default face classifier with self-blended and cross-identity blended images, calibrate its
thresholds on held-out real calls, export it to ONNX and write its card.

The shipped engines/streamguard-sbi.onnx is made by (from the repository root, `pip install -e .[train]`):

    python tools/train.py --real ../shared/data/utkface \\
        --real-train ../shared/data/talking_heads/d0.mp4 --real-train ../shared/data/talking_heads/d3.mp4 \\
        --real-train ../shared/data/talking_heads/d11.mp4 --real-train ../shared/data/talking_heads/d14.mp4 \\
        --real-train ../shared/data/talking_heads/d18.mp4 \\
        --calibration ../shared/data/talking_heads/d10.mp4 --calibration ../shared/data/talking_heads/d12.mp4 \\
        --calibration ../shared/data/talking_heads/d19.mp4 \\
        --out out/train-lite0 --export engines/streamguard-sbi.onnx

Data: `--real` folders/files of real media (identity = file, merged by a `master.csv` of same-person pairs; a share
of identities is held out for validation), `--real-train` real media never held out, `--labelled` CSVs or DFDC /
FaceForensics++ / Celeb-DF folders with fakes, `--calibration` real videos never trained on that set the thresholds.
Faces are cached under `--cache` (default OUT/faces) on the first run (`--extract-only` stops there). `--resume`
continues from OUT/checkpoint.pt. Nothing here looks at a deepfake of the validation sets: measure the result with
`tools/model_report.py`, which runs `streamguard scan`/`eval` on them.
"""

from __future__ import annotations

import os

# OpenMP threads that spin-wait are starved on a shared CPU (measured: 2 threads 3x slower than 1 at load 8 on 2
# cores); passive waiting keeps 2 threads as fast as 1 under load and faster when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamguard.training.backbone import WEIGHTS_PACKAGE
from streamguard.training.calibrate import Calibration, ClipScores, calibrate
from streamguard.training.data import (
    ExtractConfig,
    FaceExtractor,
    FaceSet,
    MediaItem,
    discover,
    discover_real,
    split_by_identity,
)
from streamguard.training.trainer import TrainConfig, TrainResult, save_history, train

if TYPE_CHECKING:
    from streamguard.inference.card import ModelCard
    from streamguard.inference.classifier import Classifier

log = logging.getLogger("train")
DEFAULTS = TrainConfig()
LICENSE = (
    "Code Apache-2.0. Weights: fine-tuned from EfficientNet-Lite0 ImageNet weights (Apache-2.0) on UTKFace, whose "
    "images are for non-commercial research use only (copyright stays with their owners), and on real talking-head "
    "clips from the LivePortrait project's examples: use these weights for non-commercial research only."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--real", type=Path, action="append", default=[], help="real media folder or file (repeatable)")
    d.add_argument("--real-train", type=Path, action="append", default=[],
                   help="real media used for training only, never held out (repeatable)")
    d.add_argument("--labelled", type=Path, action="append", default=[],
                   help="CSV path,label[,identity] or a DFDC / FF++ / Celeb-DF / real+fake folder (repeatable)")
    d.add_argument("--calibration", type=Path, action="append", default=[],
                   help="real video never trained on, scored through the serving path to set the thresholds")
    d.add_argument("--max-real", type=int, help="use at most this many --real files (a fixed random subset)")
    d.add_argument("--cache", type=Path, help="face-crop cache folder (default OUT/faces)")
    d.add_argument("--extract-only", action="store_true", help="find and cache the faces, then stop")
    d.add_argument("--fps", type=float, default=10.0, help="video frames per second sampled for training")
    d.add_argument("--max-frames", type=int, default=300, help="sampled frames per video at most")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of --real identities held out")
    d.add_argument("--pad-mode", choices=("reflect", "black"), default="reflect",
                   help="how still images are padded before detection (the padding shows in tight photos' crops)")
    t = p.add_argument_group("training")
    for name in ("epochs", "samples_per_epoch", "batch_size", "input_size", "frozen_blocks", "threads"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(DEFAULTS, name))
    for name in ("lr", "xray_share", "video_share", "margin"):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(DEFAULTS, name))
    aug = DEFAULTS.augment
    t.add_argument("--p-downscale", type=float, default=aug.p_downscale,
                   help="share of samples downscaled and upscaled again (half of them also JPEG-coded)")
    t.add_argument("--min-downscale", type=float, default=aug.min_downscale,
                   help="smallest downscale factor of the crop side (0.25 at 160 px: a 40 px crop, a ~35 px face)")
    t.add_argument("--p-low-res-blend", type=float, default=aug.p_low_res_blend,
                   help=f"share of pairs made at {aug.low_res_range[0]:g}-{aug.low_res_range[1]:g} of the crop side "
                   "(the face shrunk before the blend, so a small fake keeps its artefacts) and brought back")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=DEFAULTS.num_workers, help="DataLoader workers (blend+augment)")
    t.add_argument("--out", type=Path, default=ROOT / "out" / "train-lite0", help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--stop-after", type=int, help="end after this many epochs of the --epochs schedule")
    t.add_argument("--average-last", type=int, default=1, metavar="K",
                   help="export the average of the last K epochs' weights (SWA over the schedule's end); 1: the last")
    t.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (a fine-tuning phase, with "
                   "its own settings and schedule), not from ImageNet")
    t.add_argument("--frozen-bn", action="store_true",
                   help="every BatchNorm keeps the starting model's statistics while training (for --init-from: "
                   "re-measured statistics alone move a SWA model's scores)")
    e = p.add_argument_group("export and calibration")
    e.add_argument("--export", type=Path, help="ONNX path to write (its card goes beside it); default OUT/model.onnx")
    e.add_argument("--name", help="model name in the card (default: the ONNX file's stem)")
    e.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=True,
                   help="validate and export scoring each crop and its mirror image, averaged (test-time flip "
                   "augmentation: better ranking, twice the model's work per face)")
    e.add_argument("--card-version", default="4", help="the model's version in its card")
    e.add_argument("--max-face-fpr", type=float, default=0.01,
                   help="card threshold: at most this share of held-out real photo faces score at or above it")
    e.add_argument("--calibration-fps", type=float, default=5.0, help="samples per second scored of each --calibration "
                   "clip (1 FPS sequences at every phase are cut from them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.average_last < 1:
        p.error(f"--average-last: at least 1 epoch (1: the last epoch's weights), not {args.average_last}")
    for flag in ("p_downscale", "p_low_res_blend"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            p.error(f"--{flag.replace('_', '-')}: a probability in [0, 1], not {getattr(args, flag)}")
    if not 0.0 < args.min_downscale < 0.9:
        p.error(f"--min-downscale: a factor in (0, 0.9) (draws are uniform up to 0.9), not {args.min_downscale}")
    return args


def gather(args: argparse.Namespace) -> tuple[list[MediaItem], set[str]]:
    items: list[MediaItem] = []
    for src in args.real:
        items += discover_real(src)
    if args.max_real is not None and len(items) > args.max_real:
        keep = np.random.default_rng(args.seed).permutation(len(items))[: args.max_real]
        items = [items[i] for i in sorted(keep)]
    train_only = []
    for src in args.real_train:
        train_only += discover_real(src)
    for src in args.labelled:
        items += discover(src)
    if not items and not train_only:
        raise SystemExit("no training media: give --real, --real-train or --labelled")
    calibration = {p.resolve() for p in args.calibration}
    clash = [i.path for i in items + train_only if i.path.resolve() in calibration]
    if clash:
        raise SystemExit(f"calibration media must not be trained on: {', '.join(map(str, clash))}")
    return items + train_only, {i.identity for i in train_only}


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return os.path.relpath(Path(path).resolve(), ROOT)


def command_line(argv: list[str]) -> str:
    return "python tools/train.py " + " ".join(shlex.quote(a) for a in argv)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Split:
    """Which faces train and which are held out, by identity."""

    train_idx: list[int]
    val_idx: list[int]
    train_ids: list[str]
    val_ids: list[str]

    @classmethod
    def from_faces(cls, faces: FaceSet, val_fraction: float, seed: int, keep_in_train: set[str]) -> Split:
        train_idx, val_idx = split_by_identity(faces.identities, val_fraction, seed, keep_in_train=keep_in_train)
        return cls([int(i) for i in train_idx], [int(i) for i in val_idx],
                   sorted({faces.identities[i] for i in train_idx}), sorted({faces.identities[i] for i in val_idx}))


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What the card says about the model whatever its results: name, architecture, preprocessing, licence."""

    name: str
    architecture: str
    cfg: TrainConfig
    version: str

    def write(self, onnx_path: Path, threshold: float, training: str, metrics: dict,
              raise_threshold: float | None = None, clear_threshold: float | None = None) -> ModelCard:
        from streamguard.training.export import write_card

        c = self.cfg
        return write_card(onnx_path, name=self.name, architecture=self.architecture, input_size=c.input_size,
                          mean=c.mean, std=c.std, crop_margin=c.margin, license=LICENSE, version=self.version,
                          threshold=threshold, raise_threshold=raise_threshold, clear_threshold=clear_threshold,
                          training=training, metrics=metrics)


def calibration_clips(classifier: Classifier, paths: list[Path], fps: float) -> list[ClipScores]:
    """Each clip's faces scored through the serving path (FaceAnalyzer at the card's margin, quality gate)."""
    from streamguard.training.evaluation import score_video

    clips = []
    for path in paths:
        scored = score_video(classifier, path, fps=fps)
        times = [float(s.rsplit("@", 1)[1]) for s in scored.sources]
        clips.append(ClipScores(path.name, times, scored.scores, fps))
    return clips


def heldout_metrics(result: TrainResult, n_ids: int, threshold: float | None = None) -> dict:
    """AUCs of the held-out identities' pseudo-fakes against their real faces and, with the calibrated `threshold`,
    the share of pseudo-fakes the model calls fake at it: the operating point. Why both: the AUC ranks all scores,
    while the service acts only above a threshold that real faces and real calls set; a model whose real faces
    spread upwards gets a high threshold and catches fewer fakes at the same AUC."""
    from streamguard.training.data import REAL, SBI, XRAY
    from streamguard.training.trainer import kind_aucs

    if result.val_scores is None or result.val_labels is None:
        return {}
    kinds = np.array([k[1] for k in result.val_keys])
    scores = np.asarray(result.val_scores, np.float64)
    sbi_auc, xray_auc = kind_aucs(result.val_keys, result.val_scores, result.val_labels)

    sbi = {
        "what": "AUC of real faces vs fresh SBI pseudo-fakes of identities held out of training; with a threshold, "
                "the share of each called fake at the card threshold",
        "auc": None if sbi_auc is None else round(sbi_auc, 4),
        "real_faces": int((kinds == REAL).sum()), "sbi_fakes": int((kinds == SBI).sum()), "identities": n_ids,
    }
    xray = {
        "what": "AUC of real faces vs cross-identity blends (donors also held out) of held-out identities",
        "auc": None if xray_auc is None else round(xray_auc, 4), "fakes": int((kinds == XRAY).sum()),
    }
    if threshold is not None:
        def share(kind: int) -> float | None:
            picked = scores[kinds == kind]
            return round(float((picked >= threshold).mean()), 4) if picked.size else None

        sbi.update(sbi_called_fake=share(SBI), real_called_fake=share(REAL))
        xray["called_fake"] = share(XRAY)
    return {"heldout_sbi": sbi, "heldout_cross_identity": xray}


def heldout_real_scores(result: TrainResult, faces: FaceSet) -> list[float]:
    """P(fake) of the held-out identities' real faces as they are (no blend): the photo side of calibration."""
    from streamguard.training.data import REAL

    if result.val_scores is None:
        return []
    return [float(s) for k, s in zip(result.val_keys, result.val_scores, strict=True)
            if k[1] == REAL and faces.labels[k[0]] == 0]


def training_text(cfg: TrainConfig, faces: FaceSet, split: Split, argv: list[str], times: dict[str, float],
                  result: TrainResult, flip_average: bool, init_from: Path | None = None) -> str:
    seconds = round(sum(times.values()), 1)
    # With --resume this run trained only the last epochs: the history keeps every epoch's time.
    epochs_min = sum(h.seconds for h in result.history) / 60
    epochs = result.averaged_epochs
    averaged = f"; weights averaged over epochs {epochs[0]}-{epochs[-1]} (SWA)" if epochs else ""
    flipped = "Scored (validation, export) as the mean P(fake) of each crop and its mirror. " if flip_average else ""
    start = f"Fine-tuned from ImageNet ({WEIGHTS_PACKAGE})"
    if init_from:
        from streamguard.inference.models import file_sha256

        start = (f"Fine-tuned from {_rel(init_from)} (sha256 {file_sha256(init_from)[:16]}, itself fine-tuned from "
                 f"ImageNet, {WEIGHTS_PACKAGE})")
    aug = cfg.augment
    low_res = (f"; {aug.p_low_res_blend:.0%} of the pairs made at {aug.low_res_range[0]}-{aug.low_res_range[1]} of "
               f"the crop side (shrunk before the blend)" if aug.p_low_res_blend else "")
    return (
        f"{start} on real faces only: self-blended images (Shiohara & "
        f"Yamasaki, CVPR 2022) and cross-identity blends (Li et al., Face X-ray, CVPR 2020; {cfg.xray_share:.0%} of "
        f"the pseudo-fakes). Data: {len(faces)} face crops ({len(split.train_idx)} train / {len(split.val_idx)} held "
        f"out; {len(split.train_ids)} / {len(split.val_ids)} identities, split by identity), real video frames "
        f"{cfg.video_share:.0%} of the draws. Recipe: stem + {cfg.frozen_blocks} blocks frozen"
        f"{' (every BatchNorm with its starting statistics)' if cfg.frozen_bn else ''}, {cfg.input_size} px, "
        f"crop margin {cfg.margin} (jittered {cfg.margin_range[0]}-{cfg.margin_range[1]}, shift {cfg.max_shift}), "
        f"pairs of a real face and its pseudo-fake with the same augmentation (flip, roll, colour, beauty filter, "
        f"blur, noise, downscale to {aug.min_downscale}-0.9 of the side on {aug.p_downscale:.0%}, H.264/VP8 via PyAV, "
        f"JPEG){low_res}, {cfg.epochs} epochs x {cfg.samples_per_epoch} samples, "
        f"batch {cfg.batch_size}, AdamW lr {cfg.lr} (head x{cfg.head_lr_scale}) warmup+cosine, weight decay "
        f"{cfg.weight_decay}, BCE + {cfg.map_weight} x blend-map BCE"
        f"{averaged}. "
        f"{flipped}"
        f"Thresholds from held-out real faces and real "
        f"calls only (see metrics.calibration). Command: {command_line(argv)}. Run time {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores, {cfg.threads} torch threads (faces {times['faces_s']} s, training "
        f"{times['train_s']} s, calibration {times['calibration_s']} s); the {len(result.history)} epochs took "
        f"{epochs_min:.0f} min of training and validation in all, with any run before a --resume."
    )


def extract(args: argparse.Namespace, out: Path) -> tuple[FaceSet, set[str], int]:
    """(the faces of every training file, the identities never held out, how many files)."""
    items, train_only = gather(args)
    cfg = ExtractConfig(fps=args.fps, max_frames=args.max_frames, pad_mode=args.pad_mode)
    extractor = FaceExtractor(args.cache or out / "faces", cfg)
    try:
        faces = extractor.extract_all(items, progress=not args.quiet)
    finally:
        extractor.close()
    if len(faces) == 0:
        raise SystemExit("no faces found in the training media")
    return faces, train_only, len(items)


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size, lr=args.lr,
        input_size=args.input_size, seed=args.seed, num_workers=args.workers, threads=args.threads,
        frozen_blocks=args.frozen_blocks, xray_share=args.xray_share, video_share=args.video_share,
        margin=args.margin, frozen_bn=args.frozen_bn,
        augment=replace(DEFAULTS.augment, p_downscale=args.p_downscale, min_downscale=args.min_downscale,
                        p_low_res_blend=args.p_low_res_blend),
    )


def export_and_calibrate(result: TrainResult, faces: FaceSet, info: CardInfo, onnx_path: Path,
                         args: argparse.Namespace) -> tuple[float, Calibration, list[ClipScores]]:
    """ONNX export (and its max |ONNX - torch|), then thresholds from held-out real faces and calls scored through
    the serving path, which needs a card: a provisional one first (rewritten with the results by the caller)."""
    from streamguard.inference.models import load_classifier
    from streamguard.training.export import check_onnx, export_onnx

    export_onnx(result.model, onnx_path, info.cfg.input_size, args.flip_average)
    max_diff = check_onnx(result.model, onnx_path, info.cfg.input_size, flip_average=args.flip_average)
    info.write(onnx_path, threshold=0.5, training="", metrics={})
    classifier = load_classifier(str(onnx_path))
    clips = calibration_clips(classifier, args.calibration, args.calibration_fps)
    calibration = calibrate(heldout_real_scores(result, faces), clips, max_face_fpr=args.max_face_fpr)
    log.info("calibration: threshold %.2f, raise %.2f, clear %.2f", calibration.threshold,
             calibration.raise_threshold, calibration.clear_threshold)
    return max_diff, calibration, clips


def report_of(argv: list[str], cfg: TrainConfig, result: TrainResult, card: ModelCard, onnx_path: Path,
              max_diff: float, faces: FaceSet, split: Split, metrics: dict, times: dict[str, float]) -> dict:
    from streamguard.training.model import count_parameters

    return {
        "command": command_line(argv),
        "config": asdict(cfg),
        "parameters": count_parameters(result.model),
        "weights_sha256": weights_digest(result.model),
        "onnx": {"path": _rel(onnx_path), "bytes": onnx_path.stat().st_size, "sha256": card.sha256,
                 "max_abs_diff_vs_torch": max_diff},
        "data": {"faces": len(faces), "train_faces": len(split.train_idx), "heldout_faces": len(split.val_idx),
                 "train_identities": len(split.train_ids), "heldout_identities": split.val_ids},
        "history": [asdict(h) for h in result.history],
        "averaged_epochs": result.averaged_epochs,
        "metrics": metrics,
        "times": times,
    }


def main(argv: list[str] | None = None) -> int:
    from streamguard.training.model import ARCHITECTURE

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    faces, train_only, n_files = extract(args, out)
    times["faces_s"] = round(time.perf_counter() - t, 1)
    log.info("%d faces from %d files", len(faces), n_files)
    if args.extract_only:
        return 0
    split = Split.from_faces(faces, args.val_fraction, args.seed, train_only)
    log.info("%d train faces (%d identities), %d held out (%d identities)", len(split.train_idx),
             len(split.train_ids), len(split.val_idx), len(split.val_ids))

    cfg = config_of(args)
    t = time.perf_counter()
    result = train(faces, split.train_idx, split.val_idx, cfg, out, resume=args.resume, progress=not args.quiet,
                   init_from=args.init_from, stop_after=args.stop_after, average_last=args.average_last,
                   flip_average=args.flip_average)
    times["train_s"] = round(time.perf_counter() - t, 1)
    save_history(result.history, out / "history.json", out / "curves.png")

    onnx_path = Path(args.export) if args.export else out / "model.onnx"
    architecture = (f"{ARCHITECTURE} (ImageNet EfficientNet-Lite0, stem+{cfg.frozen_blocks} blocks frozen) "
                    f"input={cfg.input_size}")
    if args.flip_average:
        architecture += ", flip-averaged (each crop and its mirror)"
    info = CardInfo(args.name or onnx_path.stem, architecture, cfg, args.card_version)
    t = time.perf_counter()
    max_diff, calibration, clips = export_and_calibrate(result, faces, info, onnx_path, args)
    times["calibration_s"] = round(time.perf_counter() - t, 1)

    metrics = {**heldout_metrics(result, len(split.val_ids), calibration.threshold),
               "calibration": {"what": "thresholds from held-out real faces and held-out real calls "
                               f"({', '.join(c.name for c in clips) or 'none'}); never from fakes",
                               **calibration.to_dict()}}
    text = training_text(cfg, faces, split, argv, times, result, args.flip_average, args.init_from)
    card = info.write(onnx_path, calibration.threshold, text, metrics, calibration.raise_threshold,
                      calibration.clear_threshold)
    report = report_of(argv, cfg, result, card, onnx_path, max_diff, faces, split, metrics, times)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("parameters", "weights_sha256", "onnx", "metrics", "times")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
