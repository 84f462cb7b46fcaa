"""Still images as one-frame sources, and telling images from videos by file suffix."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from streamguard.ingest.av_source import SourceError
from streamguard.types import SampledFrame

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".flv", ".mpg", ".mpeg", ".wmv",
     ".3gp", ".ogv", ".h264", ".264", ".hevc", ".h265"}
)


def is_image(path: str | Path) -> bool:
    """Whether the file name says still image (case-insensitive suffix; the content is checked by read_image)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video(path: str | Path) -> bool:
    """Whether the file name says video (case-insensitive suffix; the content is checked when it is opened)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_image(path: str | Path, *, stream_id: str | None = None) -> SampledFrame:
    """Read a still image as one RGB SampledFrame at pts 0; SourceError when it is missing, unreadable or corrupt."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if not path.is_file():
        raise SourceError(f"{path}: not a file")
    # imdecode on bytes rather than imread: it handles non-ASCII paths and never prints a warning for bad files.
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None or bgr.size == 0:
        raise SourceError(f"{path}: not a readable image (corrupt or unsupported format)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return SampledFrame(stream_id=stream_id or path.name, pts_s=0.0, wall_ts=time.time(), rgb=rgb)
