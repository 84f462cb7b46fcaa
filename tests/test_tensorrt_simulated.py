"""The tensorrt backend's control flow against a simulated TensorRT and CUDA runtime (no GPU anywhere).

The fakes implement the few calls the backend makes, with the documented shapes of their results: cuda-python's
`(err, value)` tuples, device memory as byte arrays, real pinned host memory, stream capture that records the
enqueued copies and executions and replays them on `cudaGraphLaunch`; a TensorRT engine whose "network" is the
per-row mean of its input, an optimisation profile that refuses shapes outside it, and a builder that drives the INT8
calibrator the way TensorRT does. They check what no CPU test could otherwise reach: buffers sized once at the
profile's max, batches padded into CUDA-graph buckets and captured with their copies, eager runs above the graphs,
splitting above the profile, the calibrator protocol, and that `close()` frees everything. They do not check the
real API names against TensorRT: the gpu tests do that on a GPU.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from streamguard.inference import tensorrt as trt_backend
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.classifier import preprocess
from streamguard.inference.engine_cache import Profile
from streamguard.inference.gpu import BackendUnavailable

SIZE = 8


class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeCudart:
    class cudaError_t:  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self.device: dict[int, bytearray] = {}
        self.host: dict[int, ctypes.Array] = {}
        self._next = 0x10000
        self.capturing: list | None = None
        self.launches = 0
        self.streams_destroyed = 0

    def cudaGetErrorName(self, err):  # noqa: N802
        return 0, b"cudaErrorFake"

    def cudaMalloc(self, n):  # noqa: N802
        self._next += 0x1000 + n
        self.device[self._next] = bytearray(n)
        return 0, self._next

    def cudaMallocHost(self, n):  # noqa: N802
        buf = (ctypes.c_byte * n)()
        self.host[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):  # noqa: N802
        self.device.pop(ptr)
        return (0,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.host.pop(ptr)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        return 0, FakeStream(7)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams_destroyed += 1
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert self.capturing is None, "synchronize inside a capture is illegal"
        return (0,)

    def _do(self, op) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            self._run(op)

    def _run(self, op) -> None:
        if op[0] == "copy":
            _, dst, src, n, kind = op
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.device[dst][:n] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(self.device[src][:n]), n)
        else:
            op[1]()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        self._do(("copy", int(dst), int(src), int(n), kind))
        return (0,)

    def cudaMemcpy(self, dst, src, n, kind):  # noqa: N802
        self._run(("copy", int(dst), int(src), int(n), kind))
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):  # noqa: N802
        self.launches += 1
        for op in graph_exec:
            self._run(op)
        return (0,)

    def cudaGraphExecDestroy(self, g):  # noqa: N802
        return (0,)

    def cudaGraphDestroy(self, g):  # noqa: N802
        return (0,)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine = engine
        self.strategy = strategy
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.device_memory = None
        self.eager_runs: list[int] = []

    def set_device_memory(self, ptr, size):
        self.device_memory = (ptr, size)

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if not lo[0] <= shape[0] <= hi[0] or tuple(shape[1:]) != tuple(lo[1:]):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        assert self.shape is not None
        return self.shape if name == "input" else (self.shape[0], 1)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        if self.engine.fail_capture and self.engine.cudart.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        batch = self.shape[0]  # frozen now: a captured graph replays this batch
        cudart = self.engine.cudart
        self.eager_runs.append(batch)

        def network():
            n = batch * 3 * SIZE * SIZE
            x = np.frombuffer(bytes(cudart.device[self.addresses["input"]][: n * 4]), np.float32)
            y = x.reshape(batch, -1).mean(axis=1, dtype=np.float64).astype(np.float32)
            cudart.device[self.addresses["p_fake"]][: batch * 4] = y.tobytes()

        cudart._do(("exec", network))
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, cudart: FakeCudart, max_batch: int, fail_capture: bool = False):
        self.cudart = cudart
        self.profile = [(1, 3, SIZE, SIZE), (min(16, max_batch), 3, SIZE, SIZE), (max_batch, 3, SIZE, SIZE)]
        self.fail_capture = fail_capture
        self.contexts: list[FakeContext] = []
        self.device_memory_size_v2 = 4096

    def get_tensor_name(self, i):
        return ("input", "p_fake")[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name == "input" else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile

    def get_tensor_shape(self, name):
        return (-1, 3, SIZE, SIZE) if name == "input" else (-1, 1)

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self, strategy=None):
        ctx = FakeContext(self, strategy)
        self.contexts.append(ctx)
        return ctx


class FakeTrt:
    class TensorIOMode:
        INPUT = 1
        OUTPUT = 2

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user_managed"

    class Logger:
        WARNING = 2
        VERBOSE = 0

        def __init__(self, severity):
            self.severity = severity

    def __init__(self, cudart: FakeCudart):
        self.cudart = cudart

    @staticmethod
    def nptype(dtype):
        return np.float32

    def Runtime(self, logger):  # noqa: N802
        cudart = self.cudart

        class Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                if data == b"corrupt":
                    return None
                spec = json.loads(data)
                return FakeEngine(cudart, spec["max_batch"], spec.get("fail_capture", False))

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


def test_buffers_once_graph_per_bucket_and_scores(sim, tmp_path: Path):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path), card)
    assert clf.profile == Profile(1, 16, 64)
    assert clf.graph_sizes == (1, 2, 4, 8, 16, 32)
    engine = clf._engine
    # One eager context + one per graph bucket, all on the shared activation block.
    assert len(engine.contexts) == 1 + 6
    assert {c.device_memory for c in engine.contexts} == {(clf._scratch, 4096)}
    assert all(c.strategy == "user_managed" for c in engine.contexts)
    assert [c.shape[0] for c in engine.contexts[1:]] == [1, 2, 4, 8, 16, 32]
    # Device + pinned buffers for input and output at the profile's max batch: 4 allocations + scratch, no more.
    sizes = sorted(len(b) for b in sim.cudart.device.values())
    assert sizes == sorted([4096, 64 * 3 * SIZE * SIZE * 4, 64 * 4])
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
    assert sim.cudart.device == {} and sim.cudart.host == {} and sim.cudart.streams_destroyed == 1
    clf.close()  # idempotent


def test_a_graph_that_cannot_be_captured_runs_eagerly(sim, tmp_path: Path, caplog):
    card = _card()
    clf = trt_backend.TensorRTClassifier(_engine(tmp_path, fail_capture=True), card)
    assert clf.graph_sizes == () and "CUDA graph capture failed" in caplog.text
    crops = _crops(3)
    np.testing.assert_allclose(clf.predict(crops), _expected(crops, card), atol=1e-6)
    assert sim.cudart.launches == 0 and clf._engine.contexts[0].eager_runs[-1] == 3
    clf.close()


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


# ------------------------------------------------------------------ the builder, simulated


class FakeBuilderTrt(FakeTrt):
    class BuilderFlag:
        FP16 = "fp16"
        INT8 = "int8"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    def __init__(self, cudart: FakeCudart, parse_ok: bool = True):
        super().__init__(cudart)
        self.parse_ok = parse_ok
        self.record: dict = {}

    def Builder(self, logger):  # noqa: N802
        fake = self

        class Profile_:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Config:
            def __init__(self):
                self.flags: set[str] = set()
                self.profiles: list = []
                self.calibration_profile = None
                self.int8_calibrator = None
                self.pool = {}

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def add_optimization_profile(self, p):
                self.profiles.append(p)

            def set_flag(self, flag):
                self.flags.add(flag)

            def set_calibration_profile(self, p):
                self.calibration_profile = p

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return SimpleNamespace(name="input")

        class Builder:
            def create_network(self, flags):
                fake.record["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile_()

            def build_serialized_network(self, network, config):
                fake.record["config"] = config
                calib = config.int8_calibrator
                if calib is not None:  # TensorRT pulls batches until None, then writes its cache
                    seen = []
                    while (ptrs := calib.get_batch(["input"])) is not None:
                        n = calib.get_batch_size() * 3 * SIZE * SIZE * 4
                        seen.append(np.frombuffer(bytes(fake.cudart.device[ptrs[0]][:n]), np.float32))
                    fake.record["calibration_seen"] = seen
                    calib.write_calibration_cache(b"calibration-table")
                return b"serialized-engine"

        return Builder()

    def OnnxParser(self, network, logger):  # noqa: N802
        ok = self.parse_ok

        class Parser:
            num_errors = 0 if ok else 1

            def parse(self, data, path=None):
                return ok

            def get_error(self, i):
                return "In node 3 (Einsum): unsupported"

        return Parser()


@pytest.fixture
def builder_sim(monkeypatch):
    cudart = FakeCudart()
    trt = FakeBuilderTrt(cudart)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    return trt


def test_fp16_build_sets_the_profile_and_flags(builder_sim, tmp_path: Path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    data = trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 16, 64), "fp16",
                                               workspace_bytes=1 << 30)
    assert data == b"serialized-engine"
    cfg = builder_sim.record["config"]
    assert builder_sim.record["network_flags"] == 0  # TensorRT 10: no EXPLICIT_BATCH flag
    assert cfg.flags == {"fp16"} and cfg.pool == {"workspace": 1 << 30}
    assert cfg.profiles[0].shapes["input"] == ((1, 3, SIZE, SIZE), (16, 3, SIZE, SIZE), (64, 3, SIZE, SIZE))
    assert cfg.int8_calibrator is None


def test_int8_build_feeds_every_calibration_batch_through_device_memory(builder_sim, tmp_path: Path):
    from streamguard.inference.engine_cache import calibration_batches

    card = _card()
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    batches = calibration_batches(_crops(10), card, 4)
    cache = tmp_path / "cache" / "m.calib"
    trt_backend.build_serialized_engine(onnx_path, card, Profile(1, 16, 64), "int8", calibration=batches,
                                        calibration_cache=cache)
    cfg = builder_sim.record["config"]
    assert cfg.flags == {"fp16", "int8"}
    assert cfg.calibration_profile.shapes["input"] == ((4, 3, SIZE, SIZE),) * 3  # fixed at the calibration batch
    seen = builder_sim.record["calibration_seen"]
    assert len(seen) == 3
    for got, want in zip(seen, batches):
        np.testing.assert_array_equal(got, want.reshape(-1))
    assert cache.read_bytes() == b"calibration-table"
    assert builder_sim.cudart.device == {}  # the calibrator's buffer was freed
    with pytest.raises(trt_backend.EngineBuildError, match="calibration"):
        trt_backend.build_serialized_engine(onnx_path, card, Profile(1, 16, 64), "int8")


def test_parser_errors_are_reported(builder_sim, tmp_path: Path):
    builder_sim.parse_ok = False
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    with pytest.raises(trt_backend.EngineBuildError, match="Einsum"):
        trt_backend.build_serialized_engine(onnx_path, _card(), Profile(1, 1, 1), "fp16")
