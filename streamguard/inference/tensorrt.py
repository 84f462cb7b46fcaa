"""The `tensorrt` backend: engine build (FP16, INT8 with real-face calibration) and a Classifier that runs it.

Written against TensorRT 10's Python API (the ONNX parser, `IBuilderConfig`, one optimisation profile over the batch
axis, `build_serialized_network`; at run time `set_input_shape`, `set_tensor_address`, `execute_async_v3`) and
cuda-python's runtime bindings for memory, streams and CUDA graphs. Neither imports at module load: this file
imports anywhere, and says what is missing (`gpu.TENSORRT_MISSING`) when asked to do GPU work without them.

Run-time layout: device buffers for the input and output at the profile's max batch and pinned host mirrors,
allocated once; preprocessing writes straight into the pinned input. Small batches are padded into power-of-two
buckets (engine_cache.graph_batch_sizes), each with its own execution context and a CUDA graph that holds the whole
call (copy in, network, copy out): one launch per batch. All contexts share one block of activation memory
(USER_MANAGED allocation), which is safe because `predict` runs one batch at a time on one stream.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess, to_p_fake
from streamguard.inference.engine_cache import (
    DEFAULT_GRAPH_MAX_BATCH,
    Precision,
    Profile,
    graph_batch_sizes,
    plan_batch,
    split_batches,
)
from streamguard.inference.gpu import BackendUnavailable, import_cudart, import_tensorrt

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 4 << 30


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build the model; the message carries the parser's or builder's words."""


# -- cuda-python helpers -----------------------------------------------------------------------------------------------


def _check(cudart: Any, result: Any) -> Any:
    """cuda-python calls return (err, *values): raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _Buffer:
    """A device allocation and its pinned host mirror (viewed as a numpy array), both freed by `free()`."""

    def __init__(self, cudart: Any, shape: Sequence[int], dtype: np.dtype):
        self._cudart = cudart
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.device = int(_check(cudart, cudart.cudaMalloc(self.nbytes)))
        self.host_ptr = int(_check(cudart, cudart.cudaMallocHost(self.nbytes)))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)

    def row_bytes(self, rows: int) -> int:
        return rows * (self.nbytes // self.shape[0])

    def free(self) -> None:
        if self.device:
            self._cudart.cudaFree(self.device)
            self.device = 0
        if self.host_ptr:
            self.host = np.zeros(0, self.dtype)
            self._cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = 0


# -- building ----------------------------------------------------------------------------------------------------------


def build_serialized_engine(
    onnx_path: Path,
    card: ModelCard,
    profile: Profile,
    precision: Precision,
    *,
    calibration: Sequence[np.ndarray] | None = None,
    calibration_cache: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    verbose: bool = False,
) -> bytes:
    """Parse the ONNX file and build a serialized engine for `profile` at `precision`.

    INT8 uses TensorRT's entropy calibrator (implicit quantisation; deprecated since 10.1 in favour of Q/DQ nodes
    from NVIDIA's Model Optimizer, still supported) over `calibration` batches, all of one batch size, through a
    calibration profile fixed at that size; FP16 stays enabled so layers that do not quantise run in FP16.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode (EXPLICIT_BATCH is ignored)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes(), str(Path(onnx_path).resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors or 'no detail'}")
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path}: expected one input, found {network.num_inputs}")
    input_name = network.get_input(0).name
    p = card.preprocess

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile.shapes(p.input_size, p.layout))
    config.add_optimization_profile(opt_profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if not calibration:
            raise EngineBuildError("INT8 needs calibration batches of real face crops")
        cudart = import_cudart()
        batch = len(calibration[0])
        calib_profile = builder.create_optimization_profile()
        fixed = Profile(batch, batch, batch).shapes(p.input_size, p.layout)
        calib_profile.set_shape(input_name, *fixed)
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(calib_profile)
        calibrator = _make_calibrator(trt, cudart, calibration, calibration_cache)
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if precision == "int8":
        calibrator.free()
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine for {onnx_path} (see its log above)")
    return bytes(serialized)


def _make_calibrator(trt: Any, cudart: Any, batches: Sequence[np.ndarray], cache_path: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding `batches` (float32, the model's preprocessing) from one device buffer."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = [np.ascontiguousarray(b, np.float32) for b in batches]
            self._next = 0
            self._nbytes = self._batches[0].nbytes
            self._device = int(_check(cudart, cudart.cudaMalloc(self._nbytes)))

        def get_batch_size(self) -> int:  # deprecated with implicit batch; still abstract in the Python API
            return len(self._batches[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(self._batches):
                return None
            b = self._batches[self._next]
            self._next += 1
            _check(cudart, cudart.cudaMemcpy(self._device, b.ctypes.data, self._nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [self._device]

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and Path(cache_path).is_file():
                return Path(cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
                Path(cache_path).write_bytes(bytes(cache))

        def free(self) -> None:
            if self._device:
                cudart.cudaFree(self._device)
                self._device = 0

    return Calibrator()


# -- running -----------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _GraphExec:
    context: Any
    graph: Any
    exec: Any


class TensorRTClassifier:
    """A serialized TensorRT engine behind the Classifier protocol. `close()` frees the GPU memory."""

    backend = "tensorrt"

    def __init__(
        self,
        engine_path: Path,
        card: ModelCard,
        *,
        cuda_graphs: bool = True,
        graph_max_batch: int = DEFAULT_GRAPH_MAX_BATCH,
    ):
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self.card = card
        self.path = Path(engine_path)
        self._lock = threading.Lock()
        self._buffers: list[_Buffer] = []
        self._graphs: dict[int, _GraphExec] = {}
        self._scratch = 0
        self._stream = None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(f"TensorRT could not load {self.path} (built by another TensorRT version or for "
                                     "another GPU?): rebuild it with `streamguard engine build`")
        try:
            self._setup(cuda_graphs, graph_max_batch)
        except BaseException:
            self.close()
            raise

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def _setup(self, cuda_graphs: bool, graph_max_batch: int) -> None:
        trt, cudart, engine = self._trt, self._cudart, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise BackendUnavailable(f"{self.path}: expected one input and an output, found {inputs} / {outputs}")
        self._input, self._output, self._io_names = inputs[0], outputs[0], names
        lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(self._input, 0))
        self.profile = Profile(int(lo[0]), int(opt[0]), int(hi[0]))
        non_blocking = getattr(cudart, "cudaStreamNonBlocking", 1)  # a macro in cuda.h; 1 in every CUDA version
        self._stream = _check(cudart, cudart.cudaStreamCreateWithFlags(non_blocking))

        # Contexts share one activation block sized for the largest profile shape (TensorRT >= 10.0).
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        shared = strategy is not None and hasattr(strategy, "USER_MANAGED")
        if shared:
            v2 = hasattr(engine, "device_memory_size_v2")  # TensorRT >= 10.1
            size = int(engine.device_memory_size_v2 if v2 else engine.device_memory_size)
            self._scratch = int(_check(cudart, cudart.cudaMalloc(max(size, 1))))
            self._scratch_size = max(size, 1)

        def new_context() -> Any:
            ctx = engine.create_execution_context(*([strategy.USER_MANAGED] if shared else []))
            if ctx is None:
                raise BackendUnavailable("TensorRT could not create an execution context (GPU memory?)")
            if shared:
                if hasattr(ctx, "set_device_memory"):
                    ctx.set_device_memory(self._scratch, self._scratch_size)
                else:
                    ctx.device_memory = self._scratch
            return ctx

        self._context = new_context()
        self._set_shape(self._context, int(hi[0]))
        for name in names:  # buffers at the max batch, allocated once
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailable(f"{self.path}: output {name} has a data-dependent shape {shape}")
            buf = _Buffer(cudart, shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            self._buffers.append(buf)
        self._buf = dict(zip(names, self._buffers))
        self._bind(self._context)

        self.graph_sizes = graph_batch_sizes(self.profile, graph_max_batch) if cuda_graphs else ()
        for b in self.graph_sizes:
            try:
                self._graphs[b] = self._capture(new_context(), b)
            except RuntimeError as exc:  # e.g. a plugin that cannot be captured: eager from here on
                log.warning("tensorrt: CUDA graph capture failed at batch %d (%s); running without graphs", b, exc)
                self._graphs.clear()
                self.graph_sizes = ()
                break

    def _bind(self, ctx: Any) -> None:
        for name in self._io_names:
            if not ctx.set_tensor_address(name, self._buf[name].device):
                raise BackendUnavailable(f"TensorRT refused the address of tensor {name}")

    def _set_shape(self, ctx: Any, batch: int) -> None:
        shape = (batch, *tuple(self._engine.get_tensor_shape(self._input))[1:])
        if not ctx.set_input_shape(self._input, shape):
            raise RuntimeError(f"TensorRT refused input shape {shape} (profile {self.profile.tag})")

    def _enqueue(self, ctx: Any, batch: int) -> None:
        """Copy in, run, copy out: all asynchronous on the stream."""
        cudart = self._cudart
        inp, out = self._buf[self._input], self._buf[self._output]
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart, cudart.cudaMemcpyAsync(inp.device, inp.host_ptr, inp.row_bytes(batch), h2d, self._stream))
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart, cudart.cudaMemcpyAsync(out.host_ptr, out.device, out.row_bytes(batch), d2h, self._stream))

    def _capture(self, ctx: Any, batch: int) -> _GraphExec:
        cudart = self._cudart
        self._set_shape(ctx, batch)
        self._bind(ctx)
        # One plain run first: TensorRT finishes deferred work (shape-dependent setup) outside the capture.
        self._enqueue(ctx, batch)
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart, cudart.cudaStreamBeginCapture(self._stream, mode))
        try:
            self._enqueue(ctx, batch)
        finally:
            graph = _check(cudart, cudart.cudaStreamEndCapture(self._stream))
        graph_exec = _check(cudart, cudart.cudaGraphInstantiate(graph, 0))
        return _GraphExec(ctx, graph, graph_exec)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        cudart = self._cudart
        inp, out = self._buf[self._input], self._buf[self._output]
        results = []
        with self._lock:
            for start, stop in split_batches(len(crops), self.profile.max_batch):
                n = stop - start
                plan = plan_batch(n, self.graph_sizes, self.profile)
                np.copyto(inp.host[:n], preprocess(crops[start:stop], self.card), casting="same_kind")
                if plan.use_graph and plan.run_batch in self._graphs:
                    # Rows n..run_batch hold earlier crops: scored and thrown away (rows are independent).
                    _check(cudart, cudart.cudaGraphLaunch(self._graphs[plan.run_batch].exec, self._stream))
                else:
                    self._set_shape(self._context, plan.run_batch)
                    self._enqueue(self._context, plan.run_batch)
                _check(cudart, cudart.cudaStreamSynchronize(self._stream))
                results.append(np.array(out.host[:n], np.float32).reshape(n, -1))
        return to_p_fake(np.concatenate(results), self.card)

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for g in self._graphs.values():
            cudart.cudaGraphExecDestroy(g.exec)
            cudart.cudaGraphDestroy(g.graph)
        self._graphs.clear()
        for b in self._buffers:
            b.free()
        self._buffers.clear()
        if self._scratch:
            cudart.cudaFree(self._scratch)
            self._scratch = 0
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def engine_facts(trt_version: str, gpu_name: str, seconds: float, precision: Precision, onnx_path: Path) -> dict:
    """What the sidecar records beside the key: for people reading engines/cache/."""
    return {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
        "gpu": gpu_name,
        "tensorrt": trt_version,
        "precision": precision,
        "onnx": str(onnx_path),
    }
