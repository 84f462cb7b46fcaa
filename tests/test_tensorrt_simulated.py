"""The tensorrt backend against a simulated TensorRT and CUDA runtime (no GPU), and on a GPU against the real one.

The fakes follow the real APIs' signatures and return conventions, as read from cuda-python's bindings (12.9 and
13.x: every call returns a tuple whose first element is a `cudaError_t` enum, handles such as `cudaStream_t` are
objects that `int()` turns into the address) and TensorRT 10's Python bindings (`execute_async_v3(stream_handle: int)
-> bool`, `set_input_shape -> bool`, `set_device_memory(memory, size)`, `get_tensor_profile_shape(name, index)`,
`build_serialized_network -> IHostMemory | None`, calibrators driven through `get_batch(names)`). Device memory is
byte arrays, host memory real pinned ctypes buffers; stream capture records the enqueued copies and executions and
`cudaGraphLaunch` replays them; the engine's "network" is the per-row mean of its input. Where the real runtime
refuses something (a synchronize or a pageable copy inside a capture, an instantiate without `flags`), so do they.

They check what no CPU test could otherwise reach: buffers sized once at the profile's max, batches padded into
CUDA-graph buckets and captured with their copies, eager runs above the graphs, splitting above the profile, a
capture TensorRT cannot do (execute_async_v3 returns False) falling back to eager without leaks, the calibrator
protocol, TensorRT 11's strongly typed build, and that `close()` frees everything. They cannot check TensorRT itself:
the gpu tests do that where TensorRT is installed. `test_real_cuda_runtime_*` (gpu) runs the same classifier on the
real cuda-python runtime with a CuPy kernel standing in for TensorRT's network.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from streamguard.inference import tensorrt as trt_backend
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.classifier import preprocess
from streamguard.inference.engine_cache import Profile, calibration_batches
from streamguard.inference.gpu import BackendUnavailable

SIZE = 8
ROW = 3 * SIZE * SIZE


# ------------------------------------------------------------------ cuda-python's runtime, simulated


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """cudaStream_t / cudaGraph_t / cudaGraphExec_t: an object whose int() is the address."""

    def __init__(self, address: int, ops: list | None = None):
        self.address = address
        self.ops = ops

    def __int__(self) -> int:
        return self.address

    def getPtr(self) -> int:  # noqa: N802
        return self.address


OK = cudaError_t.cudaSuccess


class FakeCudart:
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self.device: dict[int, bytearray] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self.graphs: set[int] = set()  # live cudaGraph_t and cudaGraphExec_t
        self._next = 0x10000
        self.capturing: list | None = None
        self.invalidated = False
        self.last_error = OK
        self.launches = 0
        self.fail_malloc_after: int | None = None  # allocations that succeed before cudaMalloc runs out
        self.fail_memcpy = False
        self.fail_host_alloc = False

    def _address(self, n: int) -> int:
        self._next += 0x1000 + n
        return self._next

    def _fail(self, err: cudaError_t) -> tuple:
        self.last_error = err
        return (err,)

    def cudaGetErrorName(self, err):  # noqa: N802
        return OK, cudaError_t(err).name.encode()

    def cudaGetLastError(self):  # noqa: N802
        err, self.last_error = self.last_error, OK
        return (err,)

    def cudaMalloc(self, size):  # noqa: N802
        if self.fail_malloc_after is not None:
            if self.fail_malloc_after == 0:
                return cudaError_t.cudaErrorMemoryAllocation, None
            self.fail_malloc_after -= 1
        ptr = self._address(size)
        self.device[ptr] = bytearray(size)
        return OK, ptr

    def cudaMallocHost(self, size):  # noqa: N802
        if self.fail_host_alloc:
            return cudaError_t.cudaErrorMemoryAllocation, None
        buf = (ctypes.c_byte * size)()
        self.host[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def cudaFree(self, ptr):  # noqa: N802
        self.device.pop(ptr)
        return (OK,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.host.pop(ptr)
        return (OK,)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        assert flags == self.cudaStreamNonBlocking
        stream = _Handle(self._address(0))
        self.streams.add(stream.address)
        return OK, stream

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.remove(int(stream))
        return (OK,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert isinstance(stream, _Handle)
        if self.capturing is not None:  # illegal in a capture: the real runtime invalidates it
            self.invalidated = True
            return self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported)
        return (OK,)

    def _pinned(self, ptr: int, n: int) -> bool:
        return any(a <= ptr and ptr + n <= a + len(b) for a, b in self.host.items())

    def _do(self, op) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            self._run(op)

    def _run(self, op) -> None:
        if op[0] == "copy":
            _, dst, src, n, kind = op
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.device[dst][:n] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(self.device[src][:n]), n)
        else:
            op[1]()

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert isinstance(kind, cudaMemcpyKind) and isinstance(stream, _Handle)
        host = src if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        assert self._pinned(int(host), int(count)), "async copies (and graph memcpy nodes) need pinned host memory"
        self._do(("copy", int(dst), int(src), int(count), kind))
        return (OK,)

    def cudaMemcpy(self, dst, src, count, kind):  # noqa: N802
        if self.fail_memcpy:
            return self._fail(cudaError_t.cudaErrorInvalidValue)
        self._run(("copy", int(dst), int(src), int(count), kind))
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        assert isinstance(mode, cudaStreamCaptureMode) and self.capturing is None
        self.capturing, self.invalidated = [], False
        return (OK,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        ops, self.capturing = self.capturing, None
        if self.invalidated:
            self.last_error = cudaError_t.cudaErrorStreamCaptureInvalidated
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        graph = _Handle(self._address(0), ops)
        self.graphs.add(graph.address)
        return OK, graph

    def cudaGraphInstantiateWithFlags(self, graph, flags):  # noqa: N802
        assert isinstance(graph, _Handle) and flags == 0
        exe = _Handle(self._address(0), list(graph.ops))
        self.graphs.add(exe.address)
        return OK, exe

    def cudaGraphLaunch(self, graph_exec, stream):  # noqa: N802
        self.launches += 1
        for op in graph_exec.ops:
            self._run(op)
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec):  # noqa: N802
        self.graphs.remove(int(graph_exec))
        return (OK,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        self.graphs.remove(int(graph))
        return (OK,)


# ------------------------------------------------------------------ TensorRT's runtime, simulated


def simulated_network(ctx: FakeContext, stream_handle: int, batch: int) -> None:
    """The engine's 'network' on the simulated runtime: per-row mean, enqueued (or captured) on the stream."""
    cudart = ctx.engine.cudart

    def network():
        x = np.frombuffer(bytes(cudart.device[ctx.addresses["input"]][: batch * ROW * 4]), np.float32)
        y = x.reshape(batch, -1).mean(axis=1, dtype=np.float64).astype(np.float32)
        cudart.device[ctx.addresses["p_fake"]][: batch * 4] = y.tobytes()

    cudart._do(("exec", network))


class FakeRuntimeConfig:
    def __init__(self) -> None:
        self.strategy = None

    def set_execution_context_allocation_strategy(self, strategy):
        self.strategy = strategy


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine = engine
        self.strategy = strategy
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.eager_runs: list[int] = []

    def set_device_memory(self, memory, size):
        cudart = self.engine.cudart
        assert size >= self.engine.device_memory_size_v2
        assert cudart is None or memory in cudart.device
        self.device_memory = (memory, size)

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if name != "input" or not lo[0] <= shape[0] <= hi[0] or tuple(shape[1:]) != tuple(lo[1:]):
            return False
        self.shape = tuple(int(d) for d in shape)
        return True

    def get_tensor_shape(self, name):
        assert self.shape is not None
        return self.shape if name == "input" else (self.shape[0], 1)

    def set_tensor_address(self, name, memory):
        assert isinstance(memory, int)
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        assert type(stream_handle) is int, "TensorRT takes the stream as an integer address"
        assert self.strategy is None or self.device_memory is not None, "USER_MANAGED context without memory"
        cudart = self.engine.cudart
        if self.engine.fail_capture and cudart.capturing is not None:
            cudart.invalidated = True  # TensorRT returns False when the capture breaks inside it
            return False
        batch = self.shape[0]  # frozen now: a captured graph replays this batch
        self.eager_runs.append(batch)
        self.engine.network(self, stream_handle, batch)
        return True


class FakeEngine:
    num_io_tensors = 2
    device_memory_size_v2 = 4096

    def __init__(self, cudart, network, max_batch: int, fail_capture: bool = False):
        self.cudart = cudart
        self.network = network
        self.profile = [(1, 3, SIZE, SIZE), (min(16, max_batch), 3, SIZE, SIZE), (max_batch, 3, SIZE, SIZE)]
        self.fail_capture = fail_capture
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index):
        return ("input", "p_fake")[index]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name == "input" else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == "input" and profile_index == 0
        return self.profile

    def get_tensor_shape(self, name):
        return (-1, 3, SIZE, SIZE) if name == "input" else (-1, 1)

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self, strategy=None):
        if isinstance(strategy, FakeRuntimeConfig):
            strategy = strategy.strategy
        ctx = FakeContext(self, strategy)
        self.contexts.append(ctx)
        return ctx


class FakeEngineWithRuntimeConfig(FakeEngine):
    def create_runtime_config(self):
        return FakeRuntimeConfig()


class FakeTrt:
    __version__ = "10.7.0"

    class TensorIOMode(enum.IntEnum):
        INPUT = 1
        OUTPUT = 2

    class ExecutionContextAllocationStrategy(enum.IntEnum):
        STATIC = 0
        ON_PROFILE_CHANGE = 1
        USER_MANAGED = 2

    class Logger:
        VERBOSE = 0
        WARNING = 2

        def __init__(self, min_severity):
            self.min_severity = min_severity

    def __init__(self, cudart, network=simulated_network):
        self.cudart = cudart
        self.network = network

    @staticmethod
    def nptype(dtype):
        return np.float32

    def Runtime(self, logger):  # noqa: N802
        fake = self

        class Runtime:
            def deserialize_cuda_engine(self, serialized_engine: bytes):
                if serialized_engine == b"corrupt":
                    return None  # TensorRT logs why and returns None
                spec = json.loads(serialized_engine)
                cls = FakeEngineWithRuntimeConfig if spec.get("runtime_config") else FakeEngine
                return cls(fake.cudart, fake.network, spec["max_batch"], spec.get("fail_capture", False))

        return Runtime()


@pytest.fixture
def sim(monkeypatch):
    cudart = FakeCudart()
    trt = FakeTrt(cudart)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    return SimpleNamespace(cudart=cudart, trt=trt)


def _card() -> ModelCard:
    return ModelCard(name="sim", architecture="mean", source="test", output="p_fake",
                     preprocess=Preprocess(input_size=SIZE, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)))


def _engine(tmp_path: Path, max_batch: int = 64, **extra) -> Path:
    path = tmp_path / "sim.engine"
    path.write_bytes(json.dumps({"max_batch": max_batch, **extra}).encode())
    return path


def _expected(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    return np.clip(preprocess(crops, card).reshape(len(crops), -1).mean(axis=1), 0, 1).astype(np.float32)


def _crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _assert_all_freed(cudart: FakeCudart) -> None:
    assert cudart.device == {} and cudart.host == {} and cudart.streams == set() and cudart.graphs == set()


def test_buffers_once_graph_per_bucket_and_scores(sim, tmp_path: Path):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path), card)
    assert clf.profile == Profile(1, 16, 64)
    assert clf.graph_sizes == (1, 2, 4, 8, 16, 32)
    engine = clf._engine
    # One eager context + one per graph bucket, all USER_MANAGED on the shared activation block.
    assert len(engine.contexts) == 1 + 6
    assert {c.device_memory for c in engine.contexts} == {(clf._scratch, 4096)}
    assert {c.strategy for c in engine.contexts} == {FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED}
    assert [c.shape[0] for c in engine.contexts[1:]] == [1, 2, 4, 8, 16, 32]
    assert len(sim.cudart.graphs) == 2 * 6  # a graph and its executable per bucket
    # Device + pinned buffers for input and output at the profile's max batch: 4 allocations + scratch, no more.
    assert sorted(len(b) for b in sim.cudart.device.values()) == sorted([4096, 64 * ROW * 4, 64 * 4])
    assert sorted(len(b) for b in sim.cudart.host.values()) == sorted([64 * ROW * 4, 64 * 4])
    allocated = len(sim.cudart.device)

    crops = _crops(3)
    before = sim.cudart.launches
    got = clf.predict(crops)
    assert sim.cudart.launches == before + 1  # padded to the batch-4 graph: one launch
    np.testing.assert_allclose(got, _expected(crops, card), atol=1e-6)

    many = _crops(40, seed=1)
    launches = sim.cudart.launches
    got = clf.predict(many)
    assert sim.cudart.launches == launches and engine.contexts[0].eager_runs[-1] == 40  # eager at its exact size
    np.testing.assert_allclose(got, _expected(many, card), atol=1e-6)

    huge = _crops(100, seed=2)  # above the profile: 64 eager + 36 eager
    np.testing.assert_allclose(clf.predict(huge), _expected(huge, card), atol=1e-6)
    assert engine.contexts[0].eager_runs[-2:] == [64, 36]
    assert clf.predict(huge[:0]).shape == (0,)
    assert len(sim.cudart.device) == allocated  # nothing allocated per call

    for n in (1, 2, 5, 16, 17, 32):  # every bucket, padded rows never leak into results
        c = _crops(n, seed=10 + n)
        np.testing.assert_allclose(clf.predict(c), _expected(c, card), atol=1e-6)

    clf.close()
    _assert_all_freed(sim.cudart)
    assert clf._engine is None and clf._context is None  # contexts before engine before runtime
    clf.close()  # idempotent


def test_contexts_take_the_strategy_through_a_runtime_config_where_there_is_one(sim, tmp_path: Path):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path, max_batch=8, runtime_config=True), card)
    assert {c.strategy for c in clf._engine.contexts} == {FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED}
    crops = _crops(5)
    np.testing.assert_allclose(clf.predict(crops), _expected(crops, card), atol=1e-6)
    clf.close()
    _assert_all_freed(sim.cudart)


def test_a_graph_that_cannot_be_captured_runs_eagerly_without_leaks(sim, tmp_path: Path, caplog):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path, fail_capture=True), card)
    assert clf.graph_sizes == () and "CUDA graph capture failed" in caplog.text
    assert sim.cudart.graphs == set() and sim.cudart.capturing is None  # capture ended, nothing half-built kept
    assert sim.cudart.last_error == OK  # the invalidated capture's error was cleared
    crops = _crops(3)
    np.testing.assert_allclose(clf.predict(crops), _expected(crops, card), atol=1e-6)
    assert sim.cudart.launches == 0 and clf._engine.contexts[0].eager_runs[-1] == 3
    clf.close()
    _assert_all_freed(sim.cudart)


def test_graphs_off_and_a_small_profile(sim, tmp_path: Path):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path, max_batch=4), card, cuda_graphs=False)
    assert clf.graph_sizes == () and clf.profile == Profile(1, 4, 4)
    crops = _crops(9)
    np.testing.assert_allclose(clf.predict(crops), _expected(crops, card), atol=1e-6)
    assert clf._engine.contexts[0].eager_runs[-3:] == [4, 4, 1]
    clf.close()


def test_an_engine_tensorrt_cannot_load_says_rebuild(sim, tmp_path: Path):
    path = tmp_path / "bad.engine"
    path.write_bytes(b"corrupt")
    with pytest.raises(BackendUnavailable, match="streamguard engine build"):
        trt_backend.TensorRTClassifier(path, _card())


def test_a_cuda_error_names_itself_and_frees_what_was_allocated(sim, tmp_path: Path):
    sim.cudart.fail_malloc_after = 2  # scratch and the input buffer succeed, the output buffer does not
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation"):
        trt_backend.TensorRTClassifier(_engine(tmp_path), _card())
    _assert_all_freed(sim.cudart)
    sim.cudart.fail_malloc_after = None
    sim.cudart.fail_host_alloc = True  # device half allocated, pinned half refused
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation"):
        trt_backend.TensorRTClassifier(_engine(tmp_path), _card())
    _assert_all_freed(sim.cudart)


# ------------------------------------------------------------------ the builder, simulated


class FakeBuilderTrt(FakeTrt):
    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 2
        TF32 = 8

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class Config:
        def __init__(self):
            self.flags: set = set()
            self.profiles: list = []
            self.calibration_profile = None
            self.int8_calibrator = None
            self.pool: dict = {}

        def set_memory_pool_limit(self, pool, pool_size):
            self.pool[pool] = pool_size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile
            return True

    def __init__(self, cudart: FakeCudart, parse_ok: bool = True):
        super().__init__(cudart)
        self.parse_ok = parse_ok
        self.record: dict = {}

    def Builder(self, logger):  # noqa: N802
        fake = self

        class OptimizationProfile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, input, min, opt, max):  # noqa: A002 (TensorRT's argument names)
                self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

        class Network:
            num_inputs = 1

            def get_input(self, index):
                return SimpleNamespace(name="input")

        class Builder:
            def create_network(self, flags=0):
                fake.record["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return fake.Config()

            def create_optimization_profile(self):
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                fake.record["config"] = config
                calib = getattr(config, "int8_calibrator", None)
                if calib is not None:  # as TensorRT: the cache first, else batches until None, then the cache
                    fake.record["batch_size"] = calib.get_batch_size()
                    if calib.read_calibration_cache() is None:
                        shape = config.calibration_profile.shapes["input"][0]
                        n = int(np.prod(shape)) * 4
                        seen = []
                        while (ptrs := calib.get_batch(["input"])) is not None:
                            seen.append(np.frombuffer(bytes(fake.cudart.device[ptrs[0]][:n]), np.float32))
                        fake.record["calibration_seen"] = seen
                        calib.write_calibration_cache(memoryview(b"calibration-table"))
                return memoryview(b"serialized-engine")  # IHostMemory: a buffer, not bytes

        return Builder()

    def OnnxParser(self, network, logger):  # noqa: N802
        fake = self

        class Parser:
            num_errors = 0 if fake.parse_ok else 1

            def parse(self, model, path=None):
                fake.record["parsed"] = (bytes(model), path)
                return fake.parse_ok

            def get_error(self, index):
                return "In node 3 (Einsum): unsupported"

        return Parser()


class FakeBuilderTrt11(FakeBuilderTrt):
    """TensorRT 11: strongly typed only; the weak-typing flags and the calibrator API are gone."""

    __version__ = "11.4.0"

    class BuilderFlag(enum.IntEnum):
        TF32 = 8

    class Config(FakeBuilderTrt.Config):
        def __getattribute__(self, name):
            if name in ("int8_calibrator", "set_calibration_profile"):
                raise AttributeError(name)
            return super().__getattribute__(name)

    IInt8EntropyCalibrator2 = None  # type: ignore[assignment]


def _builder_sim(monkeypatch, trt) -> FakeBuilderTrt:
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: trt.cudart)
    return trt


@pytest.fixture
def builder_sim(monkeypatch):
    return _builder_sim(monkeypatch, FakeBuilderTrt(FakeCudart()))


@pytest.fixture
def onnx_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")
    return path


def test_fp16_build_sets_the_profile_and_flags(builder_sim, onnx_path: Path):
    data = trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "fp16",
                                               workspace_bytes=1 << 30)
    assert data == b"serialized-engine"
    cfg = builder_sim.record["config"]
    assert builder_sim.record["network_flags"] == 0  # TensorRT 10: explicit batch without EXPLICIT_BATCH
    assert builder_sim.record["parsed"] == (b"onnx", str(onnx_path.resolve()))  # the path finds external weights
    assert cfg.flags == {FakeBuilderTrt.BuilderFlag.FP16}
    assert cfg.pool == {FakeBuilderTrt.MemoryPoolType.WORKSPACE: 1 << 30}
    assert cfg.profiles[0].shapes["input"] == ((1, 3, SIZE, SIZE), (16, 3, SIZE, SIZE), (64, 3, SIZE, SIZE))
    assert cfg.int8_calibrator is None


def test_int8_build_feeds_every_calibration_batch_through_device_memory(builder_sim, onnx_path: Path, tmp_path):
    card = _card()
    batches = calibration_batches(_crops(10), card, 4)
    cache = tmp_path / "cache" / "m.calib"
    trt_backend.build_serialized_engine(onnx_path, card, Profile(1, 16, 64), "int8", calibration=batches,
                                        calibration_cache=cache)
    cfg = builder_sim.record["config"]
    assert cfg.flags == {FakeBuilderTrt.BuilderFlag.FP16, FakeBuilderTrt.BuilderFlag.INT8}
    assert cfg.calibration_profile.shapes["input"] == ((4, 3, SIZE, SIZE),) * 3  # fixed at the calibration batch
    assert builder_sim.record["batch_size"] == 1  # explicit batch: the batch is in the profile's shape
    seen = builder_sim.record["calibration_seen"]
    assert len(seen) == 3
    for got, want in zip(seen, batches, strict=False):
        np.testing.assert_array_equal(got, want.reshape(-1))
    assert cache.read_bytes() == b"calibration-table"
    assert builder_sim.cudart.device == {}  # the calibrator's buffer was freed

    builder_sim.record.clear()  # a second build reads the cache instead of calibrating again
    trt_backend.build_serialized_engine(onnx_path, card, Profile(1, 16, 64), "int8", calibration=batches,
                                        calibration_cache=cache)
    assert "calibration_seen" not in builder_sim.record
    with pytest.raises(trt_backend.EngineBuildError, match="calibration"):
        trt_backend.build_serialized_engine(onnx_path, card, Profile(1, 16, 64), "int8")


def test_a_calibration_error_is_not_swallowed(builder_sim, onnx_path: Path):
    """TensorRT turns an exception in get_batch into 'no more batches': the build must still fail loudly."""
    builder_sim.cudart.fail_memcpy = True
    batches = calibration_batches(_crops(4), _card(), 4)
    with pytest.raises(trt_backend.EngineBuildError, match="INT8 calibration failed.*cudaErrorInvalidValue"):
        trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 4, 4), "int8", calibration=batches)
    assert builder_sim.cudart.device == {}


def test_parser_errors_are_reported(builder_sim, onnx_path: Path):
    builder_sim.parse_ok = False
    with pytest.raises(trt_backend.EngineBuildError, match="Einsum"):
        trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 1, 1), "fp16")


def _fake_modelopt(monkeypatch, calls: list) -> None:
    autocast = ModuleType("modelopt.onnx.autocast")

    def convert_to_mixed_precision(*, onnx_path, low_precision_type, keep_io_types):
        calls.append((onnx_path, low_precision_type, keep_io_types))
        return SimpleNamespace(SerializeToString=lambda: b"onnx-fp16")

    autocast.convert_to_mixed_precision = convert_to_mixed_precision
    onnx_pkg = ModuleType("modelopt.onnx")
    onnx_pkg.autocast = autocast
    top = ModuleType("modelopt")
    top.onnx = onnx_pkg
    for name, mod in (("modelopt", top), ("modelopt.onnx", onnx_pkg), ("modelopt.onnx.autocast", autocast)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_tensorrt_11_builds_strongly_typed(monkeypatch, onnx_path: Path):
    trt = _builder_sim(monkeypatch, FakeBuilderTrt11(FakeCudart()))
    assert trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "fp32") == b"serialized-engine"
    assert trt.record["config"].flags == set() and trt.record["parsed"][0] == b"onnx"

    monkeypatch.setattr("streamguard.inference.gpu._has_module", lambda name: name != "modelopt")
    with pytest.raises(trt_backend.EngineBuildError, match="removed BuilderFlag.FP16.*Model Optimizer"):
        trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "fp16")
    with pytest.raises(trt_backend.EngineBuildError, match="removed INT8 calibration"):
        trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "int8",
                                            calibration=calibration_batches(_crops(4), _card(), 4))

    calls: list = []
    _fake_modelopt(monkeypatch, calls)
    monkeypatch.setattr("streamguard.inference.gpu._has_module", lambda name: True)
    trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "fp16")
    assert calls == [(str(onnx_path), "fp16", True)]  # FP16 inside, FP32 inputs and outputs
    assert trt.record["parsed"][0] == b"onnx-fp16" and trt.record["config"].flags == set()


# ------------------------------------------------------------------ on a GPU: the real cuda-python runtime

ROW_MEAN = r"""
extern "C" __global__ void row_mean(const float* x, float* y, int n, int row) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float s = 0.f;
        for (int j = 0; j < row; ++j) s += x[(long long)i * row + j];
        y[i] = s / row;
    }
}
"""


def cupy_network(cp):
    """The engine's 'network' as a CuPy kernel launched on the classifier's stream (captured like TensorRT's)."""
    kernel = cp.RawKernel(ROW_MEAN, "row_mean")
    views: dict[tuple[int, int], object] = {}

    def view(ptr: int, n: int):  # made on the plain run before each capture: no CUDA query inside one
        if (ptr, n) not in views:
            mem = cp.cuda.UnownedMemory(ptr, n * 4, owner=None)
            views[ptr, n] = cp.ndarray((n,), cp.float32, cp.cuda.MemoryPointer(mem, 0))
        return views[ptr, n]

    def run(ctx: FakeContext, stream_handle: int, batch: int) -> None:
        x = view(ctx.addresses["input"], 64 * ROW)
        y = view(ctx.addresses["p_fake"], 64)
        with cp.cuda.ExternalStream(stream_handle):
            kernel(((batch + 127) // 128,), (128,), (x, y, np.int32(batch), np.int32(ROW)))

    return run


class CountingCudart:
    """The real runtime module, with cudaGraphLaunch counted."""

    def __init__(self, cudart):
        self._cudart = cudart
        self.launches = 0

    def __getattr__(self, name):
        return getattr(self._cudart, name)

    def cudaGraphLaunch(self, graph_exec, stream):  # noqa: N802
        self.launches += 1
        return self._cudart.cudaGraphLaunch(graph_exec, stream)


@pytest.mark.gpu
def test_real_cuda_runtime_buffers_streams_and_graphs(monkeypatch, tmp_path: Path):
    """cuda-python's real calls and return conventions (allocations, pinned memory, async copies, stream capture,
    graph instantiate and launch, frees) with the network a CuPy kernel instead of TensorRT."""
    from streamguard.inference.gpu import import_cudart, probe_availability

    avail = probe_availability()
    if not avail.has_cuda_gpu:
        pytest.skip(f"needs an NVIDIA GPU: {avail.why_not('gpu')}")
    try:
        cudart = CountingCudart(import_cudart())
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    cp = pytest.importorskip("cupy")
    trt = FakeTrt(None, cupy_network(cp))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)

    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path), card)
    try:
        assert clf.graph_sizes == (1, 2, 4, 8, 16, 32)
        for n, launches in ((1, 1), (3, 1), (32, 1), (33, 0), (100, 0)):
            crops = _crops(n, seed=n)
            before = cudart.launches
            np.testing.assert_allclose(clf.predict(crops), _expected(crops, card), atol=1e-5)
            assert cudart.launches - before == launches, n
    finally:
        clf.close()
    assert clf._stream is None and clf._buffers == [] and clf._scratch == 0
