"""The `Classifier` protocol every backend implements: a batch of face crops in, P(fake) out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from streamguard.inference.card import ModelCard


class InferenceUnavailable(RuntimeError):
    """A remote backend could not score this batch and has no local model to fall back on (triton.fallback:
    unscored): the callers treat the faces as seen but unscored, instead of as a failed frame."""


@runtime_checkable
class Classifier(Protocol):
    card: ModelCard
    backend: str

    @property
    def input_size(self) -> int: ...

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """crops: (N, S, S, 3) uint8 RGB at `input_size` → (N,) float32 P(fake) in [0, 1]."""
        ...

    def close(self) -> None:
        """Free what the backend holds now (TensorRT: device buffers, CUDA graphs); predict is not called after."""
        ...


# Faces per session.run on the CPU. The batcher gathers up to batcher.max_batch crops (what a GPU wants); on the CPU
# a large batch is slower per face, not faster: its activations outgrow the caches (default model, flip-averaged, one
# thread: 17.9 ms of CPU per face in one call of 16 against 14.2 in calls of 4, 1-2 no better, and the process holds
# 482 MB after a call of 16 against 211 MB; README "Calls of 4 faces on the CPU").
CPU_CALL_BATCH = 4


def preprocess(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 (N, S, S, 3) RGB → float32 tensor in the model's layout and normalisation."""
    p = card.preprocess
    if crops.ndim != 4 or crops.shape[1:] != (p.input_size, p.input_size, 3):
        raise ValueError(f"crops must be (N, {p.input_size}, {p.input_size}, 3), got {crops.shape}")
    x = crops.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    if p.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def to_p_fake(raw: np.ndarray, card: ModelCard) -> np.ndarray:
    """The model's raw output (N,) or (N, 1) → P(fake) (N,) float32."""
    y = np.asarray(raw, np.float32).reshape(len(raw), -1)[:, 0]
    if card.output == "p_real":
        y = 1.0 - y
    elif card.output == "logit_fake":
        y = 1.0 / (1.0 + np.exp(-y))
    return np.clip(y, 0.0, 1.0)
