"""GPU backends: selection and fallback (any machine), the cuda backend's code (run on ONNX Runtime's CPU provider
against the CPU backend on real face crops), the FLOP counter, the GPU benchmark on the CPU, NVDEC names, and,
on a machine with an NVIDIA GPU, parity of each GPU backend with ONNX Runtime on the CPU (max |dP(fake)| <= 0.02,
same decisions at the card's threshold). GPU tests skip with the reason when the GPU or a runtime is missing.

For a GPU machine without mediapipe or ../shared: save real crops here with
`python tools/bench_gpu.py --save-crops crops.npy` and point STREAMGUARD_PARITY_CROPS at the file there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from streamguard.inference.backends import load_backend, select_backend, unavailable_reason
from streamguard.inference.card import ModelCard
from streamguard.inference.engine_cache import Profile, compare_scores
from streamguard.inference.flops import count_macs
from streamguard.inference.gpu import (
    TENSORRT_MISSING,
    Availability,
    BackendUnavailable,
    GpuInfo,
    probe_availability,
)
from streamguard.inference.models import ENGINES_DIR, resolve_model
from streamguard.inference.onnx import OnnxClassifier
from streamguard.ingest.nvdec import nvdec_codec_name, nvdec_decoder_name, probe_nvdec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MESO4 = ENGINES_DIR / "mesonet-meso4-df.onnx"
# Imported from ../shared by conftest.py into the session's engines folder: absent in a user's clone.
needs_meso4 = pytest.mark.skipif(not MESO4.is_file(),
                                 reason=f"needs {MESO4.name}, imported from ../shared/data/mesonet")
MESO_MODELS = sorted(ENGINES_DIR.glob("mesonet-*.onnx"))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
TOLERANCE = 0.02


# ------------------------------------------------------------------ selection and fallback, with fakes


class Fake:
    def __init__(self, backend: str, card: ModelCard):
        self.backend = backend
        self.card = card

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def predict(self, crops: np.ndarray) -> np.ndarray:
        return np.zeros(len(crops), np.float32)


def fake_loaders(fail: dict[str, str] | None = None):
    fail = fail or {}

    def make(name):
        def load(onnx_path, card, avail, opts, engines_dir):
            if name in fail:
                raise RuntimeError(fail[name])
            return Fake(name, card)

        return load

    return {n: make(n) for n in ("tensorrt", "cuda", "onnxruntime")}


NO_GPU = Availability(reasons={"gpu": "no CUDA GPU found: the NVIDIA driver library (libcuda.so.1) is not present",
                               "tensorrt": TENSORRT_MISSING})
GPU_ONLY_ORT = Availability(has_cuda_gpu=True, has_onnxruntime_cuda=True, gpu=H100,
                            reasons={"tensorrt": TENSORRT_MISSING})
GPU_FULL = Availability(has_cuda_gpu=True, has_tensorrt=True, has_cuda_python=True, has_onnxruntime_cuda=True,
                        gpu=H100, tensorrt_version="10.7.0")
GPU_BARE = Availability(has_cuda_gpu=True, gpu=H100, reasons={
    "tensorrt": TENSORRT_MISSING, "onnxruntime-cuda": "no CUDAExecutionProvider"})


def select(backend: str, avail: Availability, fail: dict[str, str] | None = None, **kw):
    # The loaders are fakes: any committed model will do.
    return select_backend(REPO / "engines" / "streamguard-sbi.onnx", backend, probe=avail,
                          loaders=fake_loaders(fail), **kw)


def test_auto_without_gpu_runs_on_cpu_and_is_not_degraded():
    sel = select("auto", NO_GPU)
    assert sel.backend == "onnxruntime" and not sel.degraded
    assert any("no CUDA GPU found" in n for n in sel.notes)


def test_auto_takes_tensorrt_first_then_cuda():
    assert select("auto", GPU_FULL).backend == "tensorrt"
    sel = select("auto", GPU_ONLY_ORT)
    assert sel.backend == "cuda" and not sel.degraded  # TensorRT absent by setup: a note, not a fault
    assert any("TensorRT is not installed" in n for n in sel.notes)


def test_auto_degrades_when_an_installed_backend_fails():
    sel = select("auto", GPU_FULL, fail={"tensorrt": "engine deserialization failed"})
    assert sel.backend == "cuda" and sel.degraded
    assert sel.warnings == ["tensorrt backend failed to load (engine deserialization failed); running on cuda"]
    sel = select("auto", GPU_FULL, fail={"tensorrt": "x", "cuda": "y"})
    assert sel.backend == "onnxruntime" and len(sel.warnings) == 2
    assert sel.warnings[1].endswith("running on onnxruntime (CPU)")


def test_auto_with_a_gpu_but_no_gpu_runtime_warns():
    sel = select("auto", GPU_BARE)
    assert sel.backend == "onnxruntime" and sel.degraded
    assert "NVIDIA H100 80GB HBM3 is present but no GPU backend can run" in sel.warnings[0]
    assert "TensorRT is not installed" in sel.warnings[0]


def test_configured_backend_falls_back_with_a_degraded_warning():
    sel = select("tensorrt", GPU_ONLY_ORT)
    assert sel.backend == "cuda"
    assert sel.warnings == [f"backend 'tensorrt' is configured but unavailable ({TENSORRT_MISSING}); running on cuda"]
    event = sel.degraded_event_data()
    assert event["requested"] == "tensorrt" and event["backend"] == "cuda" and "TensorRT" in event["reason"]

    sel = select("cuda", NO_GPU)
    assert sel.backend == "onnxruntime" and "no CUDA GPU found" in sel.warnings[0]
    assert sel.warnings[0].endswith("running on onnxruntime (CPU)")

    sel = select("tensorrt", GPU_FULL, fail={"tensorrt": "out of memory"})
    assert sel.backend == "cuda" and "failed to load: out of memory" in sel.warnings[0]


def test_configured_backend_that_loads_is_not_degraded():
    for name in ("tensorrt", "cuda", "onnxruntime"):
        sel = select(name, GPU_FULL)
        assert sel.backend == name and not sel.degraded


def test_strict_raises_instead_of_falling_back():
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        select("tensorrt", GPU_ONLY_ORT, strict=True)
    with pytest.raises(ValueError, match="unknown backend"):
        select("tpu", GPU_FULL)


def test_when_even_the_cpu_backend_fails_its_error_surfaces():
    with pytest.raises(RuntimeError, match="corrupt model"):
        select("auto", NO_GPU, fail={"onnxruntime": "corrupt model"})


def test_unavailable_reasons():
    assert unavailable_reason("onnxruntime", NO_GPU) is None
    assert "no CUDA GPU" in unavailable_reason("tensorrt", NO_GPU)
    assert unavailable_reason("tensorrt", GPU_ONLY_ORT) == TENSORRT_MISSING
    assert unavailable_reason("cuda", GPU_ONLY_ORT) is None
    assert unavailable_reason("cuda", GPU_BARE) == "the cuda backend needs onnxruntime-gpu: no CUDAExecutionProvider"


@needs_meso4
def test_real_loaders_on_this_machine():
    """The real probe and loaders: on a CPU-only machine a configured GPU backend degrades to ONNX Runtime."""
    avail = probe_availability()
    if avail.has_cuda_gpu:
        pytest.skip("this machine has a GPU: covered by the gpu tests")
    classifier, warnings = load_backend(MESO4, "tensorrt", max_batch=8)
    assert isinstance(classifier, OnnxClassifier)
    assert len(warnings) == 1 and "no CUDA GPU found" in warnings[0]
    classifier, warnings = load_backend(MESO4, "auto")
    assert classifier.backend == "onnxruntime" and warnings == []


def test_service_runs_the_cpu_model_on_the_configured_threads(tmp_path: Path):
    """batcher.cpu_threads and cpu_call_batch reach the ONNX Runtime classifier (1 thread and calls of 4 faces by
    default: the least CPU per face, see the README's benchmarks), and a bad value is refused naming the field."""
    import asyncio

    from pydantic import ValidationError

    from streamguard.config import ServiceConfig
    from streamguard.service import Service

    cases = (({}, 1, 4), ({"batcher": {"cpu_threads": 2, "cpu_call_batch": 16}}, 2, 16))
    for settings, threads, call_batch in cases:
        service = Service(ServiceConfig(data_dir=tmp_path, backend="onnxruntime", **settings))  # type: ignore[arg-type]
        assert asyncio.run(service._load_classifier()) is None
        assert isinstance(service.classifier, OnnxClassifier)
        assert (service.classifier.threads, service.classifier.call_batch) == (threads, call_batch)
    for field in ("cpu_threads", "cpu_call_batch"):
        with pytest.raises(ValidationError, match=field):
            ServiceConfig(data_dir=tmp_path, batcher={field: 0})  # type: ignore[arg-type]


@needs_meso4
def test_tensorrt_classifier_without_tensorrt_says_how_to_get_it(tmp_path: Path):
    from streamguard.inference.tensorrt import TensorRTClassifier, build_serialized_engine

    if probe_availability().has_tensorrt:
        pytest.skip("TensorRT is installed here")
    _, card = resolve_model(str(MESO4))
    with pytest.raises(BackendUnavailable) as exc:
        TensorRTClassifier(tmp_path / "x.engine", card)
    assert str(exc.value) == TENSORRT_MISSING
    with pytest.raises(BackendUnavailable):
        build_serialized_engine(MESO4, card, Profile(1, 1, 1), "fp16")


# ------------------------------------------------------------------ real face crops


def _aligned_crops(size: int) -> list[np.ndarray]:
    folder = SHARED / "mesonet" / "test_images"
    out = []
    for p in sorted(folder.rglob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        out.append(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA))
    return out


@pytest.fixture(scope="module")
def real_crops() -> np.ndarray:
    """Real face crops at 256 px: the env's .npy if given, else FaceAnalyzer over ../shared real photos (cut as the
    service cuts them, at MesoNet's margin) plus MesoNet's 4 aligned test crops."""
    given = os.environ.get("STREAMGUARD_PARITY_CROPS")
    if given:
        return np.load(given)
    if not (SHARED / "real_faces").is_dir():
        pytest.skip(f"needs real face photos in {SHARED / 'real_faces'} (or STREAMGUARD_PARITY_CROPS)")
    from streamguard.inference.calibration import face_crops

    _, card = resolve_model(str(MESO4))
    photos = sorted((SHARED / "real_faces").glob("img*.jpg"))[:20] + [SHARED / "real_faces" / "couple.jpg"]
    crops = list(face_crops(photos, card)) + _aligned_crops(256)
    return np.stack(crops)


# ------------------------------------------------------------------ the cuda backend's code, on ORT's CPU provider


def _graph(nodes, inits, out_shape=None, opset=17, in_shape=("N", 3, 9, 9)) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


RNG = np.random.default_rng(0)


@pytest.mark.shared
@pytest.mark.parametrize("onnx_path", MESO_MODELS, ids=lambda p: p.stem)
def test_cuda_classifier_code_matches_onnxruntime_on_real_faces(onnx_path: Path, real_crops: np.ndarray):
    """The cuda backend's I/O binding and batching, run on the CPU provider: the CPU backend's scores exactly."""
    from streamguard.inference.cuda import OrtCudaClassifier

    _, card = resolve_model(str(onnx_path))
    ref = OnnxClassifier(onnx_path, card).predict(real_crops)
    got = OrtCudaClassifier(onnx_path, card, device="cpu", max_batch=8).predict(real_crops)
    report = compare_scores(ref, got, card.threshold, tolerance=1e-4)
    assert report.ok, report.summary()


@needs_meso4
def test_cuda_classifier_splits_batches_larger_than_its_profile_and_closes():
    from streamguard.inference.cuda import OrtCudaClassifier

    _, card = resolve_model(str(MESO4))
    crops = RNG.integers(0, 256, (11, 256, 256, 3), dtype=np.uint8)
    clf = OrtCudaClassifier(MESO4, card, device="cpu", max_batch=4)
    assert clf.profile.max_batch == 4 and clf.backend == "cuda"
    got = clf.predict(crops)
    np.testing.assert_allclose(got, OnnxClassifier(MESO4, card).predict(crops), atol=1e-5)
    assert clf.predict(crops[:0]).shape == (0,)
    with pytest.raises(ValueError):
        clf.predict(crops[:, :100])
    clf.close()
    with pytest.raises(RuntimeError, match="closed"):
        clf.predict(crops[:1])


def test_cuda_backend_without_onnxruntime_gpu_says_how_to_get_it():
    import onnxruntime as ort

    from streamguard.inference.cuda import load_cuda_classifier

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    _, card = resolve_model(None)
    with pytest.raises(BackendUnavailable, match="pip install onnxruntime-gpu"):
        load_cuda_classifier(REPO / "engines" / "streamguard-sbi.onnx", card)


# ------------------------------------------------------------------ FLOPs and the benchmark


def test_flop_count_matches_a_hand_count():
    """Conv 3->8, 3x3, stride 1, pad 1 on 16x16, then Conv 8->4 1x1 stride 2, then Gemm 256->10, MatMul 10x3."""
    w1 = np.zeros((8, 3, 3, 3), np.float32)
    w2 = np.zeros((4, 8, 1, 1), np.float32)
    fc = np.zeros((10, 256), np.float32)
    mm = np.zeros((10, 3), np.float32)
    m = _graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "mm"], ["y"]),
    ], {"w1": w1, "w2": w2, "fc": fc, "mm": mm}, in_shape=("N", 3, 16, 16))
    count = count_macs(m)
    conv1 = 16 * 16 * 8 * 3 * 3 * 3  # out pixels x Cout x (Cin x k x k)
    conv2 = 8 * 8 * 4 * 8
    assert count.by_op == {"Conv": conv1 + conv2, "Gemm": 256 * 10, "MatMul": 10 * 3}
    assert count.macs == conv1 + conv2 + 2560 + 30 and count.flops == 2 * count.macs


@needs_meso4
def test_flop_count_of_meso4():
    # 256x256x8x(3x3x3) + 128x128x8x(8x5x5) + 64x64x16x(8x5x5) + 32x32x16x(16x5x5); Dense 1024x16 + 16x1
    convs = 256 * 256 * 8 * 27 + 128 * 128 * 8 * 200 + 64 * 64 * 16 * 200 + 32 * 32 * 16 * 400
    count = count_macs(MESO4)
    assert count.by_op == {"Conv": convs, "Gemm": 1024 * 16 + 16}


@pytest.mark.slow
@needs_meso4
def test_bench_gpu_runs_on_the_cpu(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_gpu.py"), str(MESO4), "--backend", "onnxruntime",
         "--batches", "1", "2", "4", "--runs", "3", "--warmup", "1", "--peak-seconds", "0.2",
         "--budget-ms", "100000", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "onnxruntime" and result["device"].startswith("CPU")
    assert [r["batch"] for r in result["results"]] == [1, 2, 4]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 and r["faces_per_s"] > 0 for r in result["results"])
    assert result["gflops_per_face"] == pytest.approx(0.1201, abs=1e-3)
    summary = result["summary"]
    assert summary["best_batch"] in (1, 2, 4) and summary["participants"] >= 1
    assert result["peak"]["tflops"] > 0 and summary["floor"]["max_faces_per_s"] > 0
    assert "capacity:" in proc.stdout and "floor:" in proc.stdout


# ------------------------------------------------------------------ NVDEC


def test_nvdec_names():
    assert nvdec_codec_name("h264") == "h264_cuvid"
    assert nvdec_codec_name("HEVC") == "hevc_cuvid"
    assert nvdec_codec_name("av1") == "av1_cuvid"
    assert nvdec_codec_name("mpeg2video") == "mpeg2_cuvid"
    assert nvdec_codec_name("prores") is None
    assert nvdec_decoder_name("h264", available={"h264", "h264_cuvid"}) == "h264_cuvid"
    assert nvdec_decoder_name("h264", available={"h264"}) is None  # FFmpeg built without NVDEC
    assert nvdec_decoder_name("rawvideo", available={"rawvideo"}) is None


@needs_meso4
def test_nvdec_probe_without_a_gpu_says_why():
    if probe_availability().has_cuda_gpu:
        pytest.skip("this machine has a GPU")
    status = probe_nvdec("h264")
    assert not status.usable and status.reason
    assert not probe_nvdec("prores").usable
    from streamguard.ingest.nvdec import nvdec_hwaccel

    assert nvdec_hwaccel() is None  # av.open would raise with a CUDA hwaccel and no GPU


# ------------------------------------------------------------------ on a GPU: parity with ONNX Runtime on the CPU


@pytest.fixture(scope="module")
def gpu() -> Availability:
    avail = probe_availability()
    if not avail.has_cuda_gpu:
        pytest.skip(f"needs an NVIDIA GPU: {avail.why_not('gpu')}")
    return avail


def _parity(clf, real_crops: np.ndarray) -> None:
    _, card = resolve_model(str(MESO4))
    ref = OnnxClassifier(MESO4, card).predict(real_crops)
    got = clf.predict(real_crops)
    report = compare_scores(ref, got, card.threshold, TOLERANCE)
    print(f"{type(clf).__name__} on {len(real_crops)} real crops: {report.summary()}")
    assert report.ok, report.summary()
    # Batches padded into CUDA-graph buckets score like single crops.
    one_by_one = np.concatenate([clf.predict(real_crops[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(clf.predict(real_crops[:5]), one_by_one, atol=2e-3)


@pytest.mark.gpu
@needs_meso4
def test_onnxruntime_cuda_parity(gpu: Availability, real_crops: np.ndarray):
    if not gpu.has_onnxruntime_cuda:
        pytest.skip(gpu.why_not("onnxruntime-cuda"))
    from streamguard.inference.cuda import OrtCudaClassifier

    _, card = resolve_model(str(MESO4))
    _parity(OrtCudaClassifier(MESO4, card), real_crops)


@pytest.mark.gpu
@pytest.mark.slow
@needs_meso4
def test_tensorrt_fp16_engine_build_cache_and_parity(gpu: Availability, real_crops: np.ndarray, tmp_path: Path):
    if not (gpu.has_tensorrt and gpu.has_cuda_python):
        pytest.skip(gpu.why_not("tensorrt") if not gpu.has_tensorrt else gpu.why_not("cuda-python"))
    from streamguard.inference.engine_build import build_engine
    from streamguard.inference.tensorrt import TensorRTClassifier

    built = build_engine(MESO4, precision="fp16", max_batch=64, cache_dir=tmp_path, availability=gpu)
    assert built.built and built.path.is_file()
    assert not build_engine(MESO4, precision="fp16", max_batch=64, cache_dir=tmp_path, availability=gpu).built
    _, card = resolve_model(str(MESO4))
    clf = TensorRTClassifier(built.path, card)
    try:
        assert clf.profile.max_batch == 64
        _parity(clf, real_crops)
        big = np.concatenate([real_crops] * (70 // len(real_crops) + 1))[:70]  # above the profile: split in two
        assert clf.predict(big).shape == (70,)
    finally:
        clf.close()


@pytest.mark.gpu
@needs_meso4
def test_auto_picks_a_gpu_backend(gpu: Availability):
    if not (gpu.has_onnxruntime_cuda or gpu.has_tensorrt):
        pytest.skip("no GPU runtime installed")
    classifier, warnings = load_backend(MESO4, "auto", max_batch=16)
    assert classifier.backend in ("tensorrt", "cuda"), warnings
