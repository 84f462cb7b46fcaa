"""What this machine can run on a GPU, found without importing anything heavy, and the errors that say what is missing.

The probe asks the NVIDIA driver directly (libcuda through ctypes: cuInit, cuDeviceGetCount, cuDeviceGetName,
compute capability attributes), so it answers on any machine with a driver, whether or not cuda-python, PyTorch or
TensorRT are installed; then it looks for each runtime the GPU backends use. Nothing is cached here: the caller
probes once at start and passes the result on.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType

TENSORRT_MISSING = (
    "TensorRT is not installed: install NVIDIA's tensorrt wheels from NVIDIA's index "
    "(`pip install 'tensorrt-cu12<11' cuda-python`, or tensorrt-cu13 for a CUDA 13 driver; see engines/BUILD.md), "
    "or use the GPU image"
)
CUDA_PYTHON_MISSING = (
    "cuda-python is not installed (NVIDIA's CUDA bindings, which the tensorrt backend allocates and copies with): "
    "`pip install cuda-python`, or use the GPU image"
)
NO_GPU = "no CUDA GPU found"


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says what is missing and how to get it."""


# CUdevice_attribute values (cuda.h): stable since CUDA 2.x.
_CC_MAJOR = 75
_CC_MINOR = 76


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    index: int = 0

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True, slots=True)
class Availability:
    """What the GPU backends could use here. Tests build one by hand; `probe_availability()` reads the machine."""

    has_cuda_gpu: bool = False
    has_tensorrt: bool = False
    has_cuda_python: bool = False
    has_onnxruntime_cuda: bool = False
    gpu: GpuInfo | None = None
    tensorrt_version: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # component -> why it is missing

    def why_not(self, component: str) -> str:
        return self.reasons.get(component, f"{component} unavailable")

    def describe(self) -> str:
        gpu = f"{self.gpu.name} ({self.gpu.sm})" if self.gpu else f"none ({self.why_not('gpu')})"
        parts = [f"GPU: {gpu}",
                 f"TensorRT: {self.tensorrt_version or 'no'}",
                 f"cuda-python: {'yes' if self.has_cuda_python else 'no'}",
                 f"ONNX Runtime CUDA: {'yes' if self.has_onnxruntime_cuda else 'no'}"]
        return ", ".join(parts)


def driver_gpus(libcuda: str = "libcuda.so.1") -> tuple[list[GpuInfo], str | None]:
    """GPUs the NVIDIA driver reports, or ([], why not). Uses only the driver API through ctypes."""
    try:
        cu = ctypes.CDLL(libcuda)
    except OSError:
        return [], f"{NO_GPU}: the NVIDIA driver library ({libcuda}) is not present"
    try:
        rc = cu.cuInit(0)
        if rc != 0:
            return [], f"{NO_GPU}: cuInit failed with CUDA error {rc} (no device, or the driver is unusable)"
        count = ctypes.c_int(0)
        if cu.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
            return [], f"{NO_GPU}: the driver reports no device"
        gpus = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            cu.cuDeviceGet(ctypes.byref(dev), i)
            name = ctypes.create_string_buffer(256)
            cu.cuDeviceGetName(name, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            cu.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
            cu.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
            gpus.append(GpuInfo(name.value.decode(errors="replace"), (major.value, minor.value), i))
        return gpus, None
    except (AttributeError, OSError) as exc:  # an odd libcuda without these symbols
        return [], f"{NO_GPU}: driver query failed ({exc})"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def probe_availability(device_index: int = 0) -> Availability:
    """Read the machine: the GPU from the driver, then TensorRT, cuda-python, ONNX Runtime's CUDA provider, PyTorch."""
    reasons: dict[str, str] = {}
    gpus, why = driver_gpus()
    gpu = next((g for g in gpus if g.index == device_index), None)
    if gpu is None:
        reasons["gpu"] = why or f"{NO_GPU}: no device {device_index}"

    trt_version = None
    if _has_module("tensorrt"):
        try:
            trt_version = str(importlib.import_module("tensorrt").__version__)
        except Exception as exc:  # installed but broken (missing libnvinfer): say so
            reasons["tensorrt"] = f"TensorRT is installed but does not import: {exc}"
    else:
        reasons["tensorrt"] = TENSORRT_MISSING

    has_cuda_python = _has_module("cuda.bindings") or _has_module("cuda.cudart")
    if not has_cuda_python:
        reasons["cuda-python"] = CUDA_PYTHON_MISSING

    has_ort_cuda = False
    try:
        import onnxruntime as ort

        has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if not has_ort_cuda:
            reasons["onnxruntime-cuda"] = ("ONNX Runtime has no CUDAExecutionProvider (the CPU package is installed; "
                                           "`pip install onnxruntime-gpu` instead)")
    except ImportError as exc:
        reasons["onnxruntime-cuda"] = f"ONNX Runtime does not import: {exc}"

    return Availability(
        has_cuda_gpu=gpu is not None,
        has_tensorrt=trt_version is not None,
        has_cuda_python=has_cuda_python,
        has_onnxruntime_cuda=has_ort_cuda,
        gpu=gpu,
        tensorrt_version=trt_version,
        reasons=reasons,
    )


def import_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        if _has_module("tensorrt"):
            raise BackendUnavailable(f"TensorRT is installed but does not import: {exc}") from exc
        raise BackendUnavailable(TENSORRT_MISSING) from None


def import_cudart() -> ModuleType:
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6), or the older `cuda.cudart`
    (`from cuda import cudart`, removed in cuda-python 13). Both return (cudaError_t, *values) from every call."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(CUDA_PYTHON_MISSING)


def precision_problem(precision: str, compute_capability: tuple[int, int]) -> str | None:
    """Why a precision cannot run fast on this GPU, or None. FP16 tensor cores: sm70+; INT8 (DP4A/IMMA): sm61+.
    (TensorRT 10.5 deprecated platform_has_fast_fp16/int8 in favour of asking CUDA, which is this.)"""
    sm = f"sm{compute_capability[0]}{compute_capability[1]}"
    if precision == "fp16" and compute_capability < (5, 3):
        return f"FP16 needs compute capability 5.3 or later, this GPU is {sm}"
    if precision == "int8" and compute_capability < (6, 1):
        return f"INT8 needs compute capability 6.1 or later, this GPU is {sm}"
    return None


def tensorrt_major(version: str) -> int:
    """10 for "10.7.0.23"; 0 when unreadable."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def tensorrt_precision_problem(version: str, precision: str, has_modelopt: bool | None = None) -> str | None:
    """Why this TensorRT cannot build `precision` the way engine_build does, or None.

    TensorRT 11 removed weak typing: BuilderFlag.FP16/INT8, IBuilderConfig.int8_calibrator and the calibration
    profile (NVIDIA's 10.x -> 11.x migration guide). FP16 then needs the ONNX model converted to mixed precision by
    NVIDIA Model Optimizer's AutoCast before the build; implicit INT8 calibration has no replacement here.
    """
    if tensorrt_major(version) < 11:
        return None
    if precision == "int8":
        return (f"TensorRT {version} removed INT8 calibration (BuilderFlag.INT8, IInt8EntropyCalibrator2): build INT8 "
                "with TensorRT 10 (`pip install 'tensorrt-cu12<11'`), or quantise the model (Q/DQ nodes) and build "
                "that as fp32")
    if precision == "fp16" and not (_has_module("modelopt") if has_modelopt is None else has_modelopt):
        return (f"TensorRT {version} removed BuilderFlag.FP16 (networks are strongly typed): install NVIDIA Model "
                "Optimizer (`pip install nvidia-modelopt[onnx]`), whose AutoCast converts the model to FP16 before "
                "the build, or use TensorRT 10 (`pip install 'tensorrt-cu12<11'`), or build fp32")
    return None
