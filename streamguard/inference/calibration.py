"""Real face crops for INT8 calibration and GPU parity checks, cut exactly as the service cuts them.

Photos go through the same FaceAnalyzer as `scan` and `serve` (mediapipe detection, square crop at the model card's
margin, quality gate), so the activation ranges TensorRT calibrates on are those of faces the model will see; images
that already are aligned crops (`images_are_crops`) are only resized. The crop set is cached as .npy under a name
derived from the files and crop settings, so a rebuild does not detect faces again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.engine_cache import crops_sha256
from streamguard.ingest.image import is_image, read_image


def image_files(source: Path | Sequence[Path]) -> list[Path]:
    """The still images in a folder (recursively) or a list of files, sorted for a stable crop set."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_file():
            return [root]
        return sorted(p for p in root.rglob("*") if p.is_file() and is_image(p))
    return sorted(Path(p) for p in source)


def face_crops(
    paths: Sequence[Path], card: ModelCard, *, images_are_crops: bool = False, quality_ok_only: bool = True
) -> np.ndarray:
    """(N, S, S, 3) uint8 RGB crops at the card's input size: every face found (gated) in every image."""
    size = card.preprocess.input_size
    crops: list[np.ndarray] = []
    if images_are_crops:
        for p in paths:
            rgb = read_image(p).rgb
            crops.append(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA))
    else:
        from streamguard.faces.analyzer import FaceAnalyzer  # mediapipe: only when faces are to be found

        analyzer = FaceAnalyzer(card)
        try:
            for p in paths:
                for face in analyzer.analyze(read_image(p)):
                    if face.quality.ok or not quality_ok_only:
                        crops.append(face.crop)
        finally:
            analyzer.close()
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(crops).astype(np.uint8, copy=False)


def crop_set_name(paths: Sequence[Path], card: ModelCard, images_are_crops: bool) -> str:
    """A cache file name that changes with the files (path, size, mtime) and the crop settings."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    pp = card.preprocess
    h.update(f"{pp.input_size}|{pp.crop_margin}|{images_are_crops}".encode())
    return f"crops-{pp.input_size}px-{h.hexdigest()[:16]}.npy"


def load_crop_set(
    source: Path | Sequence[Path], card: ModelCard, cache_dir: Path | None, *, images_are_crops: bool = False
) -> tuple[np.ndarray, str]:
    """(crops, sha256 of the crops) from images, through the .npy cache in cache_dir when given."""
    paths = image_files(source)
    if not paths:
        raise ValueError(f"no images found in {source}")
    cache = Path(cache_dir) / crop_set_name(paths, card, images_are_crops) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        crops = np.load(cache)
    else:
        crops = face_crops(paths, card, images_are_crops=images_are_crops)
        if len(crops) == 0:
            raise ValueError(f"no usable face found in the {len(paths)} images of {source}")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, crops)
    return crops, crops_sha256(crops)


def split_holdout(crops: np.ndarray, every: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, holdout): every `every`-th crop is held out to check the INT8 engine on faces it never saw."""
    if every < 2 or len(crops) < every:
        return crops, crops
    mask = np.zeros(len(crops), bool)
    mask[::every] = True
    return crops[~mask], crops[mask]
