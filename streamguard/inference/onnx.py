"""ONNX Runtime backend: the CPU path everywhere, and the reference the GPU backends must match."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import CPU_CALL_BATCH, preprocess, to_p_fake


def load_session(onnx_path: Path, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session for a face model (CPU unless `providers` say otherwise).

    At most 2 threads (0: that default) and no spin-waiting: a small face model gains little from more, and spinning
    threads burn the cores that decoding and face detection need (measured: 2.2 ms/face at batch 1 with 2 threads
    against 6.2 ms with ORT's defaults on the loaded 2-core CI machine)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])


class OnnxClassifier:
    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, card: ModelCard, providers: list[str] | None = None, threads: int = 0,
                 call_batch: int = CPU_CALL_BATCH):
        if call_batch < 1:
            raise ValueError(f"call_batch must be at least 1, got {call_batch}")
        self.card = card
        self.path = Path(onnx_path)
        self.call_batch = call_batch
        self._session = load_session(self.path, threads, providers)
        self._input = self._session.get_inputs()[0].name

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    @property
    def threads(self) -> int:
        """The session's intra-op threads (what a model call may keep busy)."""
        return int(self._session.get_session_options().intra_op_num_threads)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        step = self.call_batch
        return np.concatenate([self._run(crops[i:i + step]) for i in range(0, len(crops), step)])

    def _run(self, crops: np.ndarray) -> np.ndarray:
        (raw, *_) = self._session.run(None, {self._input: preprocess(crops, self.card)})
        return to_p_fake(raw, self.card)

    def close(self) -> None:
        """Nothing to free by hand: ONNX Runtime's CPU session releases its memory with the object."""
