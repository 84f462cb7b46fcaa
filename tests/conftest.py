import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The MesoNet authors' models, which several tests compare against. Their weights live in ../shared and nothing
# from there is committed: they are imported into engines/ (git-ignored names) once per machine, before any test
# runs, so in-process services and `streamguard` subprocesses alike find them by name.
MESONET_MODELS = {
    "mesonet-meso4-df": ("Meso4_DF.h5", "meso4"),
    "mesonet-meso4-f2f": ("Meso4_F2F.h5", "meso4"),
    "mesonet-inception-df": ("MesoInception_DF.h5", "mesoinception"),
    "mesonet-inception-f2f": ("MesoInception_F2F.h5", "mesoinception"),
}


def pytest_sessionstart(session: pytest.Session) -> None:
    weights = SHARED_DATA / "mesonet" / "weights"
    if not weights.is_dir():
        return  # tests that need them skip (they need ../shared for their media too)
    from streamguard.inference.importers import import_mesonet

    for name, (h5, arch) in MESONET_MODELS.items():
        onnx_path = REPO / "engines" / f"{name}.onnx"
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
