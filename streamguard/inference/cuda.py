"""The `cuda` backend: the ONNX model on a CUDA GPU without TensorRT, through ONNX Runtime's CUDA execution provider
(the `onnxruntime-gpu` package, which replaces `onnxruntime`).

ONNX Runtime runs the ONNX file itself, so nothing is converted and the scores are those of the CPU backend to float
rounding (FP32: ORT's CUDA provider runs the graph in the model's own precision; FP16 and CUDA graphs are what the
`tensorrt` backend is for). I/O binding keeps the output on the device until one copy back. An earlier engine ran the
graph in PyTorch through a hand-written ONNX interpreter; it went because ONNX Runtime covers every operator of every
model we ship or import and the serving path then needs no torch, while onnx2torch, the maintained converter, depends
on torchvision, which this project does not install.

`device="cpu"` runs the same code (batch splitting, I/O binding, output mapping) on ORT's CPU provider, so it is
tested on machines without a GPU. `predict` is serialised with a lock: one set of bindings at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess, to_p_fake
from streamguard.inference.engine_cache import DEFAULT_MAX_BATCH, choose_profile, split_batches
from streamguard.inference.gpu import BackendUnavailable

CUDA_EP = "CUDAExecutionProvider"


class OrtCudaClassifier:
    """ONNX Runtime's CUDAExecutionProvider with I/O binding (onnxruntime-gpu); see the module docstring."""

    backend = "cuda"

    def __init__(self, onnx_path: Path, card: ModelCard, *, device: Literal["cuda", "cpu"] = "cuda",
                 device_id: int = 0, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        import onnxruntime as ort

        if device == "cuda" and CUDA_EP not in ort.get_available_providers():
            raise BackendUnavailable(f"ONNX Runtime has no {CUDA_EP} (`pip install onnxruntime-gpu`)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.card = card
        self.path = Path(onnx_path)
        self.precision = "fp32"
        self.profile = choose_profile(max_batch)
        self._device, self._device_id = device, device_id
        cuda = (CUDA_EP, {"device_id": str(device_id), "cudnn_conv_algo_search": "EXHAUSTIVE"})
        provider = cuda if device == "cuda" else "CPUExecutionProvider"
        self._session: ort.InferenceSession | None = ort.InferenceSession(str(self.path), options,
                                                                           providers=[provider])
        if device == "cuda" and CUDA_EP not in self._session.get_providers():
            raise BackendUnavailable("ONNX Runtime could not start its CUDA provider (driver, CUDA or cuDNN mismatch)")
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        outs = []
        with self._lock:
            if self._session is None:
                raise RuntimeError("the cuda classifier is closed")
            for start, stop in split_batches(len(crops), self.profile.max_batch):
                binding = self._session.io_binding()
                binding.bind_cpu_input(self._input, preprocess(crops[start:stop], self.card))
                binding.bind_output(self._output, self._device, self._device_id)
                self._session.run_with_iobinding(binding)
                (raw,) = binding.copy_outputs_to_cpu()
                outs.append(np.asarray(raw).reshape(stop - start, -1))
        return to_p_fake(np.concatenate(outs), self.card)

    def close(self) -> None:
        """Drop the session now, so its device memory is freed before a replacement is loaded."""
        with self._lock:
            self._session = None


def load_cuda_classifier(onnx_path: Path, card: ModelCard, *, max_batch: int = DEFAULT_MAX_BATCH,
                         device_id: int = 0) -> OrtCudaClassifier:
    """The cuda backend; BackendUnavailable (with how to get it) where ONNX Runtime has no CUDA provider."""
    return OrtCudaClassifier(onnx_path, card, device_id=device_id, max_batch=max_batch)
