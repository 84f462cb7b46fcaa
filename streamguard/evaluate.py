"""`streamguard eval`: file- and face-level AUC, accuracy, TPR/FPR at the threshold, log loss, ROC curve."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

from streamguard.scan import FileReport, ModelInfo, Scanner, expand_paths, model_info

FAKE_NAMES = {"fake", "fakes", "df", "deepfake", "deepfakes", "manipulated", "manipulated_sequences", "synthesis",
              "celeb-synthesis", "1", "true"}
REAL_NAMES = {"real", "reals", "original", "original_sequences", "pristine", "youtube-real", "celeb-real", "0", "false"}


class LabelledFile(BaseModel):
    path: Path
    label: int = Field(description="1 fake, 0 real")


class Metrics(BaseModel):
    n: int
    n_real: int
    n_fake: int
    auc: float | None = Field(description="null when only one class is present")
    auc_ci95: tuple[float, float] | None = Field(
        None, description="95 % bootstrap interval of the AUC (fakes and reals resampled separately, 2000 draws, "
                          "seed 0): how far a set this small pins the AUC down; null when only one class is present")
    accuracy: float
    tpr: float | None = Field(description="fakes called fake at the threshold; null without fakes")
    fpr: float | None = Field(description="reals called fake at the threshold; null without reals")
    log_loss: float


class EvalReport(BaseModel):
    model: ModelInfo
    threshold: float
    files: Metrics | None
    faces: Metrics | None
    no_face: int = Field(description="files where no face was scored: left out of the file-level metrics")
    errors: int
    rows: list[dict]


def label_of_name(name: str) -> int | None:
    low = name.lower()
    if low in FAKE_NAMES:
        return 1
    if low in REAL_NAMES:
        return 0
    return None


def load_labels(source: Path, default: int | None = None) -> list[LabelledFile]:
    """The labelled files of `source`: a CSV with `path,label` (paths relative to the CSV; labels fake/real or 1/0),
    or a folder whose names say each file's label (df, fake, real, original, Celeb-synthesis, ...). In a folder the
    nearest name that says real or fake wins: sub-folders (innermost first), then the file-name prefix, then the
    folder's own name, then `default`."""
    if source.is_file():
        return _labels_from_csv(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such labels file or folder")
    out = []
    for path in expand_paths([source]):
        rel = path.relative_to(source)
        names = [*reversed(rel.parent.parts), re.split(r"[_\-. ]", path.stem)[0], source.resolve().name]
        label = next((lab for lab in map(label_of_name, names) if lab is not None), default)
        if label is not None:
            out.append(LabelledFile(path=path, label=label))
    if not out:
        raise ValueError(f"{source}: no file whose folder or name says real or fake (e.g. real/…, df/…, fake_…); "
                         "for a folder of one kind only, say which with --label real or --label fake")
    return out


def _labels_from_csv(source: Path) -> list[LabelledFile]:
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{source}: a labels CSV needs the columns path,label (found {reader.fieldnames})")
        out = []
        for line, row in enumerate(reader, start=2):
            label = label_of_name(row["label"].strip())
            if label is None:
                raise ValueError(f"{source}:{line}: label {row['label']!r} is neither real nor fake")
            out.append(LabelledFile(path=(source.parent / row["path"].strip()), label=label))
    return out


def _auc_of_samples(fake: np.ndarray, real: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC as the Mann-Whitney statistic (ties count half), vectorised over bootstrap resamples."""
    n_fake, n_real = fake.shape[axis], real.shape[axis]
    ranks = rankdata(np.concatenate([fake, real], axis=axis), axis=axis)
    fake_rank_sum = np.take(ranks, np.arange(n_fake), axis=axis).sum(axis=axis)
    return (fake_rank_sum - n_fake * (n_fake + 1) / 2) / (n_fake * n_real)


def auc_interval(labels: np.ndarray, scores: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUC, fakes and reals resampled separately (scipy.stats.bootstrap with
    two samples), so every resample has both classes. Why: the validation sets here are small (4 MesoNet crops,
    22 DFDC crops) and one face moves their AUC by 0.05-0.25; the interval says which differences are noise."""
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    fake, real = scores[labels == 1], scores[labels == 0]
    if len(fake) == 0 or len(real) == 0:
        return None
    if len(fake) == 1 and len(real) == 1:  # one pair: every resample is that pair
        auc = float(_auc_of_samples(fake, real))
        return auc, auc
    res = bootstrap((fake, real), _auc_of_samples, n_resamples=resamples, confidence_level=confidence,
                    method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return float(low), float(high)


def compute_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:
    labels = np.asarray(labels, int)
    scores = np.clip(np.asarray(scores, float), 1e-6, 1 - 1e-6)
    pred = scores >= threshold
    fake, real = labels == 1, labels == 0
    both = fake.any() and real.any()
    return Metrics(
        n=len(labels),
        n_real=int(real.sum()),
        n_fake=int(fake.sum()),
        auc=float(roc_auc_score(labels, scores)) if both else None,
        auc_ci95=auc_interval(labels, scores) if both else None,
        accuracy=float((pred == fake).mean()),
        tpr=float(pred[fake].mean()) if fake.any() else None,
        fpr=float(pred[real].mean()) if real.any() else None,
        log_loss=float(log_loss(labels, scores, labels=[0, 1])),
    )


def evaluate(
    scanner: Scanner, items: list[LabelledFile], on_file: Callable[[FileReport], None] | None = None
) -> tuple[EvalReport, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Scan every labelled file; return the report and the (labels, scores) behind each level, for the ROC plot."""
    threshold = scanner.classifier.card.threshold
    file_y: list[int] = []
    face_y: list[int] = []
    file_s: list[float] = []
    face_s: list[float] = []
    rows: list[dict[str, Any]] = []
    no_face = errors = 0
    for item in items:
        scanned = scanner.scan(item.path).report
        rows.append({"path": str(item.path), "label": "fake" if item.label else "real", "score": scanned.score,
                     "verdict": scanned.verdict.value, "error": scanned.error})
        if on_file:
            on_file(scanned)
        if scanned.error:
            errors += 1
            continue
        if scanned.score is None:
            no_face += 1
            continue
        file_y.append(item.label)
        file_s.append(scanned.score)
        for person in scanned.participants:
            face_y += [item.label] * len(person.sample_scores)
            face_s += person.sample_scores
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if file_y:
        curves["file"] = (np.array(file_y), np.array(file_s))
    if face_y:
        curves["face"] = (np.array(face_y), np.array(face_s))
    report = EvalReport(
        model=model_info(scanner.classifier),
        threshold=threshold,
        files=compute_metrics(*curves["file"], threshold) if "file" in curves else None,
        faces=compute_metrics(*curves["face"], threshold) if "face" in curves else None,
        no_face=no_face,
        errors=errors,
        rows=rows,
    )
    return report, curves


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, out: Path) -> bool:
    """Write the ROC curves of each level that has both classes; False when none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawable = {k: v for k, v in curves.items() if len(set(v[0].tolist())) == 2}
    if not drawable:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    for level, (y, s) in drawable.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{level} (AUC {roc_auc_score(y, s):.3f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
