"""Where an importer writes its model: shared by every importer so the rules (and messages) stay the same."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from streamguard.inference import models

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_output(
    output: Path | None,
    name: str | None,
    default_name: Callable[[], str],
    error: type[ValueError] = ValueError,
) -> tuple[Path, str]:
    """(ONNX path, model name): `output` as given (its stem names the model unless `name` does), else
    `<engines>/<name>.onnx` with `name` or `default_name()`, which must be usable as a file name.

    Raises `error` (an importer's own ValueError subclass) for an output that is not .onnx or a bad name.
    """
    if output is not None:
        onnx_path = Path(output)
        if onnx_path.suffix != ".onnx":
            raise error(f"output must be a path ending in .onnx, got {onnx_path}")
        return onnx_path, name or onnx_path.stem
    name = name or default_name()
    if not _NAME_RE.fullmatch(name):
        raise error(f"model name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a file name)")
    return Path(models.ENGINES_DIR) / f"{name}.onnx", name  # looked up at call time so tests can redirect it
