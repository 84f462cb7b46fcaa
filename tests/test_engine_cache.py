"""Engine cache keys, files and staleness; profiles and CUDA-graph buckets; calibration batches; parity checks;
the engine build's flow (errors without a GPU/TensorRT, reuse, rebuild on any key change, INT8 only where it holds)
with TensorRT's build call replaced. Nothing here needs a GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.classifier import preprocess
from streamguard.inference.engine_build import EngineBuildError, build_engine, require_tensorrt
from streamguard.inference.engine_cache import (
    EngineCache,
    EngineKey,
    Profile,
    calibration_batches,
    choose_profile,
    compare_scores,
    crops_sha256,
    describe_changes,
    engine_filename,
    graph_batch_sizes,
    plan_batch,
    split_batches,
)
from streamguard.inference.gpu import (
    CUDA_PYTHON_MISSING,
    TENSORRT_MISSING,
    Availability,
    BackendUnavailable,
    GpuInfo,
    precision_problem,
    tensorrt_major,
    tensorrt_precision_problem,
)
from streamguard.inference.models import ENGINES_DIR

REPO = Path(__file__).resolve().parents[1]
MESO4 = ENGINES_DIR / "mesonet-meso4-df.onnx"
# Imported from ../shared by conftest.py into the session's engines folder: absent in a user's clone.
needs_meso4 = pytest.mark.skipif(not MESO4.is_file(),
                                 reason=f"needs {MESO4.name}, imported from ../shared/data/mesonet")
SHA = "ab" * 32
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))


def gpu_machine(trt: str = "10.7.0", cc: tuple[int, int] = (9, 0), name: str = "GPU") -> Availability:
    return Availability(has_cuda_gpu=True, has_tensorrt=True, has_cuda_python=True, gpu=GpuInfo(name, cc),
                        tensorrt_version=trt)


def key(**changes) -> EngineKey:
    base = EngineKey(SHA, "10.7.0", (9, 0), "fp16", Profile(1, 16, 64))
    return replace(base, **changes)


# ------------------------------------------------------------------ profiles and graph buckets


def test_profile_validation_and_shapes():
    p = Profile(1, 16, 64)
    assert p.shapes(256) == ((1, 3, 256, 256), (16, 3, 256, 256), (64, 3, 256, 256))
    assert p.shapes(224, "NHWC")[2] == (64, 224, 224, 3)
    assert p.tag == "b1-16-64"
    for bad in ((0, 1, 1), (2, 1, 4), (1, 8, 4), (1, 1, 10_000)):
        with pytest.raises(ValueError):
            Profile(*bad)


def test_choose_profile_opt_is_the_typical_batch():
    assert choose_profile(64) == Profile(1, 16, 64)  # the batcher's default batch
    assert choose_profile(8) == Profile(1, 8, 8)  # never above max
    assert choose_profile(256, 32) == Profile(1, 32, 256)
    with pytest.raises(ValueError):
        choose_profile(16, 32)
    with pytest.raises(ValueError):
        choose_profile(0)


def test_graph_batch_sizes_are_powers_of_two_up_to_the_graph_bound():
    assert graph_batch_sizes(Profile(1, 16, 64)) == (1, 2, 4, 8, 16, 32)
    assert graph_batch_sizes(Profile(1, 16, 24)) == (1, 2, 4, 8, 16, 24)  # the profile's max closes the list
    assert graph_batch_sizes(Profile(1, 16, 64), graph_max_batch=12) == (1, 2, 4, 8, 12)
    assert graph_batch_sizes(Profile(1, 1, 1)) == (1,)
    assert graph_batch_sizes(Profile(4, 8, 64)) == (4, 8, 16, 32)
    assert graph_batch_sizes(Profile(1, 16, 64), graph_max_batch=0) == ()


def test_plan_batch_pads_into_a_graph_or_runs_eagerly():
    profile = Profile(1, 16, 64)
    sizes = graph_batch_sizes(profile)
    assert plan_batch(1, sizes, profile) == (plan := plan_batch(1, sizes, profile)) and plan.run_batch == 1
    assert (plan_batch(3, sizes, profile).run_batch, plan_batch(3, sizes, profile).use_graph) == (4, True)
    assert plan_batch(32, sizes, profile).run_batch == 32
    big = plan_batch(33, sizes, profile)
    assert (big.run_batch, big.use_graph) == (33, False)  # above the graphs: exact size, no padding
    assert plan_batch(5, (), profile).run_batch == 5 and not plan_batch(5, (), profile).use_graph
    assert plan_batch(2, (), Profile(4, 4, 8)).run_batch == 4  # raised to a profile that starts above 1
    for n in (0, 65):
        with pytest.raises(ValueError):
            plan_batch(n, sizes, profile)


def test_split_batches():
    assert split_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert split_batches(4, 4) == [(0, 4)]
    assert split_batches(0, 4) == []


# ------------------------------------------------------------------ keys and file names


def test_key_digest_changes_with_every_part():
    base = key()
    variants = [key(model_sha256="cd" * 32), key(tensorrt_version="10.8.0"), key(compute_capability=(8, 9)),
                key(precision="fp32"), key(profile=Profile(1, 16, 128)), key(profile=Profile(1, 8, 64)),
                key(precision="int8", calibration_sha256="ef" * 32), key(key_version=99),
                key(gpu_name="NVIDIA H200")]
    digests = {base.digest} | {v.digest for v in variants}
    assert len(digests) == len(variants) + 1
    assert key().digest == base.digest  # stable


def test_key_validation():
    with pytest.raises(ValueError, match="precision"):
        key(precision="fp8")
    with pytest.raises(ValueError, match="sha256"):
        key(model_sha256="not-a-hash")
    with pytest.raises(ValueError, match="calibration"):
        key(precision="int8")  # INT8 without a calibration hash
    with pytest.raises(ValueError, match="calibration"):
        key(calibration_sha256="ef" * 32)  # FP16 with one


def test_key_json_round_trip():
    k = key(precision="int8", calibration_sha256="ef" * 32, gpu_name="NVIDIA H200")
    assert EngineKey.from_json(json.loads(json.dumps(k.to_json()))) == k


def test_engine_filename():
    name = engine_filename("mesonet-meso4-df", key())
    assert name.startswith("mesonet-meso4-df.fp16.b1-16-64.sm90.trt10.7.0.")
    assert name.endswith(".engine") and key().digest[:16] in name
    assert "/" not in engine_filename("../evil name", key())


def test_describe_changes_names_each_part():
    new = key(tensorrt_version="10.8.0", compute_capability=(8, 9), profile=Profile(1, 16, 128))
    changes = describe_changes(key(), new)
    assert "TensorRT 10.7.0 -> 10.8.0" in changes
    assert "GPU compute capability sm90 -> sm89" in changes
    assert "profile b1-16-64 -> b1-16-128" in changes
    assert describe_changes(key(), key()) == []
    assert describe_changes(key(gpu_name="NVIDIA H100 80GB HBM3"), key(gpu_name="NVIDIA H200")) == [
        "GPU NVIDIA H100 80GB HBM3 -> NVIDIA H200"]  # same sm90: TensorRT still wants its own engine
    assert any(c.startswith("model changed") for c in describe_changes(key(), key(model_sha256="cd" * 32)))


# ------------------------------------------------------------------ the cache on disk


def test_cache_hit_miss_and_stale_reasons(tmp_path: Path):
    cache = EngineCache(tmp_path)
    first = cache.lookup("m", key())
    assert not first.hit and first.reasons == ["no engine built yet for this model"]
    path = cache.store("m", key(), b"engine-bytes", {"gpu": "test"})
    assert path == first.path and path.read_bytes() == b"engine-bytes"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["key"]["tensorrt_version"] == "10.7.0" and sidecar["gpu"] == "test"
    assert cache.lookup("m", key()).hit

    upgraded = cache.lookup("m", key(tensorrt_version="10.8.0"))
    assert not upgraded.hit and upgraded.reasons == ["TensorRT 10.7.0 -> 10.8.0"]
    assert cache.lookup("m", key(compute_capability=(8, 6))).reasons == ["GPU compute capability sm90 -> sm86"]
    assert cache.lookup("m", key(profile=Profile(1, 32, 128))).reasons == ["profile b1-16-64 -> b1-32-128"]
    assert cache.lookup("other-model", key()).reasons == ["no engine built yet for this model"]

    removed = cache.remove_stale(upgraded)
    assert path in removed and not path.exists() and not path.with_suffix(".json").exists()


def test_engine_without_a_readable_sidecar_is_never_used(tmp_path: Path):
    cache = EngineCache(tmp_path)
    path = cache.store("m", key(), b"x")
    path.with_suffix(".json").write_text("{not json")
    assert not cache.lookup("m", key()).hit
    path.with_suffix(".json").unlink()
    assert not cache.lookup("m", key()).hit


def test_cache_dir_follows_the_environment(tmp_path: Path):
    from streamguard.inference.engine_cache import default_cache_dir

    assert default_cache_dir(tmp_path, environ={}) == tmp_path / "cache"
    assert default_cache_dir(tmp_path, environ={"STREAMGUARD_ENGINE_CACHE": "/data/engines"}) == Path("/data/engines")


def test_store_leaves_no_temp_files(tmp_path: Path):
    EngineCache(tmp_path).store("m", key(), b"x" * 1000)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".engine", ".json"]


def test_find_compatible_takes_the_smallest_profile_that_fits(tmp_path: Path):
    cache = EngineCache(tmp_path)
    small = cache.store("m", key(profile=Profile(1, 8, 8)), b"a")
    mid = cache.store("m", key(profile=Profile(1, 16, 64)), b"b")
    cache.store("m", key(profile=Profile(1, 16, 256)), b"c")
    cache.store("m", key(profile=Profile(2, 16, 32)), b"d")  # cannot run batch 1
    cache.store("m", key(tensorrt_version="9.0", profile=Profile(1, 16, 16)), b"e")  # other TensorRT
    cache.store("m", key(gpu_name="NVIDIA H200", profile=Profile(1, 4, 4)), b"f")  # other GPU, same sm90
    find = lambda n, **kw: cache.find_compatible(  # noqa: E731
        "m", model_sha256=SHA, tensorrt_version=kw.get("trt", "10.7.0"), compute_capability=(9, 0),
        precision=kw.get("precision", "fp16"), min_max_batch=n, gpu_name=kw.get("gpu", ""))
    assert find(8) == small
    assert find(16) == mid
    assert find(300) is None
    assert find(8, precision="int8") is None
    assert find(16, trt="10.8.0") is None
    assert find(4, gpu="NVIDIA H200").name.endswith(".engine") and find(8, gpu="NVIDIA H200") is None
    assert find(8, gpu="NVIDIA H100") is None


# ------------------------------------------------------------------ calibration batches, parity


def _card(size: int = 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> ModelCard:
    return ModelCard(name="t", architecture="t", source="test", preprocess=Preprocess(input_size=size, mean=mean,
                                                                                      std=std))


def test_calibration_batches_are_full_and_preprocessed():
    card = _card()
    crops = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    batches = calibration_batches(crops, card, 4)
    assert [b.shape for b in batches] == [(4, 3, 8, 8)] * 3  # 10 crops -> 3 full batches, wrapping around
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    x = preprocess(crops, card)
    np.testing.assert_array_equal(np.concatenate(batches)[:10], x)
    np.testing.assert_array_equal(batches[2][2:], x[:2])  # the tail wraps to the first crops, not blanks
    with pytest.raises(ValueError):
        calibration_batches(crops[:0], card, 4)


def test_crops_sha256_sees_one_pixel():
    crops = np.zeros((2, 4, 4, 3), np.uint8)
    other = crops.copy()
    other[1, 2, 3, 0] = 1
    assert crops_sha256(crops) != crops_sha256(other)
    assert crops_sha256(crops) == crops_sha256(crops.copy())


def test_compare_scores():
    ref = [0.1, 0.49, 0.7, 0.95]
    ok = compare_scores(ref, [0.11, 0.48, 0.69, 0.96], threshold=0.5)
    assert ok.ok and ok.max_abs_diff == pytest.approx(0.01) and ok.decision_flips == 0
    flip = compare_scores(ref, [0.1, 0.505, 0.7, 0.95], threshold=0.5)  # |d| 0.015 but crosses the threshold
    assert not flip.ok and flip.flipped == (1,) and "FAILS" in flip.summary()
    far = compare_scores(ref, [0.1, 0.49, 0.75, 0.95], threshold=0.5)
    assert not far.ok and far.decision_flips == 0
    assert compare_scores([0.5], [0.5], threshold=0.5).ok  # at the threshold counts as fake on both sides
    with pytest.raises(ValueError):
        compare_scores([0.1], [0.1, 0.2], threshold=0.5)


def test_tensorrt_11_precisions():
    """TensorRT 11 removed weak typing: FP16 needs Model Optimizer's AutoCast, implicit INT8 is gone."""
    assert tensorrt_major("10.7.0.23") == 10 and tensorrt_major("11.4.0") == 11 and tensorrt_major("dev") == 0
    for precision in ("fp32", "fp16", "int8"):
        assert tensorrt_precision_problem("10.16.1", precision, has_modelopt=False) is None
    assert tensorrt_precision_problem("11.4.0", "fp32", has_modelopt=False) is None
    assert tensorrt_precision_problem("11.4.0", "fp16", has_modelopt=True) is None
    assert "Model Optimizer" in tensorrt_precision_problem("11.4.0", "fp16", has_modelopt=False)
    assert "removed INT8 calibration" in tensorrt_precision_problem("11.4.0", "int8", has_modelopt=True)


@needs_meso4
def test_build_on_tensorrt_11_says_what_it_cannot_build(tmp_path: Path):
    with pytest.raises(BackendUnavailable, match="removed INT8 calibration"):
        build_engine(MESO4, precision="int8", cache_dir=tmp_path, availability=gpu_machine(trt="11.4.0"),
                     builder=FakeBuilder())
    built = build_engine(MESO4, precision="fp32", cache_dir=tmp_path, availability=gpu_machine(trt="11.4.0"),
                         builder=FakeBuilder())
    assert built.built and built.key.tensorrt_version == "11.4.0"


def test_precision_problem():
    assert precision_problem("fp16", (9, 0)) is None
    assert precision_problem("int8", (6, 1)) is None
    assert "INT8" in precision_problem("int8", (6, 0))
    assert "FP16" in precision_problem("fp16", (5, 2))
    assert precision_problem("fp32", (3, 0)) is None


# ------------------------------------------------------------------ build_engine's flow, TensorRT's call replaced


def test_build_needs_gpu_tensorrt_and_cuda_python():
    with pytest.raises(BackendUnavailable, match="no CUDA GPU found"):
        require_tensorrt(Availability(reasons={"gpu": "no CUDA GPU found: no driver"}))
    with pytest.raises(BackendUnavailable) as exc:
        require_tensorrt(Availability(has_cuda_gpu=True, gpu=H100))
    assert str(exc.value) == TENSORRT_MISSING and "NVIDIA's index" in str(exc.value) and "GPU image" in str(exc.value)
    with pytest.raises(BackendUnavailable) as exc:
        require_tensorrt(Availability(has_cuda_gpu=True, gpu=H100, has_tensorrt=True, tensorrt_version="10.7.0"))
    assert str(exc.value) == CUDA_PYTHON_MISSING
    assert require_tensorrt(gpu_machine()) == ("10.7.0", (9, 0), "GPU")


@needs_meso4
def test_build_engine_on_this_machine_fails_clearly(tmp_path: Path):
    """The real probe: this machine has no GPU (CI neither), so the error must say so before any work."""
    from streamguard.inference.gpu import probe_availability

    avail = probe_availability()
    if avail.has_cuda_gpu and avail.has_tensorrt:
        pytest.skip("this machine can build engines")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU found|TensorRT is not installed"):
        build_engine(MESO4, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


class FakeBuilder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, onnx_path, card, profile, precision, **kw) -> bytes:
        self.calls.append((Path(onnx_path).name, profile, precision, kw))
        return f"engine {precision} {profile.tag}".encode()


@needs_meso4
def test_build_reuses_then_rebuilds_when_a_key_part_changes(tmp_path: Path):
    builder = FakeBuilder()
    first = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(), builder=builder, max_batch=32)
    assert first.built and first.precision == "fp16" and first.reasons == ["no engine built yet for this model"]
    assert first.path.read_bytes() == b"engine fp16 b1-16-32" and first.path.parent == tmp_path
    assert builder.calls[0][1] == Profile(1, 16, 32)

    again = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(), builder=builder, max_batch=32)
    assert not again.built and again.path == first.path and len(builder.calls) == 1
    assert again.summary().startswith("reused fp16 engine")

    upgraded = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(trt="10.8.0"), builder=builder,
                            max_batch=32)
    assert upgraded.built and upgraded.reasons == ["TensorRT 10.7.0 -> 10.8.0"]
    assert not first.path.exists()  # the stale engine was removed
    assert any("removed stale" in n for n in upgraded.notes)

    other_gpu = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(trt="10.8.0", cc=(8, 9)),
                             builder=builder, max_batch=32, keep_stale=True)
    assert other_gpu.reasons == ["GPU compute capability sm90 -> sm89"] and upgraded.path.exists()

    forced = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(trt="10.8.0", cc=(8, 9)),
                          builder=builder, max_batch=32, force=True)
    assert forced.built and forced.reasons == ["--force"]

    h200 = build_engine(MESO4, cache_dir=tmp_path, availability=gpu_machine(trt="10.8.0", name="NVIDIA H200"),
                        builder=builder, max_batch=32, keep_stale=True)
    assert h200.built and h200.key.gpu_name == "NVIDIA H200" and h200.reasons == ["GPU GPU -> NVIDIA H200"]


@needs_meso4
def test_build_refuses_int8_on_an_old_gpu_and_without_calibration(tmp_path: Path):
    with pytest.raises(BackendUnavailable, match="INT8 needs compute capability"):
        build_engine(MESO4, precision="int8", cache_dir=tmp_path, availability=gpu_machine(cc=(6, 0)),
                     builder=FakeBuilder())
    with pytest.raises(ValueError, match="calibration"):
        build_engine(MESO4, precision="int8", cache_dir=tmp_path, availability=gpu_machine(), builder=FakeBuilder())


def _aligned_crops(shared: Path) -> Path:
    folder = shared / "mesonet" / "test_images"
    if not folder.is_dir():
        pytest.skip(f"needs {folder}")
    return folder


@pytest.mark.shared
@needs_meso4
def test_int8_kept_only_where_it_holds_accuracy(tmp_path: Path, shared_data: Path):
    """INT8 engines are checked on held-out real crops; a checker stands in for running the engine."""
    from streamguard.inference.models import resolve_model
    from streamguard.inference.onnx import OnnxClassifier

    onnx_path, card = resolve_model(str(MESO4))
    reference = OnnxClassifier(onnx_path, card)
    calib = _aligned_crops(shared_data)

    def close_enough(engine_bytes, onnx_path, card, holdout):
        return reference.predict(holdout) + 0.004

    builder = FakeBuilder()
    kept = build_engine(MESO4, precision="int8", calibration=calib, calibration_images_are_crops=True,
                        cache_dir=tmp_path, availability=gpu_machine(), builder=builder, int8_checker=close_enough)
    assert kept.built and kept.precision == "int8" and kept.parity is not None and kept.parity.ok
    assert kept.key.calibration_sha256 and builder.calls[0][2] == "int8"
    batches = builder.calls[0][3]["calibration"]
    assert all(b.shape == batches[0].shape and b.shape[1:] == (3, 256, 256) for b in batches)
    assert list(tmp_path.glob("crops-256px-*.npy"))  # the crop set is cached for the next build
    sidecar = json.loads(kept.path.with_suffix(".json").read_text())
    assert sidecar["int8_parity"]["decision_flips"] == 0

    def flips(engine_bytes, onnx_path, card, holdout):
        s = reference.predict(holdout)
        return np.where(s >= card.threshold, card.threshold - 0.01, card.threshold + 0.01).astype(np.float32)

    fallback = build_engine(MESO4, precision="int8", calibration=calib, calibration_images_are_crops=True,
                            cache_dir=tmp_path / "b", availability=gpu_machine(), builder=FakeBuilder(),
                            int8_checker=flips)
    assert fallback.precision == "fp16" and fallback.built and not fallback.parity.ok
    assert any("INT8 does not hold accuracy" in n for n in fallback.notes)

    with pytest.raises(EngineBuildError, match="INT8 does not hold accuracy"):
        build_engine(MESO4, precision="int8", calibration=calib, calibration_images_are_crops=True,
                     cache_dir=tmp_path / "c", availability=gpu_machine(), builder=FakeBuilder(),
                     int8_checker=flips, int8_fallback=False)


@pytest.mark.shared
@pytest.mark.slow
@needs_meso4
def test_calibration_crops_come_from_real_photos_through_the_face_pipeline(tmp_path: Path, shared_data: Path):
    from streamguard.inference.calibration import load_crop_set, split_holdout
    from streamguard.inference.models import resolve_model

    _, card = resolve_model(str(MESO4))
    photos = sorted((shared_data / "real_faces").glob("img*.jpg"))[:6]
    if len(photos) < 6:
        pytest.skip("needs real face photos in ../shared/data/real_faces")
    crops, sha = load_crop_set(photos, card, tmp_path)
    assert crops.shape == (6, 256, 256, 3) and crops.dtype == np.uint8  # one gated face per photo
    assert crops.std() > 20  # faces, not blank padding
    cached = list(tmp_path.glob("crops-*.npy"))
    assert len(cached) == 1
    again, sha2 = load_crop_set(photos, card, tmp_path)  # from the cache file
    assert sha2 == sha and np.array_equal(again, crops)
    calib, holdout = split_holdout(crops, every=3)
    assert len(calib) == 4 and len(holdout) == 2


@needs_meso4
def test_build_engine_tool_exits_2_with_the_reason_without_a_gpu(tmp_path: Path):
    import subprocess
    import sys

    from streamguard.inference.gpu import probe_availability

    if probe_availability().has_cuda_gpu:
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_engine.py"), str(MESO4), "--cache-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot build a TensorRT engine here: no CUDA GPU found" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_engine.py"), "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr  # a usage error, like a bad flag
