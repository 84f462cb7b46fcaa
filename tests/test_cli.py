"""CLI behaviour that needs no media: commands exist, and machines without a GPU get a clear exit."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.inference.gpu import probe_availability

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_engine_build_without_gpu_exits_2_with_reason():
    if probe_availability().has_cuda_gpu:
        import pytest

        pytest.skip("this machine has a GPU: the no-GPU path is not reachable")
    result = runner.invoke(app, ["engine", "build", "streamguard-sbi"])
    assert result.exit_code == 2
    assert "cannot build a TensorRT engine here" in result.output


def test_build_engine_recipe_is_the_cli():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_engine.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--precision" in proc.stdout


def test_models_list_shows_shipped_models():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "streamguard-sbi" in result.output


def test_unknown_import_kind_is_refused():
    result = runner.invoke(app, ["models", "import", "resnet", "x.pth"])
    assert result.exit_code == 2
    assert "unknown kind" in result.output


# What a config error must not wait for: each takes from a tenth of a second (cv2) to seconds (mediapipe) to import.
HEAVY = {"mediapipe", "onnxruntime", "aiortc", "av", "cv2", "scipy", "fastapi", "uvicorn", "torch"}


def imported(importtime_log: str) -> set[str]:
    """Top-level packages named in `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:")} - {"package"}


@pytest.mark.parametrize(("config_text", "args", "named"), [
    ("sampling:\n  fps: -1\n", [], "sampling.fps"),  # a bad value
    ("sampling:\n  fsp: 1\n", [], "sampling.fsp"),  # an unknown key
    ("sampling: [\n", [], "line 2"),  # not YAML
    (None, [], "no such file"),  # --config names no file
    ("port: 8080\n", ["--model", "no-such-model"], "model 'no-such-model' not found"),
])
def test_serve_reports_a_config_error_before_importing_the_server(tmp_path, config_text, args, named):
    config = tmp_path / "streamguard.yaml"
    if config_text is not None:
        config.write_text(config_text)
    from serve_helpers import child_env

    env = child_env()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "streamguard.cli", "serve", "--config",
                           str(config), *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert any(named in line for line in message), message
    assert "Traceback" not in proc.stderr
    assert not imported(proc.stderr) & HEAVY
    assert not (tmp_path / "streamguard-data").exists()  # nothing was started
