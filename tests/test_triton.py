"""The triton backend against a real Triton Inference Server: nvidia-pytriton's bundled `tritonserver` on this CPU
(tools/triton_local.py), serving what `streamguard triton layout --runtime python` lays out (ONNX Runtime inside a
Python-backend model: that build has no onnxruntime backend). One server for the module; the outage tests kill,
pause and restart it, and run last.

Shown here: scores equal to the local ONNX Runtime backend within 1e-5 on real face crops (and on a 192 px model:
nothing depends on the shipped model's size); two service instances' requests joined into one batch, in Triton's
own statistics; Triton down at start, killed under load and restarted, and hung (SIGSTOP): degraded, then back,
with the event loop and the API answering throughout. Skips with the reason where the wheel cannot run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from serve_helpers import MODEL, REPO, LiveServer, fast_settings, free_port, stored_events

from streamguard.config import ConfigError, ServiceConfig, TritonSettings, load_config
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.classifier import InferenceUnavailable
from streamguard.inference.gpu import BackendUnavailable
from streamguard.inference.models import file_sha256, resolve_model
from streamguard.inference.onnx import OnnxClassifier
from streamguard.inference.triton_repository import LayoutOptions, layout
from streamguard.service import Service

sys.path.insert(0, str(REPO / "tools"))
from triton_local import LocalTriton  # noqa: E402

sys.path.remove(str(REPO / "tools"))

HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None and importlib.util.find_spec("grpc") is not None
needs_client = pytest.mark.skipif(not HAS_CLIENT, reason="needs tritonclient[grpc] (pip install '.[triton]')")
TOLERANCE = 1e-5
TINY = "tiny192"


# -- fixtures -----------------------------------------------------------------------------------------------------


def tiny_model(folder: Path, size: int = 192) -> Path:
    """A real ONNX model of another input size and map shape than the shipped one: mean colour -> P(fake), plus
    a (N, 1, size/16, size/16) map. Its card sits beside it, as `streamguard models import` writes one."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])
    p = helper.make_tensor_value_info("p_fake", TensorProto.FLOAT, ["batch", 1])
    m = helper.make_tensor_value_info("fake_map", TensorProto.FLOAT, ["batch", 1, size // 16, size // 16])
    w = numpy_helper.from_array(np.array([[1.5], [-2.0], [0.7]], np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["p_fake"]),
             helper.make_node("ReduceMean", ["input"], ["grey"], axes=[1], keepdims=1),
             helper.make_node("AveragePool", ["grey"], ["fake_map"], kernel_shape=[16, 16], strides=[16, 16])]
    graph = helper.make_graph(nodes, TINY, [x], [p, m], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / f"{TINY}.onnx"
    onnx.save(model, str(path))
    card = ModelCard(name=TINY, architecture="mean colour, test only", source="tests/test_triton.py",
                     preprocess=Preprocess(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                     threshold=0.6, sha256=file_sha256(path))
    card.save(path.with_suffix(".json"))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelCard]]:
    tiny = tiny_model(tmp_path_factory.mktemp("tiny"))
    default_path, default_card = resolve_model(MODEL)
    return {"default": (default_path, default_card), "tiny": resolve_model(str(tiny))}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, models) -> LocalTriton:
    why = None if HAS_CLIENT else "tritonclient[grpc] is not installed"
    why = why or LocalTriton.unavailable()
    if why:
        pytest.skip(f"needs nvidia-pytriton's tritonserver (pip install -e '.[test,triton]'): {why}")
    repo = tmp_path_factory.mktemp("triton-repo")
    for path, _ in models.values():
        layout(repo, str(path), LayoutOptions(runtime="python", max_batch=64))
    server = LocalTriton(repo)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def crops(models) -> np.ndarray:
    """Face crops as the service cuts them: real photos from ../shared/data through the face pipeline, and the
    aligned MesoNet test crops; without ../shared, seeded noise (the parity test then skips)."""
    _, card = models["default"]
    shared = REPO.parent / "shared" / "data"
    if not (shared / "real_faces").is_dir():
        size = card.preprocess.input_size
        return np.random.default_rng(0).integers(0, 256, (24, size, size, 3), dtype=np.uint8)
    from streamguard.inference.calibration import face_crops, image_files

    photos = image_files(shared / "real_faces")[:14]
    aligned = image_files(shared / "mesonet" / "test_images")
    return np.concatenate([face_crops(photos, card), face_crops(aligned, card, images_are_crops=True)])


def settings(server: LocalTriton, **kw) -> TritonSettings:
    return TritonSettings(url=server.url, **{"timeout_s": 2.0, "connect_timeout_s": 5.0, "retry_interval_s": 0.3,
                                             **kw})


def model_stats(server: LocalTriton, name: str) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        return client.get_inference_statistics(name, as_json=True)["model_stats"][0]
    finally:
        client.close()


def executions_by_size(stats: dict) -> dict[int, int]:
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def counts(stats: dict) -> tuple[int, int]:
    """(successful requests, executions): JSON leaves out zeros (proto3)."""
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


# -- scores -------------------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_scores_equal_local_onnxruntime_on_real_face_crops(triton, models, crops, shared_data) -> None:
    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["default"]
    clf = load_triton_classifier(settings(triton), onnx_path, card, max_batch=16)
    try:
        assert clf.healthy and clf.degraded_reason is None
        assert clf.card.model_dump(exclude={"sha256"}) == card.model_dump(exclude={"sha256"})  # from the server
        assert clf.card.sha256 == file_sha256(onnx_path)
        local = OnnxClassifier(onnx_path, card)
        assert len(crops) >= 12
        for batch in (1, 5, 16):
            for i in range(0, len(crops), batch):
                got, ref = clf.predict(crops[i:i + batch]), local.predict(crops[i:i + batch])
                np.testing.assert_allclose(got, ref, atol=TOLERANCE, rtol=0)
        assert clf.fallback_batches == 0 and clf.remote_batches > 0
        assert clf.predict(crops[:0]).shape == (0,)
    finally:
        clf.close()


def test_a_model_of_another_size_is_read_from_its_card_and_onnx(triton, models) -> None:
    """192 px in, a 12x12 map out: the layout, the served config and the client take both from the model."""
    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["tiny"]
    clf = load_triton_classifier(settings(triton), onnx_path, card, max_batch=8)
    try:
        assert clf.input_size == 192
        local = OnnxClassifier(onnx_path, card)
        x = np.random.default_rng(1).integers(0, 256, (70, 192, 192, 3), dtype=np.uint8)
        np.testing.assert_allclose(clf.predict(x[:8]), local.predict(x[:8]), atol=TOLERANCE, rtol=0)
        # More than the served max_batch_size (64; an occlusion heatmap's calls may be): split, not an outage.
        np.testing.assert_allclose(clf.predict(x), local.predict(x), atol=TOLERANCE, rtol=0)
        with pytest.raises(ValueError, match="crops must be"):  # the caller's mistake, not an outage
            clf.predict(x[:, :100])
        assert clf.healthy and clf.fallback_batches == 0
    finally:
        clf.close()


def test_two_service_instances_requests_are_batched_together_by_triton(triton, models, crops, tmp_path) -> None:
    """Each instance has one request in flight at a time (3 and 5 crops): an execution of 8 is one of each."""
    onnx_path, card = models["default"]
    name = card.name
    reference = OnnxClassifier(onnx_path, card).predict(crops[:8])
    rounds = 8

    async def run() -> None:
        services = [Service(ServiceConfig(data_dir=tmp_path / f"sg{i}", model=MODEL, backend="triton",
                                          triton=settings(triton))) for i in (1, 2)]
        for svc in services:
            await svc.start()
        try:
            assert all(svc.classifier.backend == "triton" and not svc.degraded for svc in services)
            a, b = (svc.batcher for svc in services)
            for _ in range(rounds):
                got_a, got_b = await asyncio.gather(a.score_many(crops[:3]), b.score_many(crops[3:8]))
                np.testing.assert_allclose(np.concatenate([got_a, got_b]), reference, atol=TOLERANCE, rtol=0)
        finally:
            for svc in services:
                await svc.stop()

    before = model_stats(triton, name)
    asyncio.run(run())
    after = model_stats(triton, name)
    requests, executions = (a - b for a, b in zip(counts(after), counts(before), strict=True))
    by_size = executions_by_size(after)
    joined = by_size.get(8, 0) - executions_by_size(before).get(8, 0)
    assert requests == 2 * rounds, (requests, after)
    assert joined >= rounds // 2, f"only {joined} of {rounds} rounds ran as one batch of 8: {by_size}"
    assert executions < requests


# -- start-time checks --------------------------------------------------------------------------------------------


def test_a_local_fallback_that_is_not_the_served_model_is_refused(triton, models, tmp_path) -> None:
    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["tiny"]
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_path.read_bytes())
    other_card = card.model_copy(update={"name": "other", "sha256": None})
    with pytest.raises(BackendUnavailable, match=r"Triton serves tiny192 .* set `model` to the model Triton serves"):
        load_triton_classifier(settings(triton, model_name=TINY), other, other_card, max_batch=8)
    # Without a local fallback, the served model's own card is all that counts.
    clf = load_triton_classifier(settings(triton, model_name=TINY, fallback="unscored"), other, other_card,
                                 max_batch=8)
    try:
        assert clf.healthy and clf.card.name == TINY and clf.local is None
    finally:
        clf.close()


def test_a_batcher_larger_than_the_served_max_batch_is_refused(triton, models) -> None:
    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["tiny"]
    with pytest.raises(BackendUnavailable, match="batcher.max_batch 128 exceeds the Triton model's max_batch_size 64"):
        load_triton_classifier(settings(triton), onnx_path, card, max_batch=128)


def test_an_unknown_model_starts_degraded_with_the_reason(triton, models) -> None:
    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["tiny"]
    clf = load_triton_classifier(settings(triton, model_name="no-such-model", connect_timeout_s=0.3), onnx_path,
                                 card, max_batch=8)
    try:
        assert not clf.healthy
        assert "no-such-model" in clf.degraded_reason and "scoring on the local model" in clf.degraded_reason
        x = np.zeros((2, 192, 192, 3), np.uint8)
        np.testing.assert_allclose(clf.predict(x), OnnxClassifier(onnx_path, card).predict(x), atol=TOLERANCE)
    finally:
        clf.close()


# -- outages (these kill, pause and restart the module's server: they run last) -----------------------------------


class LoopWatch:
    """Runs on the service's loop: the longest a 10 ms sleep overshot (a blocked loop shows here)."""

    def __init__(self) -> None:
        self.max_lag_s = 0.0
        self.running = True

    async def run(self) -> None:
        while self.running:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.max_lag_s = max(self.max_lag_s, time.perf_counter() - t - 0.01)


class Load:
    """`workers` coroutines on the service's loop, each scoring 4 crops after another through the batcher."""

    def __init__(self, service: Service, crops: np.ndarray, workers: int = 3) -> None:
        self.service, self.crops, self.workers = service, crops, workers
        self.calls: list[tuple[float, float, np.ndarray]] = []  # (start, seconds, scores)
        self.errors: list[BaseException] = []
        self.running = True

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.workers)))

    async def _one(self, i: int) -> None:
        batch = self.crops[4 * i:4 * i + 4]
        while self.running:
            t = time.perf_counter()
            try:
                scores = await self.service.batcher.score_many(batch)
                self.calls.append((t, time.perf_counter() - t, scores))
            except Exception as exc:
                self.errors.append(exc)
            await asyncio.sleep(0.02)


def degraded_events(data_dir: Path) -> list[bool]:
    return [e["data"]["active"] for e in stored_events(data_dir)
            if e["type"] == "service.degraded" and e["data"]["component"] == "inference"]


def test_down_at_start_then_killed_under_load_degrades_and_recovers(triton, models, crops, tmp_path) -> None:
    """fallback local: every batch is scored (by Triton or the local model, the same numbers), the service is
    degraded exactly while Triton is away, and the loop and the API never wait on it."""
    onnx_path, card = models["default"]
    local = OnnxClassifier(onnx_path, card)
    reference = [local.predict(crops[4 * i:4 * i + 4]) for i in range(3)]
    cfg = fast_settings(tmp_path / "data", backend="triton",
                        triton={"url": triton.url, "timeout_s": 1.0, "connect_timeout_s": 0.5,
                                "retry_interval_s": 0.3})
    triton.kill()
    server = LiveServer(cfg).start()
    http = httpx.Client(base_url=server.url, timeout=5.0)
    readyz_s: list[float] = []

    def degraded() -> list[str]:
        t = time.perf_counter()
        body = http.get("/readyz").json()
        readyz_s.append(time.perf_counter() - t)
        return body["degraded"]

    def wait(cond, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    svc = server.service
    watch, load = LoopWatch(), Load(svc, crops)
    try:
        assert degraded() == ["inference"]  # started on the local model, Triton down
        server.call(lambda: asyncio.ensure_future(watch.run()))
        server.call(lambda: asyncio.ensure_future(load.run()))
        triton.start()
        wait(lambda: degraded() == [], "recovery after Triton came up")
        remote = svc.classifier.remote_batches
        wait(lambda: svc.classifier.remote_batches > remote + 5, "batches on Triton again")
        triton.kill()  # under load
        wait(lambda: degraded() == ["inference"], "degraded after Triton was killed")
        fallback = svc.classifier.fallback_batches
        wait(lambda: svc.classifier.fallback_batches > fallback + 5, "batches on the local model")
        triton.start()
        wait(lambda: degraded() == [], "recovery after the restart")
        remote = svc.classifier.remote_batches
        wait(lambda: svc.classifier.remote_batches > remote + 5, "batches on Triton after the restart")
    finally:
        load.running = watch.running = False
        time.sleep(0.3)
        http.close()
        server.stop()
    assert load.errors == [], load.errors[:3]
    for _, _, scores in load.calls:
        assert any(np.allclose(scores, ref, atol=TOLERANCE, rtol=0) for ref in reference)
    slowest = max(seconds for _, seconds, _ in load.calls)
    assert slowest < 2.0, f"a batch took {slowest:.2f} s (timeout 1 s, then the local model)"
    assert watch.max_lag_s < 0.25, f"the event loop was blocked for {watch.max_lag_s:.3f} s"
    assert max(readyz_s) < 1.0, f"/readyz took {max(readyz_s):.2f} s"
    assert degraded_events(tmp_path / "data") == [True, False, True, False]


@pytest.mark.shared
def test_hung_server_times_out_and_faces_go_unscored(triton, models, media, shared_data, tmp_path) -> None:
    """fallback unscored, Triton frozen (SIGSTOP: it holds its sockets and answers nothing): the first batch
    waits out triton.timeout_s, later ones fail at once; a live stream's faces are seen but unscored; SIGCONT and
    the service is back."""
    video = media.make_slideshow([shared_data / "real_faces" / "img1.jpg"], tmp_path / "face.mp4", fps=10,
                                 seconds_per_image=8.0)
    data = tmp_path / "data"
    cfg = fast_settings(data, backend="triton", sampling={"fps": 2.0},
                        triton={"url": triton.url, "timeout_s": 0.4, "connect_timeout_s": 5.0,
                                "retry_interval_s": 0.3, "fallback": "unscored"})
    server = LiveServer(cfg).start()
    svc = server.service
    http = httpx.Client(base_url=server.url, timeout=5.0)
    try:
        assert http.get("/readyz").json()["degraded"] == []
        triton.pause()
        crop = np.zeros((1, svc.classifier.input_size, svc.classifier.input_size, 3), np.uint8)
        t = time.perf_counter()
        with pytest.raises(InferenceUnavailable, match="DEADLINE_EXCEEDED"):
            server.call(lambda: svc.batcher.score_many(crop))
        assert 0.3 < time.perf_counter() - t < 2.0
        t = time.perf_counter()
        with pytest.raises(InferenceUnavailable):
            server.call(lambda: svc.batcher.score_many(crop))
        assert time.perf_counter() - t < 0.3, "while degraded, batches must not wait on the frozen server"
        assert http.get("/readyz").json()["degraded"] == ["inference"]
        r = http.post("/v1/streams", json={"id": "cam", "url": str(video)},
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text

        def unscored() -> float:
            text = http.get("/metrics").text
            line = next(ln for ln in text.splitlines() if ln.startswith("streamguard_faces_unscored_total"))
            return float(line.split()[-1])

        deadline = time.monotonic() + 20
        while unscored() < 3:
            assert time.monotonic() < deadline, "no unscored faces while Triton was frozen"
            time.sleep(0.2)
        triton.resume()
        deadline = time.monotonic() + 10
        while http.get("/readyz").json()["degraded"]:
            assert time.monotonic() < deadline, "no recovery after SIGCONT"
            time.sleep(0.1)
        assert svc.classifier.healthy
    finally:
        triton.resume()
        http.close()
        server.stop()
    scores = [e for e in stored_events(data) if e["type"] == "participant.score"]
    assert scores and any(e["data"]["p_fake"] is None for e in scores), "unscored faces publish p_fake null"
    assert degraded_events(data) == [True, False]


# -- no server needed ---------------------------------------------------------------------------------------------


def test_triton_settings_errors_name_the_field_and_never_print_a_secret(tmp_path, monkeypatch) -> None:
    def error(**env: str) -> str:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            with pytest.raises(ConfigError) as info:
                load_config()
            return str(info.value)
        finally:
            for k in env:
                monkeypatch.delenv(k)

    assert "triton.url" in error(STREAMGUARD_TRITON__URL="grpc://triton:8001")
    assert "triton.url" in error(STREAMGUARD_TRITON__URL="user:pw@triton:8001")
    assert "port in 1-65535" in error(STREAMGUARD_TRITON__URL="triton:99999")
    assert "triton.fallback" in error(STREAMGUARD_TRITON__FALLBACK="retry")
    text = error(STREAMGUARD_TRITON__HEADERS=json.dumps({"authorization": "Bearer s3cr3t-\u00e9"}))
    assert "printable ASCII" in text and "s3cr3t" not in text
    text = error(STREAMGUARD_TRITON__HEADERS=json.dumps({"Bad Key": "s3cr3t"}))
    assert "not a gRPC metadata key" in text and "s3cr3t" not in text
    assert "root_certificates: set ssl: true" in error(STREAMGUARD_TRITON__ROOT_CERTIFICATES=str(tmp_path))
    assert "no such file" in error(STREAMGUARD_TRITON__SSL="true",
                                   STREAMGUARD_TRITON__ROOT_CERTIFICATES=str(tmp_path / "ca.pem"))
    key = tmp_path / "key.pem"
    key.write_text("not checked here: tritonclient reads it")
    assert "needs both" in error(STREAMGUARD_TRITON__SSL="true", STREAMGUARD_TRITON__PRIVATE_KEY=str(key))
    # a numeric token in YAML is a token, not an error that prints it
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("backend: triton\ntriton:\n  url: triton:8001\n  headers:\n    x-api-key: 123456789\n")
    cfg = load_config(cfg_file)
    assert cfg.triton.headers["x-api-key"].get_secret_value() == "123456789"
    assert "123456789" not in repr(cfg) and "123456789" not in cfg.model_dump_json()


@needs_client
def test_an_unreachable_server_never_leaks_the_credentials(models, caplog, tmp_path) -> None:
    """Down at start (a port nobody listens on), every probe failing at debug level: the header value appears in
    no log line, reason or event."""
    import logging

    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = models["tiny"]
    secret = "Bearer TOP-SECRET-TOKEN-42"
    cfg = TritonSettings(url=f"127.0.0.1:{free_port()}", headers={"authorization": secret}, connect_timeout_s=0.3,
                         retry_interval_s=0.1, timeout_s=0.2)
    seen: list[tuple[bool, str]] = []
    with caplog.at_level(logging.DEBUG):
        clf = load_triton_classifier(cfg, onnx_path, card, max_batch=4)
        clf.watch_health(lambda healthy, why: seen.append((healthy, why)))
        clf.predict(np.zeros((2, 192, 192, 3), np.uint8))
        time.sleep(0.5)  # a few probes
        clf.close()
    assert seen and seen[0][0] is False and "UNAVAILABLE" in seen[0][1]
    words = caplog.text + repr(seen) + str(clf.degraded_reason) + repr(cfg)
    assert "TOP-SECRET" not in words


def test_remote_model_config_without_a_card_or_with_other_dims_is_explained() -> None:
    from streamguard.inference.triton import remote_model

    card = resolve_model(MODEL)[1]
    size, other = card.preprocess.input_size, card.preprocess.input_size + 32
    base = {"name": "m", "max_batch_size": 8,
            "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": ["3", str(size), str(size)]}],
            "output": [{"name": "p_fake", "data_type": "TYPE_FP32", "dims": ["1"]}]}
    with pytest.raises(ValueError, match="no 'streamguard_card' parameter"):
        remote_model(base)
    wrong = card.model_copy(update={"preprocess": card.preprocess.model_copy(update={"input_size": other})})
    with pytest.raises(ValueError, match=rf"its card says FP32 \[3, {other}, {other}\]"):
        remote_model({**base, "parameters": {"streamguard_card": {"string_value": wrong.model_dump_json()}}})
    ok = remote_model({**base, "parameters": {"streamguard_card": {"string_value": card.model_dump_json()}}})
    assert (ok.input_name, ok.output_name, ok.max_batch_size, ok.card) == ("input", "p_fake", 8, card)
