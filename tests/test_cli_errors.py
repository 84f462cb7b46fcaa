"""Every bad input to the CLI gets a precise error naming the option or setting (exit 2 for usage errors), never a
traceback, and is reported before any work is done; an output that cannot be written at the end loses nothing."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from streamguard import cli
from streamguard.cli import app

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "engines" / "streamguard-sbi.onnx"
runner = CliRunner()
# What a serve error found before the server starts must not wait for (seconds to import on a small machine).
HEAVY = {"mediapipe", "onnxruntime", "aiortc", "av", "cv2", "scipy", "fastapi", "uvicorn", "torch"}


def plain(output: str) -> str:
    """CLI output with rich's panel borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def clean_env(**extra: str) -> dict[str, str]:
    from serve_helpers import child_env

    return child_env(**extra)


def imported(importtime_log: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:")} - {"package"}


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "streamguard.cli", "serve", *args],
                          capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd=tmp_path)


def messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.fixture
def model_090(tmp_path: Path) -> Path:
    """A copy of the shipped model whose card says threshold 0.9 and no live thresholds (derived from 0.9)."""
    if not SHIPPED.is_file():
        pytest.skip(f"needs {SHIPPED}")
    onnx = tmp_path / "models" / "m.onnx"
    onnx.parent.mkdir()
    shutil.copy(SHIPPED, onnx)
    card = json.loads(SHIPPED.with_suffix(".json").read_text())
    onnx.with_suffix(".json").write_text(json.dumps({**card, "threshold": 0.9, "raise_threshold": None,
                                                       "clear_threshold": None}))
    return onnx


# -- serve: startup problems are CLI errors before the server starts ---------------------------------------------------


def test_serve_data_dir_that_is_a_file(tmp_path: Path):
    (tmp_path / "data").write_text("not a folder")
    proc = serve(tmp_path, "--data-dir", "data")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: data_dir: data exists and is not a folder") and "--data-dir" in line
               for line in messages(proc.stderr)), messages(proc.stderr)
    assert "Traceback" not in proc.stderr and "streamguard ready" not in proc.stderr
    assert not imported(proc.stderr) & HEAVY


def test_serve_data_dir_that_cannot_be_created(tmp_path: Path):
    proc = serve(tmp_path, "--data-dir", "/proc/streamguard-no-such-dir")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: data_dir: cannot create the folder /proc/streamguard-no-such-dir")
               for line in messages(proc.stderr)), messages(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_serve_data_dir_under_a_file(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    proc = serve(tmp_path, "--data-dir", "file/data")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: data_dir: cannot create the folder file/data")
               for line in messages(proc.stderr)), messages(proc.stderr)


def test_serve_raise_threshold_below_the_cards_threshold(tmp_path: Path, model_090: Path):
    proc = serve(tmp_path, "--model", str(model_090), env=clean_env(STREAMGUARD_SCORING__RAISE_THRESHOLD="0.5"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [line for line in messages(proc.stderr) if line.startswith("error:")]
    assert line.startswith("error: scoring.raise_threshold: need 0 < clear_threshold (0.900) < raise_threshold "
                           "(0.500) < 1"), line
    assert "STREAMGUARD_SCORING__RAISE_THRESHOLD" in line
    assert "Traceback" not in proc.stderr
    assert not imported(proc.stderr) & HEAVY  # found from the card alone, before the model is loaded
    assert not (tmp_path / "streamguard-data").exists()


def test_serve_clear_threshold_above_the_derived_raise_threshold(tmp_path: Path, model_090: Path):
    config = tmp_path / "sg.yaml"
    config.write_text("scoring:\n  clear_threshold: 0.97\n")  # derived raise: 0.9 + 0.4 * 0.1 = 0.94
    proc = serve(tmp_path, "--config", str(config), "--model", str(model_090))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: scoring.clear_threshold: ") for line in messages(proc.stderr))


def test_serve_port_in_use(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(tmp_path, "--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith(f"error: port: cannot listen on 127.0.0.1:{port}: the port is in use")
               and "--port" in line for line in messages(proc.stderr)), messages(proc.stderr)
    assert "streamguard ready" not in proc.stderr and "Traceback" not in proc.stderr
    assert not imported(proc.stderr) & HEAVY


def test_serve_host_not_on_this_machine(tmp_path: Path):
    # 192.0.2.0/24 is TEST-NET-1: never a local address. A token, or a public host falls back to 127.0.0.1.
    proc = serve(tmp_path, "--host", "192.0.2.1", env=clean_env(STREAMGUARD_TOKEN="t0ken"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: host: cannot listen on '192.0.2.1'") for line in messages(proc.stderr))


def test_serve_serves_on_the_socket_it_checked(tmp_path: Path):
    """The bound socket is handed to uvicorn: the service answers there, says where, and stops cleanly."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamguard.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["status"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.3)
        assert (tmp_path / "data" / "events.sqlite3").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out


# -- scan and eval: output paths checked first, results never lost -----------------------------------------------------


@pytest.mark.parametrize(("args", "option", "says"), [
    (["--json", "{tmp}"], "--json", "is a folder"),
    (["--json", "/nonexist-streamguard/x.json"], "--json", "the folder /nonexist-streamguard does not exist"),
    (["--json", "{file}/x.json"], "--json", "is not a folder"),
    (["--heatmaps", "{file}"], "--heatmaps", "exists and is not a folder"),
    (["--heatmaps", "/proc/streamguard-heat"], "--heatmaps", "cannot create the folder /proc/streamguard-heat"),
    (["--heatmaps", "{tmp}/heat", "--heatmap-method", "gradcam"], "--heatmap-method",
     "'gradcam' is not one of model, occlusion"),
])
def test_scan_refuses_unwritable_outputs_before_scanning(tmp_path: Path, monkeypatch, args, option, says):
    (tmp_path / "file").write_text("x")
    args = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in args]
    monkeypatch.setattr(cli, "_load_model",
                        lambda _: pytest.fail("the model was loaded before the options were checked"))
    result = runner.invoke(app, ["scan", str(tmp_path / "img.jpg"), *args, "-q"])
    assert result.exit_code == 2, result.output
    text = plain(result.output)
    assert f"Invalid value for {option}" in text and says in text, text
    assert isinstance(result.exception, SystemExit)  # no traceback


def test_eval_refuses_an_out_that_is_a_file(tmp_path: Path, monkeypatch):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.jpg,real\n")
    (tmp_path / "out").write_text("x")
    monkeypatch.setattr(cli, "_load_model", lambda _: pytest.fail("the model was loaded before --out was checked"))
    result = runner.invoke(app, ["eval", str(labels), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --out" in plain(result.output) and "exists and is not a folder" in plain(result.output)


@pytest.fixture
def noise_png(tmp_path: Path) -> Path:
    path = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), np.uint8), (0, 0), 5))
    return path


def test_scan_report_that_cannot_be_written_is_saved_elsewhere(tmp_path: Path, noise_png: Path, monkeypatch):
    if not SHIPPED.is_file():
        pytest.skip(f"needs {SHIPPED}")

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_atomic", full_disk)
    monkeypatch.setattr(cli.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["scan", str(noise_png), "--json", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert not out.exists()
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: --json"))
    assert f"cannot write {out}: No space left on device; saved it to " in line
    saved = Path(line.rsplit("saved it to ", 1)[1].removesuffix(" instead"))
    assert saved.parent == tmp_path / "tmp"
    assert json.loads(saved.read_text())["files"][0]["path"] == str(noise_png)


def test_eval_names_the_files_that_failed_and_exits_1(tmp_path: Path, noise_png: Path):
    if not SHIPPED.is_file():
        pytest.skip(f"needs {SHIPPED}")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\nmissing-1.jpg,real\nmissing-2.mp4,fake\n{noise_png.name},real\n")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(labels), "--out", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert "errors: 2" in result.stdout
    errors = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("error:")]
    assert len(errors) == 2 and "missing-1.jpg" in errors[0] and "missing-2.mp4" in errors[1], result.stdout
    report = json.loads((out / "eval.json").read_text())  # the report is still written
    assert report["errors"] == 2 and len(report["rows"]) == 3


# -- models import: garbage is "not a PyTorch checkpoint" --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["deepware", "selimsef", "icpr2020dfdc", "sbi"])
def test_import_of_a_text_file_is_not_a_checkpoint(tmp_path: Path, kind: str):
    pytest.importorskip("torch")
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nthis is text, not a checkpoint\n")
    result = runner.invoke(app, ["models", "import", kind, str(text), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "notes.txt is not a PyTorch checkpoint" in plain(result.output)
    assert not (tmp_path / "m.onnx").exists()


def test_import_of_random_bytes_is_not_a_checkpoint(tmp_path: Path):
    pytest.importorskip("torch")
    from streamguard.inference.importers.checkpoints import CheckpointError, load_checkpoint

    rng = np.random.default_rng(1)
    for i in range(20):
        junk = tmp_path / f"junk{i}.pth"
        junk.write_bytes(b"\x80\x02" + rng.integers(0, 256, 64 + 37 * i, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
            load_checkpoint("sbi", junk)


# -- models and engine build ----------------------------------------------------------------------------------------


def test_model_without_its_card_says_so(tmp_path: Path):
    onnx = tmp_path / "fake.onnx"
    onnx.write_bytes(b"not really onnx")
    result = runner.invoke(app, ["scan", str(tmp_path / "x.jpg"), "--model", str(onnx)])
    assert result.exit_code == 2
    text = plain(result.output)
    assert "Invalid value for --model" in text and "has no model card" in text and "fake.json" in text, text
    assert "not found" not in text


def test_engine_build_unknown_model_is_a_usage_error():
    result = runner.invoke(app, ["engine", "build", "nope"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for MODEL" in plain(result.output) and "model 'nope' not found" in plain(result.output)


@pytest.mark.parametrize(("args", "option", "says"), [
    (["--max-batch", "0"], "--max-batch", "got 0"),
    (["--max-batch", "4", "--opt-batch", "16"], "--opt-batch", "1..max_batch (4), got 16"),
    (["--precision", "int4"], "--precision", "use fp32, fp16 or int8"),
    (["--precision", "int8"], "--calibration", "INT8 needs a folder of real face photos"),
    (["--precision", "int8", "--calibration", "/nonexist-calib"], "--calibration", "no such folder"),
    (["--tolerance", "-0.1"], "--tolerance", "0..1"),
    (["--workspace-gb", "0"], "--workspace-gb", "must be > 0"),
])
def test_engine_build_checks_flags_before_the_gpu(monkeypatch, args, option, says):
    import streamguard.inference.engine_build as engine_build

    monkeypatch.setattr(engine_build, "probe_availability", lambda: pytest.fail("the GPU was probed first"))
    result = runner.invoke(app, ["engine", "build", "streamguard-sbi", *args])
    assert result.exit_code == 2, result.output
    text = plain(result.output)
    assert f"Invalid value for {option}" in text and says in text, text


def test_engine_build_help_has_one_fallback_flag():
    result = runner.invoke(app, ["engine", "build", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    assert "--no-int8-fallback" in result.output and "--no-no-int8-fallback" not in result.output


def test_engine_build_no_int8_fallback_reaches_build_engine(monkeypatch):
    import streamguard.inference.engine_build as engine_build

    seen = {}

    def fake_build(model, **kw):
        seen.update(kw)
        raise engine_build.EngineBuildError("stop here")

    monkeypatch.setattr(engine_build, "build_engine", fake_build)
    for flags, expected in (([], True), (["--no-int8-fallback"], False), (["--int8-fallback"], True)):
        result = runner.invoke(app, ["engine", "build", "streamguard-sbi", *flags])
        assert result.exit_code == 1 and "stop here" in result.output
        assert seen["int8_fallback"] is expected


def test_models_list_says_the_input_size_once():
    from streamguard.inference.models import available_models, resolve_model

    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in available_models():
        size = resolve_model(name)[1].preprocess.input_size
        (line,) = [line for line in lines if line.startswith(name + " ")]
        assert line.count(f"input {size}") == 1 and f"input={size}" not in line, line
