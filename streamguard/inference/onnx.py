"""ONNX Runtime backend: the CPU path everywhere, and the reference the GPU backends must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess, to_p_fake


class OnnxClassifier:
    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, card: ModelCard, providers: list[str] | None = None, threads: int = 0):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.card = card
        self.path = Path(onnx_path)
        self._session = ort.InferenceSession(
            str(self.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        (raw, *_) = self._session.run(None, {self._input: preprocess(crops, self.card)})
        return to_p_fake(raw, self.card)
