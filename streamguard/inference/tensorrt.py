"""The `tensorrt` backend: engine build (FP16, INT8 with real-face calibration) and a Classifier that runs it.

Written against TensorRT 10's Python API (the ONNX parser, `IBuilderConfig`, one optimisation profile over the batch
axis, `build_serialized_network`; at run time `set_input_shape`, `set_tensor_address`, `execute_async_v3`) and
cuda-python's runtime bindings for memory, streams and CUDA graphs. TensorRT 11 removed weak typing: there an FP32
build is unchanged, FP16 needs the model converted by NVIDIA Model Optimizer's AutoCast first, and implicit INT8
calibration is gone (gpu.tensorrt_precision_problem says so before any work). Neither TensorRT nor cuda-python
imports at module load: this file imports anywhere, and says what is missing when asked to do GPU work without them.

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
from streamguard.inference.gpu import (
    BackendUnavailable,
    import_cudart,
    import_tensorrt,
    tensorrt_major,
    tensorrt_precision_problem,
)

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 4 << 30


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build the model, or INT8 did not hold accuracy; the message says why."""


# -- cuda-python helpers -----------------------------------------------------------------------------------------------


def _check(cudart: Any, result: tuple) -> Any:
    """cuda-python calls return (cudaError_t, *values): raise on an error, return the value(s)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_name(cudart: Any, err: Any) -> str:
    name = cudart.cudaGetErrorName(err)[1]  # (cudaSuccess, b"cudaErrorMemoryAllocation")
    return name.decode() if isinstance(name, bytes) else str(name)


class _Buffer:
    """A device allocation and its pinned host mirror (viewed as a numpy array), both freed by `free()`.

    The host side must be pinned: a copy between pageable memory and the device cannot be captured in a CUDA graph.
    """

    def __init__(self, cudart: Any, shape: Sequence[int], dtype: np.dtype):
        self._cudart = cudart
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.host_ptr = 0
        self.device = int(_check(cudart, cudart.cudaMalloc(self.nbytes)))
        try:
            self.host_ptr = int(_check(cudart, cudart.cudaMallocHost(self.nbytes)))
        except BaseException:
            self.free()  # not yet in the classifier's list: free the device half here
            raise
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(memoryview(raw), dtype=self.dtype).reshape(self.shape)

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


_loggers: dict[tuple[int, bool], Any] = {}


def _trt_logger(trt: Any, verbose: bool = False) -> Any:
    """One trt.Logger per process (and verbosity): TensorRT warns when a builder or runtime is handed a logger that
    differs from the one it already has."""
    key = (id(trt), verbose)
    if key not in _loggers:
        _loggers[key] = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    return _loggers[key]


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

    TensorRT 10: FP16 sets BuilderFlag.FP16 on the FP32 graph (weak typing: TensorRT picks FP16 kernels per layer;
    deprecated since 10.12, still supported). INT8 uses the entropy calibrator (implicit quantisation, deprecated since
    10.1 in favour of Q/DQ nodes from NVIDIA's Model Optimizer) over `calibration` batches, all of one batch size,
    through a calibration profile fixed at that size; FP16 stays on so layers that do not quantise run in FP16.
    TensorRT 11: FP32 as is, FP16 through Model Optimizer's AutoCast, no INT8 (see the module doc).
    """
    trt = import_tensorrt()
    strongly_typed = tensorrt_major(str(trt.__version__)) >= 11
    problem = tensorrt_precision_problem(str(trt.__version__), precision)
    if problem:
        raise EngineBuildError(problem)
    logger = _trt_logger(trt, verbose)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TensorRT 10 (EXPLICIT_BATCH is deprecated and ignored): no flags.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    model = _onnx_for_build(Path(onnx_path), precision, strongly_typed)
    # The path lets the parser find weights stored beside the model (ONNX external data).
    if not parser.parse(model, str(Path(onnx_path).resolve())):
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
    if precision in ("fp16", "int8") and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        calibrator = _setup_int8(trt, builder, config, input_name, card, calibration, calibration_cache)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if calibrator is not None and calibrator.error:
        raise EngineBuildError(f"INT8 calibration failed: {calibrator.error}")
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine for {onnx_path} (see its log above)")
    return bytes(serialized)


def _onnx_for_build(onnx_path: Path, precision: Precision, strongly_typed: bool) -> bytes:
    """The model bytes to parse: the file, or on TensorRT 11 for FP16 its AutoCast mixed-precision conversion
    (FP16 inside, FP32 inputs and outputs: the migration guide's recipe for what BuilderFlag.FP16 used to do)."""
    if not (strongly_typed and precision == "fp16"):
        return onnx_path.read_bytes()
    from modelopt.onnx import autocast

    converted = autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                    keep_io_types=True)
    return converted.SerializeToString()


def _setup_int8(trt: Any, builder: Any, config: Any, input_name: str, card: ModelCard,
                calibration: Sequence[np.ndarray] | None, cache_path: Path | None) -> Any:
    if not calibration:
        raise EngineBuildError("INT8 needs calibration batches of real face crops")
    batch = len(calibration[0])
    p = card.preprocess
    calib_profile = builder.create_optimization_profile()
    calib_profile.set_shape(input_name, *Profile(batch, batch, batch).shapes(p.input_size, p.layout))
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_calibration_profile(calib_profile)
    calibrator = _make_calibrator(trt, import_cudart(), calibration, cache_path)
    config.int8_calibrator = calibrator
    return calibrator


def _make_calibrator(trt: Any, cudart: Any, batches: Sequence[np.ndarray], cache_path: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding `batches` (float32, the model's preprocessing) from one device buffer."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # required by pybind11 trampolines
            self._batches = [np.ascontiguousarray(b, np.float32) for b in batches]
            self._next = 0
            self._nbytes = self._batches[0].nbytes
            self._device = int(_check(cudart, cudart.cudaMalloc(self._nbytes)))
            self.error: str | None = None

        def get_batch_size(self) -> int:
            # Explicit batch: the batch is in the calibration profile's shape; 1 as in Polygraphy's calibrator.
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            # TensorRT swallows exceptions raised here and ends calibration early: keep the reason for the caller.
            try:
                if self._next >= len(self._batches):
                    return None
                b = self._batches[self._next]
                self._next += 1
                _check(cudart, cudart.cudaMemcpy(self._device, b.ctypes.data, self._nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                return [self._device]
            except Exception as exc:
                self.error = f"batch {self._next}: {exc}"
                log.error("INT8 calibration: %s", self.error)
                return None

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and Path(cache_path).is_file():
                return Path(cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:  # a memoryview of TensorRT's table
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
        self._scratch_size = 0
        self._stream: Any = None
        self._context: Any = None
        self._runtime = trt.Runtime(_trt_logger(trt))
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
        self._stream = _check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))

        # One activation block for every context, sized for the largest profile shape.
        self._shared = hasattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED")
        if self._shared:
            v2 = hasattr(engine, "device_memory_size_v2")  # TensorRT >= 10.1; device_memory_size is gone in 11
            self._scratch_size = max(int(engine.device_memory_size_v2 if v2 else engine.device_memory_size), 1)
            self._scratch = int(_check(cudart, cudart.cudaMalloc(self._scratch_size)))

        self._context = self._new_context()
        self._set_shape(self._context, int(hi[0]))
        for name in names:  # buffers at the max batch, allocated once
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailable(f"{self.path}: output {name} has a data-dependent shape {shape}")
            self._buffers.append(_Buffer(cudart, shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name)))))
        self._buf = dict(zip(names, self._buffers, strict=True))
        self._bind(self._context)

        self.graph_sizes = graph_batch_sizes(self.profile, graph_max_batch) if cuda_graphs else ()
        for b in self.graph_sizes:
            try:
                self._graphs[b] = self._capture(self._new_context(), b)
            except RuntimeError as exc:  # e.g. a layer or plugin that cannot be captured: eager from here on
                log.warning("tensorrt: CUDA graph capture failed at batch %d (%s); running without graphs", b, exc)
                self._destroy_graphs()
                self.graph_sizes = ()
                break

    def _new_context(self) -> Any:
        trt, engine = self._trt, self._engine
        if not self._shared:
            ctx = engine.create_execution_context()
        elif hasattr(engine, "create_runtime_config"):  # late 10.x and 11: the strategy lives in IRuntimeConfig
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx = engine.create_execution_context(config)
        else:
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendUnavailable("TensorRT could not create an execution context (GPU memory?)")
        if self._shared:
            setter = getattr(ctx, "set_device_memory_v2", None) or getattr(ctx, "set_device_memory", None)
            if setter is not None:  # (address, size): TensorRT >= 10.1
                setter(self._scratch, self._scratch_size)
            else:  # TensorRT 10.0: the address alone
                ctx.device_memory = self._scratch
        return ctx

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
        if not ctx.execute_async_v3(int(self._stream)):  # False also when the graph capture broke inside TensorRT
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart, cudart.cudaMemcpyAsync(out.host_ptr, out.device, out.row_bytes(batch), d2h, self._stream))

    def _capture(self, ctx: Any, batch: int) -> _GraphExec:
        cudart = self._cudart
        self._set_shape(ctx, batch)
        self._bind(ctx)
        # One plain run first: after a shape change enqueueV3 does setup work (allocations, syncs) that a capture
        # forbids; trtexec does the same before it captures (NVIDIA/TensorRT#2603).
        self._enqueue(ctx, batch)
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart, cudart.cudaStreamBeginCapture(self._stream, mode))
        try:
            self._enqueue(ctx, batch)
        except BaseException:
            self._abort_capture()
            raise
        graph = _check(cudart, cudart.cudaStreamEndCapture(self._stream))
        try:
            # cudaGraphInstantiateWithFlags(graph, flags) has the same signature in cuda-python 11.4 to 13, where
            # cudaGraphInstantiate changed from (graph, bufferSize) to (graph, flags) at CUDA 12.
            graph_exec = _check(cudart, cudart.cudaGraphInstantiateWithFlags(graph, 0))
        except BaseException:
            cudart.cudaGraphDestroy(graph)
            raise
        return _GraphExec(ctx, graph, graph_exec)

    def _abort_capture(self) -> None:
        """End a capture that failed (the stream must leave capture mode) and clear the error it left behind."""
        cudart = self._cudart
        err, *rest = cudart.cudaStreamEndCapture(self._stream)
        if err == cudart.cudaError_t.cudaSuccess and rest and rest[0] is not None:
            cudart.cudaGraphDestroy(rest[0])
        cudart.cudaGetLastError()  # an invalidated capture is reported once more by the next API call otherwise

    def _destroy_graphs(self) -> None:
        for g in self._graphs.values():
            self._cudart.cudaGraphExecDestroy(g.exec)
            self._cudart.cudaGraphDestroy(g.graph)
        self._graphs.clear()

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
        """Free graphs, buffers and the stream, then drop contexts before the engine and the engine before the
        runtime (the order TensorRT requires), so the engine's weights leave the GPU now, not at garbage collection."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        self._destroy_graphs()
        for b in self._buffers:
            b.free()
        self._buffers.clear()
        self._context = None
        if self._scratch:
            cudart.cudaFree(self._scratch)
            self._scratch = 0
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._engine = None
        self._runtime = None

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
