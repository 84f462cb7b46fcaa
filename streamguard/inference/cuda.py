"""The `cuda` backend: the same ONNX model on a CUDA GPU without TensorRT. Two engines behind one protocol:

* `TorchCudaClassifier` — the ONNX graph run by PyTorch (`onnx_torch.OnnxTorchModule`, our own interpreter: no
  onnx2torch dependency) in FP16 with channels-last memory, preprocessing (uint8 -> normalised NCHW) on the GPU, and
  one CUDA graph per batch bucket (`engine_cache.graph_batch_sizes`): a batch is copied into the bucket's static
  input and the graph replays preprocessing + network in one launch. FP16 comes from converting the module's float
  weights (`.half()`); the input is normalised in FP32 first, and the output is cast back to FP32.
* `OrtCudaClassifier` — ONNX Runtime's CUDAExecutionProvider (the `onnxruntime-gpu` package) with I/O binding:
  the output stays on the device until one copy back. It runs the graph in the model's own precision (FP32): ORT's
  CUDA provider does not lower precision by itself, and converting the ONNX file to FP16 (onnxconverter-common)
  would add a dependency and a second model file for a gain TensorRT gives anyway. No CUDA graphs here: ORT
  captures one only for fixed-address, fixed-shape bindings, which dynamic batches are not.

`load_cuda_classifier` picks ONNX Runtime's provider when installed (exact FP32 parity, no torch in the serving
path), else PyTorch (the engine that runs on a machine with only a CUDA build of torch, as the lent GPU machine has).
Both serialise `predict` with a lock: one stream, one set of static buffers.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess, to_p_fake
from streamguard.inference.engine_cache import (
    DEFAULT_GRAPH_MAX_BATCH,
    DEFAULT_MAX_BATCH,
    Profile,
    choose_profile,
    graph_batch_sizes,
    plan_batch,
    split_batches,
)
from streamguard.inference.gpu import BackendUnavailable

log = logging.getLogger(__name__)

CudaEngine = Literal["auto", "onnxruntime", "torch"]


class TorchCudaClassifier:
    """ONNX model -> PyTorch on `device` ("cuda", "cuda:1"; "cpu" runs the same code for tests), FP16 by default."""

    backend = "cuda"

    def __init__(
        self,
        onnx_path: Path,
        card: ModelCard,
        *,
        device: str = "cuda",
        precision: Literal["fp16", "fp32"] = "fp16",
        max_batch: int = DEFAULT_MAX_BATCH,
        cuda_graphs: bool = True,
        graph_max_batch: int = DEFAULT_GRAPH_MAX_BATCH,
    ):
        import torch

        from streamguard.inference.onnx_torch import OnnxTorchModule

        self.card = card
        self.path = Path(onnx_path)
        self.engine = "torch"
        self.precision = precision
        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"PyTorch {torch.__version__} sees no CUDA device")
        p = card.preprocess
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self._channels_last = self.device.type == "cuda" and p.layout == "NCHW"
        module = OnnxTorchModule(self.path).eval().to(self.device, self._dtype)
        if self._channels_last:  # 4-D weights in NHWC order too: cuDNN's tensor-core convolutions want both
            module = module.to(memory_format=torch.channels_last)
        self._module = module
        self._mean = torch.tensor(p.mean, dtype=torch.float32, device=self.device)
        self._inv_std = 1.0 / torch.tensor(p.std, dtype=torch.float32, device=self.device)
        self.profile: Profile = choose_profile(max_batch)
        self._lock = threading.Lock()
        size = p.input_size
        on_gpu = self.device.type == "cuda"
        # Pinned staging for host -> device copies of uint8 crops (4x fewer bytes than the float tensor).
        self._staging = torch.empty((self.profile.max_batch, size, size, 3), dtype=torch.uint8, pin_memory=on_gpu)
        self._stream = torch.cuda.Stream(self.device) if on_gpu else None
        if self._stream is not None:  # weights and constants were copied on the default stream; ours does not wait
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # for it by itself (non-blocking)
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # batch -> (CUDAGraph, static input, static output)
        use_graphs = on_gpu and cuda_graphs
        self.graph_sizes: tuple[int, ...] = graph_batch_sizes(self.profile, graph_max_batch) if use_graphs else ()
        if self.graph_sizes:
            self._capture_graphs()

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def _forward(self, crops_u8: Any) -> Any:
        """uint8 (N, S, S, 3) on the device -> the model's raw first output in FP32."""
        torch = self._torch
        x = crops_u8.to(torch.float32) * (1.0 / 255.0)
        x = (x - self._mean) * self._inv_std
        if self.card.preprocess.layout == "NCHW":
            x = x.permute(0, 3, 1, 2)
        x = x.to(self._dtype)
        x = x.contiguous(memory_format=torch.channels_last) if self._channels_last else x.contiguous()
        out = self._module(x)
        return out.to(torch.float32)

    def _capture_graphs(self) -> None:
        torch = self._torch
        size = self.input_size
        try:
            with torch.cuda.stream(self._stream), torch.inference_mode():
                for b in sorted(self.graph_sizes, reverse=True):
                    static_in = torch.zeros((b, size, size, 3), dtype=torch.uint8, device=self.device)
                    # Warm up on the side stream, outside the capture (cuDNN's algorithm choice, the allocator,
                    # lazy module loading), as PyTorch's CUDA graph notes prescribe.
                    for _ in range(3):
                        self._forward(static_in)
                    torch.cuda.current_stream().synchronize()
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: CUDA calls of other threads (the decoders, a second backend) neither break this
                    # capture nor fail because of it, as they would in the default "global" mode.
                    with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                        static_out = self._forward(static_in)
                    self._graphs[b] = (graph, static_in, static_out)
            torch.cuda.synchronize(self.device)
        except RuntimeError as exc:  # capture unsupported for some op: run eagerly, say so once
            log.warning("cuda backend: CUDA graph capture failed (%s); running without graphs", exc)
            self._graphs.clear()
            self.graph_sizes = ()

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        size = self.input_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise ValueError(f"crops must be (N, {size}, {size}, 3), got {crops.shape}")
        torch = self._torch
        outs = []
        with self._lock, torch.inference_mode():
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
            with ctx:
                for start, stop in split_batches(len(crops), self.profile.max_batch):
                    n = stop - start
                    plan = plan_batch(n, self.graph_sizes, self.profile)
                    staged = self._staging[:n]
                    staged.copy_(torch.from_numpy(np.ascontiguousarray(crops[start:stop], np.uint8)))
                    if plan.use_graph and plan.run_batch in self._graphs:
                        graph, static_in, static_out = self._graphs[plan.run_batch]
                        static_in[:n].copy_(staged, non_blocking=True)  # rows n.. keep old crops: rows are independent
                        graph.replay()
                        raw = static_out[:n].cpu()
                    else:
                        raw = self._forward(staged.to(self.device, non_blocking=True)).cpu()
                    outs.append(raw.numpy().reshape(n, -1))
        return to_p_fake(np.concatenate(outs), self.card)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class OrtCudaClassifier:
    """ONNX Runtime's CUDAExecutionProvider with I/O binding (onnxruntime-gpu). FP32, no CUDA graphs (see above)."""

    backend = "cuda"

    def __init__(self, onnx_path: Path, card: ModelCard, *, device_id: int = 0, max_batch: int = DEFAULT_MAX_BATCH):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("ONNX Runtime has no CUDAExecutionProvider (`pip install onnxruntime-gpu`)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.card = card
        self.path = Path(onnx_path)
        self.engine = "onnxruntime"
        self.precision = "fp32"
        self.profile = choose_profile(max_batch)
        self._device_id = device_id
        provider = ("CUDAExecutionProvider", {"device_id": str(device_id), "cudnn_conv_algo_search": "EXHAUSTIVE"})
        self._session = ort.InferenceSession(str(self.path), options, providers=[provider])
        if "CUDAExecutionProvider" not in self._session.get_providers():
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
            for start, stop in split_batches(len(crops), self.profile.max_batch):
                binding = self._session.io_binding()
                binding.bind_cpu_input(self._input, preprocess(crops[start:stop], self.card))
                binding.bind_output(self._output, "cuda", self._device_id)
                self._session.run_with_iobinding(binding)
                (raw,) = binding.copy_outputs_to_cpu()
                outs.append(np.asarray(raw).reshape(stop - start, -1))
        return to_p_fake(np.concatenate(outs), self.card)


def load_cuda_classifier(
    onnx_path: Path,
    card: ModelCard,
    *,
    engine: CudaEngine = "auto",
    has_onnxruntime_cuda: bool | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    precision: Literal["fp16", "fp32"] = "fp16",
) -> TorchCudaClassifier | OrtCudaClassifier:
    """The cuda backend: ONNX Runtime's CUDA provider if installed (engine "auto" or "onnxruntime"), else PyTorch."""
    if has_onnxruntime_cuda is None:
        import onnxruntime as ort

        has_onnxruntime_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if engine == "onnxruntime" or (engine == "auto" and has_onnxruntime_cuda):
        return OrtCudaClassifier(onnx_path, card, max_batch=max_batch)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the cuda backend needs onnxruntime-gpu or a CUDA build of PyTorch; neither is "
                                 "installed") from None
    return TorchCudaClassifier(onnx_path, card, device="cuda", precision=precision, max_batch=max_batch)
