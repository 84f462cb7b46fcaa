import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The MesoNet authors' models, which several tests compare against. Their weights live in ../shared and nothing
# from there is committed. Tests write only to temporary folders: the models are imported into a temporary
# engines folder made for this session (beside links to the shipped models), and STREAMGUARD_ENGINES points every
# in-process service and `streamguard` subprocess at it; engine builds go to its cache/. engines/ stays as checked
# out (an import landing there would show up in `streamguard models list`).
MESONET_MODELS = {
    "mesonet-meso4-df": ("Meso4_DF.h5", "meso4"),
    "mesonet-meso4-f2f": ("Meso4_F2F.h5", "meso4"),
    "mesonet-inception-df": ("MesoInception_DF.h5", "mesoinception"),
    "mesonet-inception-f2f": ("MesoInception_F2F.h5", "mesoinception"),
}
_ENGINES_TMP: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module imports streamguard (models.ENGINES_DIR is read at import): the session's engines."""
    global _ENGINES_TMP
    if "STREAMGUARD_ENGINES" in os.environ:  # the caller chose a folder: use it as it is
        return
    _ENGINES_TMP = Path(tempfile.mkdtemp(prefix="streamguard-test-engines-"))
    for shipped in (REPO / "engines").glob("*.onnx"):
        for path in (shipped, shipped.with_suffix(".json")):
            if path.is_file():
                (_ENGINES_TMP / path.name).symlink_to(path)
    os.environ["STREAMGUARD_ENGINES"] = str(_ENGINES_TMP)
    os.environ.setdefault("STREAMGUARD_ENGINE_CACHE", str(_ENGINES_TMP / "cache"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ENGINES_TMP is not None:
        shutil.rmtree(_ENGINES_TMP, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    weights = SHARED_DATA / "mesonet" / "weights"
    if not weights.is_dir():
        return  # tests that need them skip (they need ../shared for their media too)
    from streamguard.inference.importers import import_mesonet

    engines = Path(os.environ["STREAMGUARD_ENGINES"])
    for name, (h5, arch) in MESONET_MODELS.items():
        onnx_path = engines / f"{name}.onnx"
        if not (onnx_path.is_file() and onnx_path.with_suffix(".json").is_file()):
            import_mesonet(weights / h5, arch, output=onnx_path, name=name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared test data at {SHARED_DATA} (absent in a user's clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def media():
    """tools/make_test_media.py (the tools folder is not a package)."""
    from serve_helpers import media_tool

    return media_tool()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers: a hung camera."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                held.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()
