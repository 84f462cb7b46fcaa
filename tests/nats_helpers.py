"""A real NATS server with JetStream for the cluster tests: Debian's `nats-server` (2.9), run with `-js`.

`NatsServer` starts one on a free port with its own store folder, and can be stopped (SIGTERM) or killed (SIGKILL)
and started again on the same port and store. `log_messages` reads a JetStream stream from its start
with the server's own API (a direct `get_msg` per seq), independent of the code under test.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


HAS_NATS_PY = importlib.util.find_spec("nats") is not None

needs_nats_py = pytest.mark.skipif(not HAS_NATS_PY, reason="needs nats-py: pip install -e '.[cluster]'")
needs_nats = pytest.mark.skipif(
    not (HAS_NATS_PY and Path(NATS_SERVER).is_file()),
    reason="needs nats-server (Debian package nats-server, tools/install_test_deps.sh) and nats-py ('.[cluster]')",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = store.parent / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server's output, for failures
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                      "-sd", str(self.store)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    if conn.recv(4096).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server not ready on {self.port}: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, as a restart by an operator or an orchestrator does: the server flushes its store and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


async def log_messages(url: str, stream: str) -> list[dict[str, Any]]:
    """Every message of `stream`, oldest first: {"seq", "subject", "msg_id", "event"} (event: the JSON body)."""
    import json

    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        out = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append({"seq": msg.seq, "subject": msg.subject, "msg_id": (msg.headers or {}).get("Nats-Msg-Id"),
                        "event": json.loads(msg.data or b"{}")})
        return out
    finally:
        await nc.close()
