"""Training data: media discovery (dataset layouts), face extraction with a cache, identity split, torch dataset.

Faces come from the same detector that serves (`FaceDetector` → `square_crop`), so the model trains on the boxes it
will see. Each crop is cached once at `crop_size` (256 px) and at a margin (1.4) wider than the model's, with its 468
mediapipe face-mesh landmarks for the blend masks and the rectangle of it that holds picture (the rest is the black
padding of faces at the frame's edge, or of tight photo crops padded before detection). The data set then blends and
augments at that size and cuts the model's crop out of it at a jittered margin and position (a live detector's box
moves from frame to frame), so blends and codec artefacts happen before the final resize, as in a real capture chain.
The whole set is consolidated into one memory-mapped folder (19 k faces are 3.8 GB at 256 px: DataLoader workers
share the pages instead of each unpickling a copy).

Layouts understood by `discover` (labels: 1 fake, 0 real; identities keep the split honest):

- DFDC: `metadata.json` beside the videos (`{"x.mp4": {"label": "FAKE", "original": "y.mp4"}}`); a fake shares its
  original's identity.
- FaceForensics++: `original_sequences/**/videos/XXX.mp4` (real) and `manipulated_sequences/<method>/**/videos/
  XXX_YYY.mp4` (fake: YYY's face on XXX's video); XXX and YYY become one identity group.
- Celeb-DF: `Celeb-real/idA_NNNN.mp4`, `Celeb-synthesis/idA_idB_NNNN.mp4` (A and B grouped), `YouTube-real/*.mp4`.
- A CSV `path,label[,identity]` (paths relative to the CSV; labels real/fake or 0/1).
- A folder of real media (`--real`): identity = file, unless a pairs file (real_faces' `master.csv`:
  `file_x,file_y,Decision`) says two files show the same person.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from streamguard.faces.crop import resize_square
from streamguard.ingest.av_source import SourceError
from streamguard.training.augment import AugmentConfig, augment_with_mask
from streamguard.training.sbi import self_blend

if TYPE_CHECKING:
    from streamguard.faces.detector import FaceDetector
    from streamguard.types import Box

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
CACHE_VERSION = 2
N_LANDMARKS = 468
# Fake kinds in a sample key: a face as it is, its self-blend, or a blend of another person's face onto it.
REAL, SBI, XRAY = 0, 1, 2


@dataclass(frozen=True, slots=True)
class MediaItem:
    path: Path
    label: int  # 1 fake, 0 real
    identity: str

    @property
    def group(self) -> str:
        """Which kind of footage: "video" frames or still "image"s (the sampler can weigh them)."""
        return "video" if self.path.suffix.lower() in VIDEO_SUFFIXES else "image"


# ---------------------------------------------------------------------------------------------------- identities


class _Groups:
    """Union-find over identity names: people who must stay on the same side of the split."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self._parent.setdefault(x, x)
        while self._parent[x] != x:
            self._parent[x] = self._parent[self._parent[x]]
            x = self._parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller name wins, so a group's name does not depend on the order of the unions.
            self._parent[max(ra, rb)] = min(ra, rb)


def _regroup(items: list[MediaItem], pairs: Iterable[tuple[str, str]]) -> list[MediaItem]:
    groups = _Groups()
    for item in items:
        groups.find(item.identity)
    for a, b in pairs:
        groups.union(a, b)
    return [MediaItem(i.path, i.label, groups.find(i.identity)) for i in items]


def _media_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)


def same_person_pairs(pairs_csv: Path) -> list[tuple[str, str]]:
    """`file_x,file_y,Decision` rows whose Decision is Yes: two files that show the same person."""
    with open(pairs_csv, newline="") as f:
        return [(r["file_x"], r["file_y"]) for r in csv.DictReader(f) if r.get("Decision", "").strip().lower() == "yes"]


def discover_real(root: Path, identity_prefix: str = "") -> list[MediaItem]:
    """All media under `root` as real; identity = file name (a video is one person), merged by a pairs file."""
    root = Path(root)
    items = [MediaItem(p, 0, identity_prefix + p.name) for p in _media_files(root)]
    pairs_csv = root / "master.csv" if root.is_dir() else None
    if pairs_csv is not None and pairs_csv.exists():
        pairs = [(identity_prefix + a, identity_prefix + b) for a, b in same_person_pairs(pairs_csv)]
        items = _regroup(items, pairs)
    return items


def _label(value: str) -> int:
    low = value.strip().lower()
    if low in {"fake", "1", "true", "df", "deepfake", "manipulated"}:
        return 1
    if low in {"real", "0", "false", "original", "pristine"}:
        return 0
    raise ValueError(f"unknown label {value!r} (use real/fake or 0/1)")


def discover_csv(csv_path: Path) -> list[MediaItem]:
    """A CSV `path,label[,identity]`; relative paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    items = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: needs the columns path,label[,identity] (found {reader.fieldnames})")
        for row in reader:
            path = Path(row["path"])
            path = path if path.is_absolute() else csv_path.parent / path
            identity = (row.get("identity") or "").strip() or path.stem
            items.append(MediaItem(path, _label(row["label"]), identity))
    return items


def discover_dfdc(root: Path) -> list[MediaItem]:
    """Every `metadata.json` under `root` (DFDC parts); a fake joins its original's identity."""
    items = []
    for meta_path in sorted(Path(root).rglob("metadata.json")):
        meta = json.loads(meta_path.read_text())
        for name, info in sorted(meta.items()):
            path = meta_path.parent / name
            if not path.exists():
                continue
            fake = str(info.get("label", "")).upper() == "FAKE"
            original = info.get("original") or name
            items.append(MediaItem(path, int(fake), f"dfdc:{Path(original).stem if fake else Path(name).stem}"))
    return items


def discover_ffpp(root: Path) -> list[MediaItem]:
    """FaceForensics++: originals are real; manipulated XXX_YYY puts YYY's face on XXX's video (both grouped)."""
    root = Path(root)
    items, pairs = [], []
    for p in sorted(root.glob("original_sequences/**/videos/*")):
        if p.suffix.lower() in VIDEO_SUFFIXES:
            items.append(MediaItem(p, 0, f"ffpp:{p.stem}"))
    for p in sorted(root.glob("manipulated_sequences/*/**/videos/*")):
        if p.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        target, _, source = p.stem.partition("_")
        items.append(MediaItem(p, 1, f"ffpp:{target}"))
        if source:
            pairs.append((f"ffpp:{target}", f"ffpp:{source}"))
    return _regroup(items, pairs)


def discover_celebdf(root: Path) -> list[MediaItem]:
    """Celeb-DF (v1/v2): Celeb-real idA_NNNN, Celeb-synthesis idA_idB_NNNN (A, B grouped), YouTube-real."""
    root = Path(root)
    items, pairs = [], []
    for p in sorted((root / "Celeb-real").glob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES:
            items.append(MediaItem(p, 0, f"celeb:{p.stem.split('_')[0]}"))
    for p in sorted((root / "YouTube-real").glob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES:
            items.append(MediaItem(p, 0, f"youtube:{p.stem}"))
    for p in sorted((root / "Celeb-synthesis").glob("*")):
        if p.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        parts = p.stem.split("_")
        items.append(MediaItem(p, 1, f"celeb:{parts[0]}"))
        if len(parts) >= 3:
            pairs.append((f"celeb:{parts[0]}", f"celeb:{parts[1]}"))
    return _regroup(items, pairs)


def discover(source: Path) -> list[MediaItem]:
    """Labelled media from a CSV or a folder in one of the known layouts (DFDC, FF++, Celeb-DF, real/ + fake/)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return discover_csv(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a CSV or a folder")
    if next(source.rglob("metadata.json"), None) is not None:
        return discover_dfdc(source)
    if (source / "original_sequences").is_dir() or (source / "manipulated_sequences").is_dir():
        return discover_ffpp(source)
    if any((source / d).is_dir() for d in ("Celeb-real", "Celeb-synthesis", "YouTube-real")):
        return discover_celebdf(source)
    items = []
    for sub, label in (("real", 0), ("fake", 1)):
        if (source / sub).is_dir():
            items += [MediaItem(p, label, p.stem) for p in _media_files(source / sub)]
    if not items:
        raise ValueError(
            f"{source}: no known layout (metadata.json, original_sequences/, Celeb-real/, real/ + fake/, or a CSV)"
        )
    return items


# ---------------------------------------------------------------------------------------------------- face cache


@dataclass(slots=True)
class FaceSet:
    """Cached face crops and what we know about each. `crops` may be a read-only memory map (see `save`/`load`)."""

    crops: np.ndarray  # (N, S, S, 3) uint8
    landmarks: np.ndarray  # (N, 468, 2) float32 pixels in the crop; NaN where the face mesh found nothing
    labels: np.ndarray  # (N,) int64, 1 fake
    identities: Sequence[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "path@pts_s#face"
    valid: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))  # (N, 4) int32 x0, y0, x1,
    # y1: the part of each crop that is picture (the rest is black padding); empty: all of it
    groups: list[str] = field(default_factory=list)  # MediaItem.group of each face
    margin: float = 1.65  # crop side / face box long side the crops were cut at
    path: Path | None = None  # the folder it was loaded from, when memory-mapped
    pad_mode: str = "black"  # how still images were padded before detection (ExtractConfig.pad_mode)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.valid) != n:
            side = self.crops.shape[1] if self.crops.ndim == 4 else 0
            self.valid = np.tile(np.array([0, 0, side, side], np.int32), (n, 1))
        if not self.groups:
            self.groups = ["image"] * n

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[1])

    def repad(self, index: int, img: np.ndarray) -> np.ndarray:
        """`img` (face `index`'s crop, or a blend of it) with a still image's mirrored padding made again from its
        picture. A blend alters the picture only (colour jitter included), so the padding cut at extraction would
        still mirror the original: a seam around the picture in fakes only, which a classifier learns. Video frames
        (black beyond the frame's edge) and black padding are left as they are."""
        if self.pad_mode != "reflect" or self.groups[index] != "image":
            return img
        x0, y0, x1, y1 = (int(v) for v in self.valid[index])
        side = img.shape[0]
        if x1 - x0 < 2 or y1 - y0 < 2 or (x0, y0, x1, y1) == (0, 0, side, side):
            return img
        return cv2.copyMakeBorder(np.ascontiguousarray(img[y0:y1, x0:x1]), y0, side - y1, x0, side - x1,
                                  cv2.BORDER_REFLECT_101)

    def valid_mask(self, index: int) -> np.ndarray:
        """(S, S) bool: True where the crop holds picture, False on its black padding."""
        x0, y0, x1, y1 = (int(v) for v in self.valid[index])
        m = np.zeros((self.crop_size, self.crop_size), bool)
        m[y0:y1, x0:x1] = True
        return m

    @classmethod
    def empty(cls, size: int, margin: float = 1.65, pad_mode: str = "black") -> FaceSet:
        return cls(
            np.zeros((0, size, size, 3), np.uint8), np.zeros((0, N_LANDMARKS, 2), np.float32), np.zeros((0,), np.int64),
            valid=np.zeros((0, 4), np.int32), margin=margin, pad_mode=pad_mode,
        )

    @classmethod
    def concat(cls, parts: Sequence[FaceSet], size: int, margin: float = 1.65, pad_mode: str = "black") -> FaceSet:
        if not parts:
            return cls.empty(size, margin, pad_mode)
        return cls(
            np.concatenate([p.crops for p in parts]),
            np.concatenate([p.landmarks for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [i for p in parts for i in p.identities],
            [s for p in parts for s in p.sources],
            np.concatenate([p.valid for p in parts]),
            [g for p in parts for g in p.groups],
            margin,
            pad_mode=pad_mode,
        )

    def save(self, folder: Path) -> None:
        """crops.npy (loadable as a memory map), the other arrays, and meta.json; written to a temporary folder and
        renamed, so a run killed while saving leaves no half set behind."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "crops.npy", self.crops)
        np.save(tmp / "landmarks.npy", self.landmarks)
        np.save(tmp / "labels.npy", self.labels)
        np.save(tmp / "valid.npy", self.valid)
        meta = {"identities": self.identities, "sources": self.sources, "groups": self.groups, "margin": self.margin,
                "pad_mode": self.pad_mode}
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.replace(folder)

    @classmethod
    def load(cls, folder: Path) -> FaceSet:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        return cls(
            np.load(folder / "crops.npy", mmap_mode="r"), np.load(folder / "landmarks.npy"),
            np.load(folder / "labels.npy"), meta["identities"], meta["sources"], np.load(folder / "valid.npy"),
            meta["groups"], float(meta["margin"]), folder, meta.get("pad_mode", "black"),
        )

    def __getstate__(self) -> dict:
        # Into a DataLoader worker: a memory-mapped set travels as its folder, not as gigabytes of pickled pixels.
        state = {k: getattr(self, k) for k in self.__slots__}
        if self.path is not None:
            state["crops"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        if self.crops is None:
            assert self.path is not None
            self.crops = np.load(Path(self.path) / "crops.npy", mmap_mode="r")


@dataclass(frozen=True, slots=True)
class ExtractConfig:
    crop_size: int = 256
    margin: float = 1.4  # wider than the model's crop, which the data set cuts out of it with jitter
    image_pad: float = 0.2  # still images are padded (this share of the side) before detection: tight
    # portrait crops (UTKFace: the face fills ~0.9 of the image) are otherwise missed by the full-range detector
    pad_mode: str = "reflect"  # "reflect" or "black". The pad ends up in the crops: black framed nearly every
    # UTKFace face (the 1.15 crop is wider than the photo), a frame no call or test crop has; mirrored picture
    # keeps the surroundings picture-like (measured: see the model card)
    fps: float = 5.0  # frames per second of video to sample for training
    max_frames: int = 300  # per video
    min_confidence: float = 0.5
    min_face_px: float = 40.0  # box long side; smaller faces are not used (the quality gate drops them too)
    max_faces: int = 8  # per frame, highest detector score first

    def __post_init__(self) -> None:
        if self.pad_mode not in ("reflect", "black"):
            raise ValueError(f"pad_mode must be 'reflect' or 'black', got {self.pad_mode!r}")


class FaceExtractor:
    """Detector + crop + face mesh, with one .npz per media file in `cache_dir` (keyed by file and settings)."""

    def __init__(self, cache_dir: Path | None, cfg: ExtractConfig | None = None):
        self.cfg = cfg or ExtractConfig()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._detector: FaceDetector | None = None
        self._mesh: Any = None  # mediapipe's FaceMesh (untyped)

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
        if self._mesh is not None:
            self._mesh.close()

    def _models(self) -> tuple[FaceDetector, Any]:
        # Created on first use: a run whose crops are all cached never loads mediapipe.
        if self._detector is None:
            import mediapipe as mp

            from streamguard.faces.detector import FaceDetector

            self._detector = FaceDetector(min_confidence=self.cfg.min_confidence)
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.3
            )
        return self._detector, self._mesh

    def _cache_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        st = path.stat()
        settings = sorted(_cfg_dict(self.cfg).items())
        key = json.dumps([str(path.resolve()), st.st_size, int(st.st_mtime), CACHE_VERSION, settings])
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)[:40]}-{digest}.npz"

    def _frames(self, path: Path) -> Iterator[tuple[float, np.ndarray, int]]:
        """(pts_s, RGB frame, black padding added on each side in pixels)."""
        if path.suffix.lower() in VIDEO_SUFFIXES:
            from streamguard.ingest.av_source import iter_sampled_frames

            # All frames decoded (skip_nonref=False): sampling times then do not depend on the GOP structure.
            for i, frame in enumerate(iter_sampled_frames(str(path), fps=self.cfg.fps, skip_nonref=False)):
                if i >= self.cfg.max_frames:
                    break
                yield frame.pts_s, frame.rgb, 0
        else:
            bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{path}: not a readable image")
            pad = round(self.cfg.image_pad * max(bgr.shape[:2]))
            if pad:
                border = cv2.BORDER_REFLECT_101 if self.cfg.pad_mode == "reflect" else cv2.BORDER_CONSTANT
                bgr = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, border, value=(0, 0, 0))
            yield 0.0, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pad

    def _extract(self, item: MediaItem) -> FaceSet:
        from streamguard.faces.crop import crop_box, square_crop

        detector, mesh = self._models()
        size = self.cfg.crop_size
        crops, lms, sources, valid = [], [], [], []
        for pts, rgb, pad in self._frames(item.path):
            h, w = rgb.shape[:2]
            dets = [d for d in detector.detect(rgb) if d.box.long_side >= self.cfg.min_face_px
                    and _inside_picture(d.box, w, h, pad)][: self.cfg.max_faces]
            for k, det in enumerate(dets):
                x0, y0, side = crop_box(det.box, self.cfg.margin, w, h)
                scale = size / side
                rect = [(pad - x0) * scale, (pad - y0) * scale, (w - pad - x0) * scale, (h - pad - y0) * scale]
                valid.append(np.clip(np.round(rect), 0, size).astype(np.int32))
                crop = square_crop(rgb, det.box, margin=self.cfg.margin, out_size=size)
                result = mesh.process(crop)
                if result.multi_face_landmarks:
                    lm = np.array([(p.x * size, p.y * size) for p in result.multi_face_landmarks[0].landmark],
                                  np.float32)
                else:
                    lm = np.full((N_LANDMARKS, 2), np.nan, np.float32)
                crops.append(crop)
                lms.append(lm)
                sources.append(f"{item.path}@{pts:.3f}#{k}")
        if not crops:
            return FaceSet.empty(size, self.cfg.margin, self.cfg.pad_mode)
        return self._faceset(item, np.stack(crops), np.stack(lms), sources, np.stack(valid))

    def _faceset(self, item: MediaItem, crops: np.ndarray, lms: np.ndarray, sources: list[str],
                 valid: np.ndarray) -> FaceSet:
        n = len(crops)
        return FaceSet(crops, lms, np.full(n, item.label, np.int64), [item.identity] * n, sources, valid,
                       [item.group] * n, self.cfg.margin, pad_mode=self.cfg.pad_mode)

    def faces(self, item: MediaItem) -> FaceSet:
        """The item's faces, from the cache when it has them. Label and identity come from the item, not the cache."""
        cache = self._cache_path(item.path)
        if cache is not None and cache.exists():
            with np.load(cache) as z:
                return self._faceset(item, z["crops"], z["landmarks"], [str(s) for s in z["sources"]], z["valid"])
        fs = self._extract(item)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, crops=fs.crops, landmarks=fs.landmarks, sources=np.array(fs.sources, dtype=str),
                     valid=fs.valid)
            tmp.replace(cache)
        return fs

    def extract_all(self, items: Sequence[MediaItem], progress: bool = True) -> FaceSet:
        """Every item's faces in one set, in item order. With a cache folder the set is consolidated there once
        (keyed by the items and settings) and returned memory-mapped."""
        from tqdm import tqdm

        consolidated = self._consolidated_path(items)
        if consolidated is not None and (consolidated / "meta.json").exists():
            return FaceSet.load(consolidated)
        parts = []
        for item in tqdm(items, desc="faces", unit="file", disable=not progress):
            try:
                parts.append(self.faces(item))
            except (SourceError, OSError, ValueError, cv2.error) as exc:  # one bad file must not end a long run
                log.warning("%s: skipped (%s)", item.path, exc)
        faces = FaceSet.concat(parts, self.cfg.crop_size, self.cfg.margin, self.cfg.pad_mode)
        if consolidated is None:
            return faces
        faces.save(consolidated)
        del faces, parts
        return FaceSet.load(consolidated)

    def _consolidated_path(self, items: Sequence[MediaItem]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps([[str(i.path.resolve()), i.label, i.identity] for i in items]
                         + [CACHE_VERSION, sorted(_cfg_dict(self.cfg).items())])
        return self.cache_dir / f"set-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _inside_picture(box: Box, w: int, h: int, pad: int) -> bool:
    """Whether the box's centre lies in the picture, not in the padding around it (a mirrored padding can show a
    mirrored part of the face)."""
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    return pad <= cx < w - pad and pad <= cy < h - pad


def _cfg_dict(cfg: ExtractConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------------- split


def split_by_identity(
    identities: Sequence[str], val_fraction: float, seed: int, keep_in_train: Iterable[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) such that no identity is on both sides; `val_fraction` of the identities go to val.

    `keep_in_train` identities never go to val (e.g. one video's 150 frames would swamp a validation set of photos).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keep = set(keep_in_train)
    candidates = sorted(set(identities) - keep)
    rng = np.random.default_rng(seed)
    n_val = round(val_fraction * len(candidates))
    val_ids = set(rng.permutation(candidates)[:n_val].tolist()) if n_val else set()
    is_val = np.array([i in val_ids for i in identities], bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------------------------------------------- torch side

# A sample key: (face index, fake kind: REAL, SBI or XRAY, the sample's own seed). Every random choice of a sample
# derives from its key, so a run is reproducible whatever the number of DataLoader workers.
SampleKey = tuple[int, int, int]


class IdentityBalancedSampler(Sampler[SampleKey]):
    """Deepware's sampler: pick an identity uniformly, then real or fake with equal odds, then one of its faces.

    A fake is one of the identity's labelled fakes when it has some (with probability 1 - `sbi_share`) and otherwise
    a pseudo-fake made from one of its real faces: a cross-identity blend (XRAY) with probability `xray_share`, else
    an SBI. An identity with no real face gives its real draw to a random identity that has one.

    `group_weights` (e.g. {"video": 0.2, "image": 0.8}, with `groups` naming each face's group) first picks the
    group, then an identity within it: 300 frames of five real video calls would otherwise be 5 identities among
    14 000 photo ones, drawn once in 3 000 samples.

    `paired=True` yields two keys per draw, a real and a fake of the same identity: for a pseudo-fake, the real face it
    is made from, with the same seed, so both get the same augmentation and differ only by the blend (the SBI paper's
    batches); the halves stay together in batches of even size. The draws depend on (seed, epoch) only: call
    `set_epoch` before each epoch.
    """

    def __init__(self, labels: np.ndarray, identities: Sequence[str], indices: Sequence[int], num_samples: int,
                 seed: int, sbi: bool = True, sbi_share: float = 0.5, paired: bool = False, xray_share: float = 0.0,
                 groups: Sequence[str] | None = None, group_weights: dict[str, float] | None = None):
        if not 0.0 <= xray_share <= 1.0:
            raise ValueError(f"xray_share must be in [0, 1], got {xray_share}")
        self.num_samples = int(num_samples)
        self.seed, self.epoch, self.sbi, self.sbi_share, self.paired = int(seed), 0, sbi, sbi_share, paired
        self.xray_share = xray_share
        reals: dict[str, list[int]] = defaultdict(list)
        fakes: dict[str, list[int]] = defaultdict(list)
        group_of: dict[str, str] = {}
        for i in indices:
            (fakes if labels[i] == 1 else reals)[identities[i]].append(int(i))
            group_of.setdefault(identities[i], groups[i] if groups is not None else "")
        self.identities = sorted(set(reals) | set(fakes))
        self.reals, self.fakes = dict(reals), dict(fakes)
        self._with_reals = sorted(reals)
        if not self._with_reals:
            raise ValueError("no real faces to sample from")
        if not self.fakes and not sbi:
            raise ValueError("no fake faces, and SBI is off")
        self._by_group, self._group_p = self._groups(group_of, group_weights)

    def _groups(self, group_of: dict[str, str], weights: dict[str, float] | None,
                ) -> tuple[list[list[str]], np.ndarray | None]:
        if not weights:
            return [self.identities], None
        present = sorted({g for g in group_of.values() if weights.get(g, 0.0) > 0})
        if not present:
            raise ValueError(f"group_weights {weights} name no group of the training faces")
        by_group = [sorted(i for i in self.identities if group_of[i] == g) for g in present]
        p = np.array([weights[g] for g in present], np.float64)
        return by_group, p / p.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _identity(self, rng: np.random.Generator) -> str:
        pool = self._by_group[0] if self._group_p is None else self._by_group[rng.choice(len(self._by_group),
                                                                                          p=self._group_p)]
        return pool[rng.integers(len(pool))]

    def _real(self, ident: str, rng: np.random.Generator) -> int:
        if ident not in self.reals:
            ident = self._with_reals[rng.integers(len(self._with_reals))]
        pool = self.reals[ident]
        return pool[rng.integers(len(pool))]

    def _fake(self, ident: str, rng: np.random.Generator) -> tuple[int, int]:
        """(face index, kind) of a fake of `ident`."""
        labelled = self.fakes.get(ident)
        if labelled and (not self.sbi or ident not in self.reals or rng.random() >= self.sbi_share):
            return labelled[rng.integers(len(labelled))], REAL
        if not self.sbi:  # this identity has no labelled fake: someone else's
            pool = self.fakes[sorted(self.fakes)[rng.integers(len(self.fakes))]]
            return pool[rng.integers(len(pool))], REAL
        kind = XRAY if self.xray_share and rng.random() < self.xray_share else SBI
        return self._real(ident, rng), kind

    def __iter__(self) -> Iterator[SampleKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        produced = 0
        while produced < self.num_samples:
            ident = self._identity(rng)
            seed = int(rng.integers(2**31))
            if self.paired:
                fake, kind = self._fake(ident, rng)
                real = fake if kind != REAL else self._real(ident, rng)
                keys: list[SampleKey] = [(real, REAL, seed), (fake, kind, seed)]
            elif rng.random() < 0.5:
                keys = [(self._real(ident, rng), REAL, seed)]
            else:
                keys = [(*self._fake(ident, rng), seed)]
            yield from keys[: self.num_samples - produced]
            produced += len(keys)


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (S, S, 3) RGB → float32 (3, S, S), normalised as the model card says: (x / 255 - mean) / std."""
    x = img.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True, slots=True)
class CropConfig:
    """How the model's crop is cut out of a cached (wider) one: the card's margin, jittered in training.

    `margin_range` and `max_shift` (of the face box side) stand for a live detector's box, which grows, shrinks and
    moves by a few per cent between samples; at evaluation the crop is the card's, centred."""

    margin: float = 1.65
    margin_range: tuple[float, float] | None = None  # None: no scale jitter
    max_shift: float = 0.0


def cut_crop(img: np.ndarray, mask: np.ndarray | None, cached_margin: float, out_size: int, margin: float,
             shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray | None]:
    """The square crop at `margin` × the face box, centred on the box centre + `shift` (fractions of the box side),
    out of a crop cut at `cached_margin`, resized to `out_size` as `square_crop` resizes (area when shrinking).
    Past the cached crop's edge it is black, as a frame's edge is in `square_crop`."""
    from streamguard.faces.crop import square_crop
    from streamguard.types import Box

    size = img.shape[0]
    box_side = size / cached_margin
    cx, cy = size / 2 + shift[0] * box_side, size / 2 + shift[1] * box_side
    box = Box(cx - box_side / 2, cy - box_side / 2, cx + box_side / 2, cy + box_side / 2)
    out = square_crop(img, box, margin=margin, out_size=out_size)
    if mask is not None:
        mask = square_crop(mask, box, margin=margin, out_size=out_size)
    return out, mask


class FaceDataset(Dataset):
    """Maps a SampleKey to (input tensor, label, blend-map target, whether the target is known).

    The target is the blend region (mask / its peak, moved with the augmentation) area-averaged to the model's
    map size (input_size / map_stride): zeros for a real face, unknown (weight 0) for a labelled fake, whose blend
    region we do not have. `train` applies the augmentations and the crop jitter; eval only blends and cuts the
    card's crop. `donors`: the faces cross-identity blends may take a face from (the training faces; never
    held-out ones in training).
    """

    def __init__(self, faces: FaceSet, input_size: int, mean: Sequence[float], std: Sequence[float],
                 train: bool = True, augment_cfg: AugmentConfig | None = None, map_stride: int = 16,
                 crop: CropConfig | None = None, donors: Sequence[int] | None = None):
        self.faces, self.input_size, self.mean, self.std = faces, input_size, tuple(mean), tuple(std)
        self.train, self.map_stride = train, map_stride
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.crop = crop or CropConfig(margin=faces.margin)
        if self.crop.margin > faces.margin * 1.5:
            raise ValueError(f"model margin {self.crop.margin} is far wider than the cached crops' {faces.margin}")
        self.donors = None if donors is None else np.asarray(donors, np.int64)
        self._donor_shapes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.faces)

    def _low_res_scale(self, seed: int) -> float | None:
        """The side factor this pair is made at (None: full size). Its own random stream, so a real face and its
        fakes with the same seed are made at the same resolution, and configs without it keep their draws."""
        cfg = self.augment_cfg
        if not self.train or not cfg.p_low_res_blend:
            return None
        rng = np.random.default_rng([seed, 3])
        return float(rng.uniform(*cfg.low_res_range)) if rng.random() < cfg.p_low_res_blend else None

    def _blend(self, index: int, kind: int, seed: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(the pseudo-fake, its blend mask), made at `scale` of the crop side and brought back to its size."""
        from streamguard.training.xray import cross_blend, pick_donor

        img = np.asarray(self.faces.crops[index])
        valid = self.faces.valid_mask(index)
        lm = self.faces.landmarks[index]
        rng = np.random.default_rng([seed, 1])
        size = img.shape[0]
        if scale is not None:
            small = _low_res_side(size, scale)
            scale = small / size  # the factor after rounding the side: landmarks must land on the pixels
            img, lm = resize_square(img, small), lm * scale
            valid = resize_square(valid.astype(np.uint8), small).astype(bool)
        if kind == XRAY:
            donor = pick_donor(index, self.faces.landmarks[index], self.faces, self._donor_pool(), rng)
            if donor is not None:
                donor_img, donor_lm = np.asarray(self.faces.crops[donor]), self.faces.landmarks[donor]
                if scale is not None:
                    donor_img, donor_lm = resize_square(donor_img, img.shape[0]), donor_lm * scale
                blend = cross_blend(img, lm, donor_img, donor_lm, rng, valid=valid)
                return resize_square(blend.fake, size), resize_square(blend.mask, size)
        blend = self_blend(img, lm, rng, valid=valid)
        return resize_square(blend.fake, size), resize_square(blend.mask, size)

    def _donor_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """(donor indices with landmarks, their normalised landmark shapes), computed once per worker."""
        from streamguard.training.xray import normalised_shapes

        if self._donor_shapes is None:
            pool = self.donors if self.donors is not None else np.arange(len(self.faces))
            pool = pool[np.isfinite(self.faces.landmarks[pool]).all(axis=(1, 2))]
            self.donors, self._donor_shapes = pool, normalised_shapes(self.faces.landmarks[pool])
        assert self.donors is not None
        return self.donors, self._donor_shapes

    def sample(self, key: SampleKey) -> tuple[np.ndarray, int, np.ndarray | None]:
        """The sample as a uint8 crop at input size, its label, and its blend mask at input size (None: unknown)."""
        index, kind, seed = key
        img = np.asarray(self.faces.crops[index])
        label = int(self.faces.labels[index])
        mask: np.ndarray | None = None if label == 1 else np.zeros(img.shape[:2], np.float32)
        scale = self._low_res_scale(seed)
        if kind == REAL and scale is not None:
            # The real side of a low-resolution pair (resize_square: area down, as a far camera; bilinear up, as
            # the service upscales a small face's crop).
            img = resize_square(resize_square(img, _low_res_side(img.shape[0], scale)), img.shape[0])
        if kind != REAL:
            img, blend_mask = self._blend(index, kind, seed, scale)
            label = 1
            peak = float(blend_mask.max())
            mask = blend_mask / peak if peak > 0 else blend_mask
        img = self.faces.repad(index, img)  # real and fake alike: a pair differs only by its blend
        margin, shift = self.crop.margin, (0.0, 0.0)
        if self.train:
            # Its own stream: a real face and its fake with the same seed get the very same augmentation and crop.
            rng = np.random.default_rng([seed, 2])
            img, mask = augment_with_mask(img, mask, rng, self.augment_cfg)
            if self.crop.margin_range is not None:
                margin = float(rng.uniform(*self.crop.margin_range))
            if self.crop.max_shift:
                dx, dy = rng.uniform(-1, 1, 2) * self.crop.max_shift
                shift = (float(dx), float(dy))
        if margin == self.faces.margin and shift == (0.0, 0.0):
            img = resize_square(img, self.input_size)
            if mask is not None:
                mask = resize_square(mask, self.input_size)
        else:
            img, mask = cut_crop(img, mask, self.faces.margin, self.input_size, margin, shift)
        return img, label, mask

    def image(self, key: SampleKey) -> tuple[np.ndarray, int]:
        img, label, _ = self.sample(key)
        return img, label

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        img, label, mask = self.sample(key)
        side = self.input_size // self.map_stride
        if mask is None:
            target, known = np.zeros((side, side), np.float32), 0.0
        else:
            target, known = np.asarray(cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA), np.float32), 1.0
        return (
            to_tensor(img, self.mean, self.std),
            torch.tensor(float(label)),
            torch.from_numpy(np.clip(target, 0.0, 1.0)[None]),
            torch.tensor(known),
        )


def _low_res_side(size: int, scale: float) -> int:
    """The side a low-resolution pair is made at."""
    return max(8, round(size * scale))


def eval_keys(faces: FaceSet, indices: Sequence[int], sbi_per_face: int, seed: int,
              xray_per_face: int = 0) -> list[SampleKey]:
    """A fixed validation set: every face as it is, plus `sbi_per_face` fresh SBI fakes (and `xray_per_face`
    cross-identity blends) of each real face."""
    rng = np.random.default_rng([seed, 7919])
    keys: list[SampleKey] = []
    for i in indices:
        keys.append((int(i), REAL, int(rng.integers(2**31))))
        if faces.labels[i] == 0:
            keys += [(int(i), SBI, int(rng.integers(2**31))) for _ in range(sbi_per_face)]
            keys += [(int(i), XRAY, int(rng.integers(2**31))) for _ in range(xray_per_face)]
    return keys
