"""`streamguard triton layout`: a Triton model repository from a model in engines/ (and its TensorRT plans).

    OUT/<name>/config.pbtxt            ONNX Runtime backend, one GPU instance (the default config)
    OUT/<name>/configs/cpu.pbtxt       the same on CPU instances: `tritonserver --model-config-name=cpu`
    OUT/<name>/1/model.onnx
    OUT/<name>-tensorrt/config.pbtxt   with --tensorrt: the plan `streamguard engine build` cached for this ONNX
    OUT/<name>-tensorrt/1/model.plan

`--runtime python` writes a Python-backend model instead (model.py running ONNX Runtime on the CPU) for Triton
builds without the onnxruntime backend, such as nvidia-pytriton's bundled server that the tests run.

Every config carries the model card as the parameter `streamguard_card` (its sha256 set to the ONNX file's), which
the triton backend reads from the server: the card comes with the model. Only the model's first output (P(fake)
or what the card says it is) is served; input dims come from the ONNX graph and must agree with the card.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from streamguard.inference.card import ModelCard
from streamguard.inference.models import ENGINES_DIR, file_sha256, resolve_model
from streamguard.inference.triton import CARD_PARAMETER

Runtime = Literal["onnxruntime", "python"]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "python")
PYTHON_MODEL = Path(__file__).with_name("triton_python") / "model.py"
LATENCY_BUDGET_MS = 250.0  # sample to score (README): Triton's queue may take a small part of it


class LayoutError(ValueError):
    """The model, a plan or an option cannot make a repository; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # without the batch axis
    reshape_scalar: bool = False  # an (N,) output: Triton needs dims [1] and a reshape to []


@dataclass(frozen=True, slots=True)
class LayoutOptions:
    runtime: Runtime = "onnxruntime"
    max_batch: int = 64
    max_queue_delay_ms: float = 10.0
    gpu_instances: int = 1  # per GPU
    cpu_instances: int = 1
    tensorrt: bool = False
    plan: Path | None = None  # default: the newest plan in the engine cache built from this ONNX
    config_only: bool = False  # no model files: the configs alone (the reference repository in deploy/triton/)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise LayoutError(f"--runtime: choose one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not 1 <= self.max_batch <= 4096:
            raise LayoutError(f"--max-batch: must be in 1-4096, got {self.max_batch}")
        if not 0 <= self.max_queue_delay_ms <= LATENCY_BUDGET_MS / 2:
            raise LayoutError(f"--max-queue-delay-ms: must be in 0-{LATENCY_BUDGET_MS / 2:g} (half the "
                              f"{LATENCY_BUDGET_MS:g} ms latency budget at most), got {self.max_queue_delay_ms}")
        if self.gpu_instances < 1 or self.cpu_instances < 1:
            raise LayoutError("--gpu-instances, --cpu-instances: must be >= 1")
        if self.plan is not None and not self.tensorrt:
            raise LayoutError("--plan: needs --tensorrt")


def onnx_io(onnx_path: Path, card: ModelCard) -> tuple[Tensor, Tensor]:
    """(input, first output) of the ONNX graph, checked against the card; nothing else about the model is assumed."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or not graph.output:
        raise LayoutError(f"{onnx_path}: needs one input and at least one output, has {len(inputs)} and "
                          f"{len(graph.output)}")

    def dims(value: onnx.ValueInfoProto) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    size, layout = card.preprocess.input_size, card.preprocess.layout
    expected = [3, size, size] if layout == "NCHW" else [size, size, 3]
    in_dims = dims(inputs[0])
    if len(in_dims) != 4 or any(d not in (e, -1) for d, e in zip(in_dims[1:], expected, strict=True)):
        raise LayoutError(f"{onnx_path}: input {inputs[0].name!r} is {in_dims}, but the card says "
                          f"[batch, {', '.join(map(str, expected))}] ({layout})")
    out_dims = dims(graph.output[0])[1:]
    output = Tensor(graph.output[0].name, (1,), reshape_scalar=True) if not out_dims else \
        Tensor(graph.output[0].name, tuple(out_dims))
    return Tensor(inputs[0].name, tuple(expected)), output


def pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (ASCII: the JSON escapes everything else)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(name: str, engine: str, card: ModelCard, inp: Tensor, out: Tensor, *, max_batch: int,
                 queue_delay_ms: float, instances: str, header: list[str],
                 parameters: dict[str, str] | None = None) -> str:
    """One model's config.pbtxt. `engine`: 'backend: "onnxruntime"', 'platform: "tensorrt_plan"', ..."""

    def dims(t: Tensor) -> str:
        return ", ".join(str(d) for d in t.dims)

    reshape = " reshape: { shape: [ ] }" if out.reshape_scalar else ""
    card_json = json.dumps(card.model_dump(mode="json"), ensure_ascii=True, separators=(",", ":"))
    params = {**(parameters or {}), CARD_PARAMETER: card_json}
    lines = [*(f"# {h}" for h in header), f'name: "{name}"', engine, f"max_batch_size: {max_batch}",
             "input [", f'  {{ name: "{inp.name}" data_type: TYPE_FP32 dims: [ {dims(inp)} ] }}', "]",
             "output [", f'  {{ name: "{out.name}" data_type: TYPE_FP32 dims: [ {dims(out)} ]{reshape} }}', "]",
             "# Each StreamGuard instance sends one request per batch (up to batcher.max_batch crops). Triton joins",
             f"# the requests of all instances, waiting {queue_delay_ms:g} ms at most: a small part of the "
             f"{LATENCY_BUDGET_MS:g} ms budget",
             "# from a sampled frame to its score. A request whose client gave up (triton.timeout_s) leaves the",
             "# queue instead of running for nobody.",
             "dynamic_batching {",
             f"  max_queue_delay_microseconds: {round(queue_delay_ms * 1000)}",
             "  default_queue_policy { allow_timeout_override: true }",
             "}",
             f"instance_group [ {instances} ]"]
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {pbtxt_string(value)} }} }}')
    return "\n".join(lines) + "\n"


def find_plan(onnx_sha256: str, cache_dir: Path) -> Path | None:
    """The newest cached TensorRT engine built from this ONNX file (its sidecar's key says so)."""
    from streamguard.inference.engine_cache import EngineCache

    cache = EngineCache(cache_dir)
    plans = [p for p in cache.entries() if (key := cache.key_of(p)) is not None and key.model_sha256 == onnx_sha256]
    return max(plans, key=lambda p: p.stat().st_mtime, default=None)


def layout(out_dir: Path, model: str | None = None, options: LayoutOptions | None = None, *,
           engines_dir: Path = ENGINES_DIR, cache_dir: Path | None = None) -> list[Path]:
    """Write the repository (model directories are replaced); returns the files written."""
    from streamguard.inference.engine_cache import default_cache_dir

    opts = options or LayoutOptions()
    onnx_path, card = resolve_model(model, engines_dir)
    sha = file_sha256(onnx_path)
    if card.sha256 and card.sha256 != sha:
        raise LayoutError(f"{onnx_path}: sha256 {sha[:12]}… differs from its card's {card.sha256[:12]}… (the card "
                          "describes another file)")
    card = card.model_copy(update={"sha256": sha})
    inp, out = onnx_io(onnx_path, card)
    plan = None
    if opts.tensorrt:  # found before anything is written: a missing plan leaves the repository as it was
        plan = opts.plan or find_plan(sha, cache_dir or default_cache_dir(engines_dir))
        if plan is None and not opts.config_only:
            raise LayoutError(f"--tensorrt: no TensorRT engine of {card.name} is cached: build one with `streamguard "
                              f"engine build {card.name}` on the GPU model Triton runs on, with Triton's TensorRT "
                              "version (or give --plan)")
        plan_batch, built = _check_plan(plan, card, opts.max_batch)
    written = _layout_onnx(Path(out_dir), onnx_path, card, inp, out, opts)
    if opts.tensorrt:
        written += _layout_plan(Path(out_dir), plan, card, inp, out, opts, plan_batch, built)
    return written


def _header(card: ModelCard, what: str) -> list[str]:
    return [f"{card.name} {card.version} (sha256 {card.sha256[:12] if card.sha256 else '?'}) on {what}.",
            "Written by `streamguard triton layout`: re-run it rather than edit (the card below must match the "
            "model)."]


def _replace_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _layout_onnx(out_dir: Path, onnx_path: Path, card: ModelCard, inp: Tensor, out: Tensor,
                 opts: LayoutOptions) -> list[Path]:
    model_dir = out_dir / card.name
    _replace_dir(model_dir)
    def config(engine: str, instances: str, what: str, parameters: dict[str, str] | None = None) -> str:
        return config_pbtxt(card.name, engine, card, inp, out, max_batch=opts.max_batch,
                            queue_delay_ms=opts.max_queue_delay_ms, instances=instances,
                            header=_header(card, what), parameters=parameters)

    files: dict[Path, str] = {}
    if opts.runtime == "python":
        files[model_dir / "config.pbtxt"] = config(
            'backend: "python"', f"{{ count: {opts.cpu_instances} kind: KIND_CPU }}",
            "Triton's Python backend: ONNX Runtime on the CPU (model.py)", {"intra_op_thread_count": "2"})
    else:
        gpu, cpu = (f"{{ count: {n} kind: {kind} }}" for n, kind in ((opts.gpu_instances, "KIND_GPU"),
                                                                          (opts.cpu_instances, "KIND_CPU")))
        files[model_dir / "config.pbtxt"] = config(
            'backend: "onnxruntime"', gpu, "Triton's ONNX Runtime backend, GPU instances (CUDA execution provider)")
        files[model_dir / "configs" / "cpu.pbtxt"] = config(
            'backend: "onnxruntime"', cpu,
            "Triton's ONNX Runtime backend, CPU instances: tritonserver --model-config-name=cpu")
    if not opts.config_only:
        (model_dir / "1").mkdir()
        shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
        if opts.runtime == "python":
            shutil.copyfile(PYTHON_MODEL, model_dir / "1" / "model.py")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted([*files, *(model_dir / "1").glob("*")])


def _check_plan(plan: Path | None, card: ModelCard, max_batch: int) -> tuple[int, str]:
    """(max_batch_size, what the plan was built with) of a plan for this card's ONNX file; LayoutError if not one."""
    from streamguard.inference.engine_cache import EngineCache

    if plan is None:
        return max_batch, "a plan built by `streamguard engine build` (not laid out yet)"
    if not Path(plan).is_file():
        raise LayoutError(f"--plan: {plan}: no such file")
    key = EngineCache.key_of(Path(plan))
    if key is None:
        raise LayoutError(f"--plan: {plan} has no readable sidecar {Path(plan).with_suffix('.json').name} (the "
                          "key `streamguard engine build` writes): cannot tell what it was built from")
    if key.model_sha256 != card.sha256:
        raise LayoutError(f"--plan: {plan} was built from another ONNX file (sha256 {key.model_sha256[:12]}…)")
    if key.profile.min_batch != 1:
        raise LayoutError(f"--plan: {plan}'s profile starts at batch {key.profile.min_batch}, Triton needs 1")
    # Triton may not send more than the profile takes.
    return key.profile.max_batch, (f"TensorRT {key.tensorrt_version}, {key.precision}, for {key.gpu_name or 'a GPU'} "
                                   f"({key.sm}): Triton must run that TensorRT version on that GPU model")


def _layout_plan(out_dir: Path, plan: Path | None, card: ModelCard, inp: Tensor, out: Tensor, opts: LayoutOptions,
                 max_batch: int, built: str) -> list[Path]:
    name = f"{card.name}-tensorrt"
    model_dir = out_dir / name
    _replace_dir(model_dir)
    config = model_dir / "config.pbtxt"
    config.write_text(config_pbtxt(
        name, 'platform: "tensorrt_plan"', card, inp, out, max_batch=max_batch,
        queue_delay_ms=opts.max_queue_delay_ms, instances=f"{{ count: {opts.gpu_instances} kind: KIND_GPU }}",
        header=_header(card, f"Triton's TensorRT backend: {built}")))
    if opts.config_only or plan is None:
        return [config]
    (model_dir / "1").mkdir()
    shutil.copyfile(plan, model_dir / "1" / "model.plan")
    return [config, model_dir / "1" / "model.plan"]
