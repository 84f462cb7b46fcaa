"""CLI behaviour that needs no media: commands exist, and machines without a GPU get a clear exit."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.inference.gpu import probe_availability

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_engine_build_without_gpu_exits_2_with_reason():
    if probe_availability().has_cuda_gpu:
        import pytest

        pytest.skip("this machine has a GPU: the no-GPU path is not reachable")
    result = runner.invoke(app, ["engine", "build", "mesonet-meso4-df"])
    assert result.exit_code == 2
    assert "cannot build a TensorRT engine here" in result.output


def test_build_engine_recipe_is_the_cli():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_engine.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--precision" in proc.stdout


def test_models_list_shows_shipped_models():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "mesonet-meso4-df" in result.output


def test_unknown_import_kind_is_refused():
    result = runner.invoke(app, ["models", "import", "resnet", "x.pth"])
    assert result.exit_code == 2
    assert "unknown kind" in result.output
