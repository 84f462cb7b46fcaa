"""`streamguard triton layout` and the Triton deployment kit (deploy/triton/, deploy/k8s/triton/), no server needed.

The configs are parsed with Triton's own ModelConfig protobuf (tritonclient ships it); that a server loads and
serves them is tests/test_triton.py's part (the Python-backend variant: the CPU server there has no onnxruntime or
TensorRT backend, so those two configs are checked here only).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from test_deploy import by_kind, container, kustomize
from test_triton import tiny_model
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.config import load_config
from streamguard.config.service import _unknown_variables
from streamguard.inference.card import ModelCard
from streamguard.inference.engine_cache import EngineCache, EngineKey, Profile
from streamguard.inference.models import file_sha256, resolve_model
from streamguard.inference.triton_repository import LayoutError, LayoutOptions, layout

REPO = Path(__file__).resolve().parents[1]
TRITON_DEPLOY = REPO / "deploy" / "triton"
REFERENCE = TRITON_DEPLOY / "model_repository"
HAS_PROTO = importlib.util.find_spec("tritonclient") is not None


def parse(path: Path):
    if not HAS_PROTO:
        pytest.skip("needs tritonclient (its model_config_pb2 parses config.pbtxt as Triton does)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def card_of(config) -> ModelCard:
    return ModelCard.model_validate(json.loads(config.parameters["streamguard_card"].string_value))


def test_default_model_repository_gpu_and_cpu_configs(tmp_path: Path) -> None:
    written = layout(tmp_path, None, LayoutOptions(max_batch=32, max_queue_delay_ms=5), cache_dir=tmp_path / "none")
    onnx_path, card = resolve_model(None)
    name = card.name
    assert set(written) == {tmp_path / name / "config.pbtxt", tmp_path / name / "configs" / "cpu.pbtxt",
                            tmp_path / name / "1" / "model.onnx"}
    assert file_sha256(tmp_path / name / "1" / "model.onnx") == file_sha256(onnx_path)
    gpu, cpu = parse(tmp_path / name / "config.pbtxt"), parse(tmp_path / name / "configs" / "cpu.pbtxt")
    size = card.preprocess.input_size
    for config, kind in ((gpu, "KIND_GPU"), (cpu, "KIND_CPU")):
        assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size == 32
        assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [3, size, size]
        assert [o.name for o in config.output] == ["p_fake"] and list(config.output[0].dims) == [1]  # no map
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert config.dynamic_batching.default_queue_policy.allow_timeout_override
        assert [g.kind for g in config.instance_group] == [getattr(type(config.instance_group[0]), kind)]
        assert card_of(config) == card.model_copy(update={"sha256": file_sha256(onnx_path)})


def test_the_layout_reads_size_and_outputs_from_the_model(tmp_path: Path) -> None:
    tiny = tiny_model(tmp_path)
    layout(tmp_path / "repo", str(tiny), LayoutOptions(runtime="python"))
    config = parse(tmp_path / "repo" / "tiny192" / "config.pbtxt")
    assert config.backend == "python" and list(config.input[0].dims) == [3, 192, 192]
    assert [o.name for o in config.output] == ["p_fake"]
    assert (tmp_path / "repo" / "tiny192" / "1" / "model.py").is_file()
    assert card_of(config).preprocess.input_size == 192
    # A card that disagrees with its ONNX graph is refused, with both named.
    card = ModelCard.load(tiny.with_suffix(".json"))
    card.model_copy(update={"preprocess": card.preprocess.model_copy(update={"input_size": 160})}).save(
        tiny.with_suffix(".json"))
    with pytest.raises(LayoutError, match=r"input 'input' is \[-1, 3, 192, 192\], but the card says"):
        layout(tmp_path / "repo2", str(tiny))


def test_the_tensorrt_variant_takes_the_plan_and_its_profile_from_the_engine_cache(tmp_path: Path) -> None:
    onnx_path, card = resolve_model(None)
    cache = EngineCache(tmp_path / "cache")
    key = EngineKey(model_sha256=file_sha256(onnx_path), tensorrt_version="10.7.0.23", compute_capability=(9, 0),
                    precision="fp16", profile=Profile(1, 16, 48), gpu_name="NVIDIA H100 80GB HBM3")
    plan = cache.store(card.name, key, b"serialized engine bytes")
    written = layout(tmp_path / "repo", None, LayoutOptions(tensorrt=True), cache_dir=cache.directory)
    trt_dir = tmp_path / "repo" / f"{card.name}-tensorrt"
    assert trt_dir / "1" / "model.plan" in written
    assert (trt_dir / "1" / "model.plan").read_bytes() == plan.read_bytes()
    config = parse(trt_dir / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 48  # the profile's max, not --max-batch
    assert "TensorRT 10.7.0.23" in (trt_dir / "config.pbtxt").read_text()
    assert card_of(config).sha256 == key.model_sha256
    # a plan of another ONNX file is refused, and nothing was replaced
    other = cache.store("other", EngineKey(model_sha256="0" * 64, tensorrt_version="10.7.0.23",
                                           compute_capability=(9, 0), precision="fp16", profile=Profile(1, 16, 48)),
                        b"x")
    with pytest.raises(LayoutError, match="built from another ONNX file"):
        layout(tmp_path / "repo", None, LayoutOptions(tensorrt=True, plan=other))
    assert (trt_dir / "1" / "model.plan").is_file()
    with pytest.raises(LayoutError, match="no TensorRT engine of .* is cached"):
        layout(tmp_path / "repo3", None, LayoutOptions(tensorrt=True), cache_dir=tmp_path / "empty")
    assert not (tmp_path / "repo3").exists()


def test_the_committed_reference_repository_is_what_the_command_writes(tmp_path: Path) -> None:
    """deploy/triton/model_repository: `streamguard triton layout deploy/triton/model_repository --tensorrt
    --config-only` for the shipped model. When the model changes, re-run that command."""
    layout(tmp_path, None, LayoutOptions(tensorrt=True, config_only=True), cache_dir=tmp_path / "no-cache")
    want = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.pbtxt")}
    have = {p.relative_to(REFERENCE): p.read_text() for p in REFERENCE.rglob("*.pbtxt")}
    assert set(have) == set(want)
    for rel, text in want.items():
        assert have[rel] == text, f"{REFERENCE / rel} is stale: re-run `streamguard triton layout " \
                                  "deploy/triton/model_repository --tensorrt --config-only`"


def test_cli_layout_errors_are_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["triton", "layout", str(tmp_path), "--max-queue-delay-ms", "200"])
    assert res.exit_code == 2 and "--max-queue-delay-ms" in res.output and "latency budget" in res.output
    res = runner.invoke(app, ["triton", "layout", str(tmp_path), "--runtime", "tensorflow"])
    assert res.exit_code == 2 and "--runtime" in res.output
    res = runner.invoke(app, ["triton", "layout", str(tmp_path), "-m", "no-such-model"])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["triton", "layout", str(tmp_path / "ok"), "--runtime", "python"])
    assert res.exit_code == 0, res.output
    assert "serve it: tritonserver --model-repository" in res.output


# -- the deployment kit -------------------------------------------------------------------------------------------


def test_compose_instances_share_one_triton() -> None:
    compose = yaml.safe_load((TRITON_DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"model-repository", "triton", "streamguard-a", "streamguard-b"}
    layout_svc, triton = services["model-repository"], services["triton"]
    assert layout_svc["command"][:3] == ["triton", "layout", "/models"]
    assert "triton-models:/models" in layout_svc["volumes"] and "triton-models:/models:ro" in triton["volumes"]
    assert triton["depends_on"]["model-repository"]["condition"] == "service_completed_successfully"
    image = triton["image"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image)
    dockerfile_gpu = (REPO / "deploy" / "Dockerfile.gpu").read_text()
    (trt_tag,) = re.findall(r"ARG TENSORRT_TAG=(\S+)", dockerfile_gpu)
    assert image.endswith(":" + trt_tag), "Triton must run the TensorRT version plans are built with"
    assert "--model-config-name=cpu" in triton["command"]
    gpu = yaml.safe_load((TRITON_DEPLOY / "compose.gpu.yaml").read_text())["services"]["triton"]
    assert "--model-config-name=cpu" not in " ".join(gpu["command"])
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("streamguard-a", "streamguard-b"):
        svc = services[name]
        env = svc["environment"]
        assert env["STREAMGUARD_BACKEND"] == "triton"
        host, port = env["STREAMGUARD_TRITON__URL"].split(":")
        assert host == "triton" and port == "8001"
        assert _unknown_variables(dict.fromkeys(env, "x")) == []
        assert svc["depends_on"]["triton"]["condition"] == "service_healthy"
        (mount,) = [m for m in svc["volumes"] if m.endswith(":/etc/streamguard/config.yaml:ro")]
        cfg = load_config(TRITON_DEPLOY / mount.split(":")[0], backend=env["STREAMGUARD_BACKEND"])
        assert cfg.backend == "triton" and cfg.triton.fallback == "local"
        assert cfg.batcher.max_batch <= 64  # the laid-out max_batch_size
    assert {services[n]["ports"][0].split(":")[0] for n in ("streamguard-a", "streamguard-b")} == {"8080", "8081"}


def test_k8s_instances_share_one_triton() -> None:
    docs = by_kind(kustomize("triton"))
    (sts,) = docs["StatefulSet"]
    (deploy,) = [d for d in docs["Deployment"] if d["metadata"]["name"] == "triton"]
    (svc,) = [s for s in docs["Service"] if s["metadata"]["name"] == "triton"]
    assert sts["metadata"]["namespace"] == deploy["metadata"]["namespace"] == svc["metadata"]["namespace"]
    env = {e["name"]: e.get("value") for e in container(sts)["env"]}
    assert env["STREAMGUARD_BACKEND"] == "triton"
    assert _unknown_variables({k: "x" for k in env if k != "POD_NAME"}) == []
    host, port = env["STREAMGUARD_TRITON__URL"].split(":")
    assert host == svc["metadata"]["name"]
    grpc = {p["name"]: p for p in svc["spec"]["ports"]}["grpc"]
    assert grpc["port"] == int(port)
    pod = deploy["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["triton", "layout", "/models"] and init["image"].startswith("streamguard:")
    server = container(deploy)
    assert "--model-repository=/models" in server["args"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == 8001 and grpc["targetPort"] == "grpc"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["models"] == {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"] == "/models"
    assert deploy["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_the_cpu_image_has_the_triton_client() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"pip install \.\[([a-z]+,)*triton(,[a-z]+)*\]", text)  # with the other extras it installs
