"""The training loop: identity-balanced SBI batches, AdamW + warmup-cosine, per-epoch validation AUC, checkpoints.

Reproducibility: every random draw derives from the run seed — sample keys from (seed, epoch) (see
`IdentityBalancedSampler`), each sample's augmentation from its own key, dropout from torch's generator re-seeded at
each epoch — and torch runs with deterministic algorithms and a fixed thread count. So the same command gives the
same weights, and a run resumed from a checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from streamguard.training.augment import CALL_AUGMENT, AugmentConfig
from streamguard.training.backbone import LITE_MEAN, LITE_STD
from streamguard.training.data import (
    SBI,
    XRAY,
    CropConfig,
    FaceDataset,
    FaceSet,
    IdentityBalancedSampler,
    SampleKey,
    eval_keys,
)
from streamguard.training.model import FakeDetector, WithSigmoid, build_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EPOCH_WEIGHTS = "epoch-{:02d}.pt"  # each epoch's weights alone, for averaging the last few (average_last)


@dataclass(slots=True)
class TrainConfig:
    epochs: int = 8
    samples_per_epoch: int = 32768
    batch_size: int = 32
    lr: float = 3e-4  # backbone; the new head learns `head_lr_scale` times faster
    head_lr_scale: float = 10.0
    weight_decay: float = 1e-2
    warmup_epochs: float = 0.25
    input_size: int = 192
    frozen_blocks: int = 3  # stem + the first blocks keep ImageNet's filters (and run ~1.5x faster without backward)
    frozen_bn: bool = False  # every BatchNorm keeps the starting weights' statistics (fine-tuning; FakeDetector)
    pretrained: bool = True
    dropout: float = 0.2
    topk_fraction: float = 0.25  # image logit = mean of the top quarter of the blend map's cells
    map_weight: float = 0.5  # weight of the per-cell blend-map loss beside the image loss
    seed: int = 0
    val_sbi_per_face: int = 2
    val_xray_per_face: int = 1
    num_workers: int = 1
    threads: int = 2
    sbi_share: float = 0.5
    xray_share: float = 0.25  # of the pseudo-fakes: cross-identity blends; the rest are SBIs
    video_share: float = 0.2  # of the draws: real video frames (the rest: still photos), when both are there
    paired: bool = True  # real + its fake in the same batch (batch_size must then be even)
    margin: float = 1.15  # the model's crop (card crop_margin): crop side / face box long side
    margin_range: tuple[float, float] = (1.05, 1.3)  # training jitter of the margin
    max_shift: float = 0.04  # training jitter of the crop centre, share of the box side
    augment: AugmentConfig = CALL_AUGMENT
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD


@dataclass(slots=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_auc: float | None
    lr: float
    seconds: float
    val_auc_xray: float | None = None  # real vs cross-identity blends of held-out identities


@dataclass(slots=True)
class TrainResult:
    model: FakeDetector
    history: list[EpochStats] = field(default_factory=list)
    val_keys: list[SampleKey] = field(default_factory=list)
    val_scores: np.ndarray | None = None  # P(fake) of each val key, after the last epoch
    val_labels: np.ndarray | None = None
    seconds: float = 0.0
    averaged_epochs: list[int] = field(default_factory=list)  # the epochs whose weights were averaged (empty: none)


def seed_everything(seed: int, threads: int) -> None:
    """Seeds and settings that make CPU training repeatable (same thread count, deterministic kernels)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _worker_init(_: int) -> None:
    # Workers only blend and augment (numpy/cv2): one thread each, so they do not fight the training threads.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def param_groups(model: FakeDetector, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on BatchNorm and biases; the new head at `head_lr_scale` × the backbone's rate.
    Frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("head."), p.ndim > 1), []).append(p)
    return [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
         "lr_scale": cfg.head_lr_scale if head else 1.0}
        for (head, decay), params in sorted(groups.items())
    ]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def predict(model: FakeDetector, dataset: FaceDataset, keys: Sequence[SampleKey], batch_size: int = 64,
            flip_average: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """P(fake) and labels of `keys`, in order, with the model in eval mode and scored as exported (`WithSigmoid`)."""
    scorer = WithSigmoid(model, flip_average).eval()
    scores, labels = [], []
    with torch.inference_mode():
        for i in range(0, len(keys), batch_size):
            batch = [dataset[k][:2] for k in keys[i : i + batch_size]]
            x = torch.stack([b[0] for b in batch]).contiguous(memory_format=torch.channels_last)
            scores.append(scorer(x)[0].flatten().numpy())
            labels.append(np.array([float(b[1]) for b in batch]))
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(scores).astype(np.float32), np.concatenate(labels).astype(np.float32)


def kind_aucs(keys: Sequence[SampleKey], scores: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """(AUC of reals vs SBIs, AUC of reals vs cross-identity blends) over validation keys; None where a side is
    missing."""
    kinds = np.array([k[1] for k in keys])

    def auc(select: np.ndarray) -> float | None:
        y = labels[select]
        return float(roc_auc_score(y, scores[select])) if len(set(y.tolist())) == 2 else None

    return auc(kinds != XRAY), auc(kinds != SBI) if (kinds == XRAY).any() else None


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a run killed while saving keeps the previous checkpoint


@dataclass(frozen=True, slots=True)
class _Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> _Schedule:
        steps = math.ceil(cfg.samples_per_epoch / cfg.batch_size)
        return cls(steps, steps * cfg.epochs, max(1, int(cfg.warmup_epochs * steps)))


def _resume(model: FakeDetector, opt: torch.optim.Optimizer, cfg: TrainConfig, ckpt_path: Path,
            ) -> tuple[list[EpochStats], int]:
    """(history, first epoch to run) from the checkpoint, which must have been written with these settings."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{ckpt_path} was written with other settings; use another --out or drop --resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resumed from %s after epoch %d", ckpt_path, state["epoch"])
    return [EpochStats(**h) for h in state["history"]], state["epoch"] + 1


def _data(faces: FaceSet, train_idx: Sequence[int], val_idx: Sequence[int], cfg: TrainConfig, stride: int,
          ) -> tuple[IdentityBalancedSampler, DataLoader, FaceDataset]:
    """(the training sampler, its loader, the validation data set)."""
    crop = CropConfig(cfg.margin, cfg.margin_range, cfg.max_shift)
    train_ds = FaceDataset(faces, cfg.input_size, cfg.mean, cfg.std, train=True, augment_cfg=cfg.augment,
                           map_stride=stride, crop=crop, donors=train_idx)
    # Held-out cross-identity blends take their donors among held-out faces: no training face in validation.
    val_ds = FaceDataset(faces, cfg.input_size, cfg.mean, cfg.std, train=False, map_stride=stride,
                         crop=CropConfig(cfg.margin), donors=val_idx)
    groups = {faces.groups[i] for i in train_idx}
    weights = {"video": cfg.video_share, "image": 1.0 - cfg.video_share} if groups == {"video", "image"} else None
    sampler = IdentityBalancedSampler(
        faces.labels, faces.identities, train_idx, cfg.samples_per_epoch, cfg.seed, sbi=True, sbi_share=cfg.sbi_share,
        paired=cfg.paired, xray_share=cfg.xray_share, groups=faces.groups, group_weights=weights,
    )
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        worker_init_fn=_worker_init if cfg.num_workers else None, persistent_workers=cfg.num_workers > 0,
        drop_last=False,
        # spawn, not fork: a worker forked after mediapipe / ONNX Runtime started their threads (face extraction
        # in this process) can deadlock on a lock held by a thread that does not exist in the child.
        multiprocessing_context="spawn" if cfg.num_workers else None,
    )
    return sampler, loader, val_ds


def _loss(model: FakeDetector, batch: Sequence[torch.Tensor], cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, image logits) of one batch: image BCE + `map_weight` x the per-cell blend-map BCE."""
    x, y, target, known = batch
    fake_map = model.forward_map(x.contiguous(memory_format=torch.channels_last))
    logit = model.pool(fake_map).flatten()
    # Dense supervision: where the blend is, not just whether. Faces whose blend region is unknown (labelled
    # fakes) weigh 0 in it.
    cell_loss = F.binary_cross_entropy_with_logits(fake_map, target, reduction="none").mean(dim=(1, 2, 3))
    map_loss = (cell_loss * known).sum() / known.sum().clamp(min=1.0)
    return F.binary_cross_entropy_with_logits(logit, y) + cfg.map_weight * map_loss, logit


def _train_epoch(model: FakeDetector, opt: torch.optim.Optimizer, loader: DataLoader, cfg: TrainConfig, epoch: int,
                 sched: _Schedule, progress: bool) -> tuple[float, float, float]:
    """One pass over the loader: (mean loss, accuracy, last learning rate)."""
    from tqdm import tqdm

    model.train()
    total, correct, loss_sum, lr = 0, 0, 0.0, cfg.lr
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
    # Without bars (--quiet: a run in the background with its output in a file) a log line every tenth of the
    # epoch says how fast it goes and when the epoch will end.
    log_every = 0 if progress else max(1, sched.steps_per_epoch // 10)
    t0 = time.perf_counter()
    for step, batch in enumerate(bar):
        if log_every and step and step % log_every == 0:
            _log_progress(epoch, cfg, step, sched.steps_per_epoch, total, time.perf_counter() - t0, loss_sum / total)
        lr = lr_at(epoch * sched.steps_per_epoch + step, sched.total_steps, sched.warmup, cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss, logit = _loss(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        y = batch[1]
        total += len(y)
        loss_sum += loss.item() * len(y)
        correct += int(((logit > 0).float() == y).sum())
        bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.3f}")
    return loss_sum / max(1, total), correct / max(1, total), lr


def _log_progress(epoch: int, cfg: TrainConfig, step: int, steps: int, samples: int, seconds: float,
                  loss: float) -> None:
    rate = samples / max(seconds, 1e-9)
    left_s = (steps - step) * cfg.batch_size / max(rate, 1e-9)
    log.info("epoch %d/%d: %d/%d samples (%.0f %%), %.1f samples/s, loss %.4f, epoch ends in ~%.0f min",
             epoch + 1, cfg.epochs, samples, steps * cfg.batch_size, 100.0 * step / steps, rate, loss, left_s / 60)


def _log_epoch(stats: EpochStats, progress: bool) -> None:
    line = (f"epoch {stats.epoch}: train loss {stats.train_loss:.4f} acc {stats.train_acc:.3f}, val loss "
            f"{_fmt(stats.val_loss)} auc {_fmt(stats.val_auc)} (cross-identity {_fmt(stats.val_auc_xray)}) "
            f"({stats.seconds:.0f} s)")
    log.info("%s", line)
    if progress:
        from tqdm import tqdm

        tqdm.write(line)


def _init_weights(model: FakeDetector, init_from: Path, loader: DataLoader, flip_average: bool,
                  stats_batches: int = 4) -> None:
    """Weights of an earlier run's checkpoint, or of an exported model (.onnx: BatchNorm statistics re-measured on
    the first `stats_batches` training batches, see `recover.py`)."""
    if Path(init_from).suffix != ".onnx":
        model.load_state_dict(torch.load(init_from, map_location="cpu", weights_only=False)["model"])
        log.info("weights from %s", init_from)
        return
    from streamguard.training.recover import load_from_onnx

    batches = []
    for batch in loader:
        batches.append(batch[0])
        if len(batches) == stats_batches:
            break
    diff = load_from_onnx(model, Path(init_from), batches, flip_average)
    log.info("weights rebuilt from %s (max |P(fake) - ONNX Runtime| %.2g)", init_from, diff)


def train(
    faces: FaceSet,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    init_from: Path | None = None,
    stop_after: int | None = None,
    average_last: int = 1,
    flip_average: bool = False,
) -> TrainResult:
    """Train on faces[train_idx] (+ pseudo-fakes), validate on faces[val_idx] (+ fresh ones) after each epoch.

    `init_from`: a checkpoint of an earlier run, or an exported model's .onnx, whose weights this one starts from
    (a fine-tuning phase with its own settings and schedule); `resume` continues this run's own checkpoint instead.
    `stop_after`: end after that many epochs of the schedule (the checkpoint is kept; the schedule is still the one
    of `cfg.epochs`). `average_last`: the result is the average of the last that many epochs' weights (Izmailov et
    al., SWA: a flatter optimum that generalises better than the last point of the schedule; BatchNorm statistics
    are averaged alike).
    `flip_average`: validation scores faces as the export will (`WithSigmoid`); training is not affected."""
    if cfg.paired and cfg.batch_size % 2:
        raise ValueError("paired batches need an even batch_size")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, cfg.threads)

    model = build_model(cfg.frozen_blocks, cfg.dropout, cfg.topk_fraction, cfg.pretrained, cfg.frozen_bn)
    if cfg.input_size % model.stride:
        raise ValueError(f"input_size must be a multiple of {model.stride}")
    sampler, loader, val_ds = _data(faces, train_idx, val_idx, cfg, model.stride)
    if init_from is not None:
        _init_weights(model, init_from, loader, flip_average)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    sched = _Schedule.from_config(cfg)
    ckpt_path = out_dir / CHECKPOINT
    history, start_epoch = _resume(model, opt, cfg, ckpt_path) if resume and ckpt_path.exists() else ([], 0)
    keys = eval_keys(faces, val_idx, cfg.val_sbi_per_face, cfg.seed, cfg.val_xray_per_face if cfg.xray_share else 0)
    val_scores = val_labels = None

    for epoch in range(start_epoch, min(cfg.epochs, stop_after or cfg.epochs)):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: the same per epoch, with or without a resume
        loss, acc, lr = _train_epoch(model, opt, loader, cfg, epoch, sched, progress)
        val_auc = val_auc_xray = val_loss = None
        if keys:
            val_scores, val_labels = predict(model, val_ds, keys, flip_average=flip_average)
            val_loss = _bce(val_scores, val_labels)
            val_auc, val_auc_xray = kind_aucs(keys, val_scores, val_labels)
        stats = EpochStats(epoch + 1, loss, acc, val_loss, val_auc, lr, round(time.perf_counter() - t0, 2),
                           val_auc_xray)
        history.append(stats)
        _log_epoch(stats, progress)
        _save_checkpoint(out_dir / EPOCH_WEIGHTS.format(epoch + 1), {"epoch": epoch, "model": model.state_dict()})
        _save_checkpoint(ckpt_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "history": [asdict(h) for h in history], "config": asdict(cfg),
        })

    averaged = average_epochs(model, out_dir, len(history), average_last) if average_last > 1 else []
    if keys and (val_scores is None or averaged):  # validate what is returned: the loaded or averaged weights
        val_scores, val_labels = predict(model, val_ds, keys, flip_average=flip_average)
    model.eval()
    return TrainResult(model, history, keys, val_scores, val_labels, time.perf_counter() - t_start, averaged)


def average_epochs(model: FakeDetector, out_dir: Path, last_epoch: int, count: int) -> list[int]:
    """Load into `model` the average of the weights of epochs last_epoch-count+1 .. last_epoch (EPOCH_WEIGHTS files
    in `out_dir`); returns those epochs. Integer buffers (BatchNorm's batch counter) are the last epoch's."""
    epochs = list(range(max(1, last_epoch - count + 1), last_epoch + 1))
    missing = [e for e in epochs if not (out_dir / EPOCH_WEIGHTS.format(e)).is_file()]
    if missing:
        raise FileNotFoundError(f"no weights of epochs {missing} in {out_dir} to average")
    states = [torch.load(out_dir / EPOCH_WEIGHTS.format(e), map_location="cpu", weights_only=True)["model"]
              for e in epochs]
    averaged = {k: torch.stack([s[k] for s in states]).mean(dim=0) if v.is_floating_point() else states[-1][k]
                for k, v in states[-1].items()}
    model.load_state_dict(averaged)
    log.info("weights averaged over epochs %s", epochs)
    return epochs


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def save_history(history: Sequence[EpochStats], json_path: Path, png_path: Path | None) -> None:
    """The curves as JSON, and as a PNG (loss and AUC per epoch) when matplotlib is there."""
    Path(json_path).write_text(json.dumps([asdict(h) for h in history], indent=2) + "\n")
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h.epoch for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h.train_loss for h in history], "o-", label="train (augmented, SBI)")
    if any(h.val_loss is not None for h in history):
        a1.plot(ep, [h.val_loss for h in history], "s-", label="held-out identities (fresh SBI)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("BCE loss")
    a1.legend()
    a1.grid(alpha=0.3)
    if any(h.val_auc is not None for h in history):
        a2.plot(ep, [h.val_auc for h in history], "s-", color="C1")
    a2.set_xlabel("epoch")
    a2.set_ylabel("AUC, held-out identities: real vs SBI")
    a2.set_ylim(0.4, 1.0)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
