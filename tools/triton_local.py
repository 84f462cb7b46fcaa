#!/usr/bin/env python
"""A real Triton Inference Server on this machine's CPU: the `tritonserver` that PyPI's nvidia-pytriton bundles.

    python tools/triton_local.py REPOSITORY [--grpc-port 8001]     # serve until Ctrl-C
    streamguard triton layout out/triton-repo --runtime python     # a repository it can serve

That build has only the Python backend, so the repository's models are Python-backend models that run ONNX Runtime
(`--runtime python`). Two things make its Python backend work with any CPython it has a stub for (3.8-3.13):
- its stub links `libpython3.X.so.1.0` by name and gets whichever the loader finds first, such as Debian's 3.11.2
  under pyenv's 3.11.7, whose standard library then fails (`'_thread.RLock' object has no attribute
  '_recursion_count'`): LD_LIBRARY_PATH starts with this interpreter's own LIBDIR, so stub and library match;
- the stub ignores PYTHONPATH, which model.py honours itself: this interpreter's site-packages come first (its
  numpy<2, as the stub's bindings need, and onnxruntime).
Used by the tests (tests/test_triton.py) and tools/bench_triton.py; `LocalTriton.unavailable()` says why it cannot
run here (no wheel, no stub for this Python, a static libpython).

TRITON_SERVER_DIR=/opt/tritonserver (inside NVIDIA's tritonserver image, which has the onnxruntime and tensorrt
backends and CUDA) runs that full build instead: what tools/gpu_check.sh does on a GPU machine that has it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class Distribution:
    server: Path  # bin/tritonserver
    backends: Path  # backends/ (nvidia-pytriton's: python only)
    stub: Path | None  # nvidia-pytriton: the Python backend stub for this interpreter (a full build has its own)
    libs: Path  # the server's own shared libraries
    libpython_dir: Path  # this interpreter's libpython3.X.so.1.0

    @property
    def full(self) -> bool:
        """A full Triton build (TRITON_SERVER_DIR), not nvidia-pytriton's Python-backend-only one."""
        return self.stub is None


def find_distribution() -> tuple[Distribution | None, str]:
    """TRITON_SERVER_DIR's server, else nvidia-pytriton's for this interpreter; or (None, why not)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    if os.environ.get("TRITON_SERVER_DIR"):
        home = Path(os.environ["TRITON_SERVER_DIR"])
        if not (home / "bin" / "tritonserver").is_file():
            return None, f"TRITON_SERVER_DIR={home} has no bin/tritonserver"
        return Distribution(home / "bin" / "tritonserver", home / "backends", None, home / "lib", libdir), ""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None, "nvidia-pytriton is not installed (it comes with the [test] extra)"
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so.1.0"
    if not (dist / "bin" / "tritonserver").is_file():
        return None, f"no tritonserver binary in {dist}"
    if not stub.is_file():
        return None, f"nvidia-pytriton has no Python backend stub for Python {version}"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / ldlibrary).is_file():
        return None, f"this Python has no shared {ldlibrary} (built without --enable-shared): the stub needs it"
    return Distribution(dist / "bin" / "tritonserver", dist / "backends", stub, root.parent / "nvidia_pytriton.libs",
                        libdir), ""


@dataclass
class LocalTriton:
    """`tritonserver` on 127.0.0.1 with gRPC only; start(), kill() (SIGKILL), pause() (SIGSTOP), resume(), stop()."""

    repository: Path
    grpc_port: int = 0  # 0: a free port, chosen once (a restart keeps it)
    model_config_name: str | None = None
    log_path: Path | None = None
    workdir: Path | None = None  # the backends copy and the log; default: a temporary folder, removed by close()
    process: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="streamguard-triton-"))
        self.grpc_port = self.grpc_port or _free_port()
        # The Python backend names its shared-memory regions with this prefix: a killed server's are found by it.
        self._shm_prefix = f"streamguard-triton-{uuid.uuid4().hex[:12]}-"
        self.log_path = self.log_path or self.workdir / "tritonserver.log"

    @staticmethod
    def unavailable() -> str | None:
        """Why the bundled server cannot run here (None: it can): not installed, no stub, or the binary fails."""
        dist, why = find_distribution()
        if dist is None:
            return why
        env = {**os.environ, "LD_LIBRARY_PATH": str(dist.libs)}
        try:  # glibc older than the wheel's manylinux_2_35, another CPU architecture...
            res = subprocess.run([str(dist.server), "--help"], env=env, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            return f"{dist.server} does not run here: {exc}"
        if "Usage: tritonserver" not in res.stdout + res.stderr:
            return f"{dist.server} does not run here: {(res.stderr or res.stdout).strip()[:300]}"
        return None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _backends(self, dist: Distribution) -> Path:
        """A backends/ folder with the stub of this Python beside the backend, where the backend looks for it."""
        if dist.stub is None:
            return dist.backends
        assert self.workdir is not None
        target = self.workdir / "backends"
        if not (target / "python" / "triton_python_backend_stub").is_file():
            shutil.copytree(dist.backends, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(dist.stub, target / "python" / "triton_python_backend_stub")
        return target

    def command(self) -> tuple[list[str], dict[str, str]]:
        dist, why = find_distribution()
        if dist is None:
            raise RuntimeError(why)
        cmd = [str(dist.server), f"--model-repository={self.repository}", f"--backend-directory={self._backends(dist)}",
               f"--grpc-port={self.grpc_port}", "--allow-http=false", "--allow-metrics=false",
               "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(dist.libpython_dir), str(dist.libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        site = [p for p in sys.path if p.endswith("site-packages")]
        env["PYTHONPATH"] = os.pathsep.join([*site, *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("OMP_NUM_THREADS", "1")
        return cmd, env

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until every model is ready; RuntimeError with the log's tail when it does not come up."""
        import tritonclient.grpc as grpcclient

        cmd, env = self.command()
        assert self.log_path is not None
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
            self.kill()
            raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        assert self.log_path is not None
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)  # its own session: the Python backend's stubs go with it

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing, as a hung or overloaded one."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to clients; leaves nothing behind in /dev/shm."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)  # a paused process group dies on SIGKILL too, but stubs may wait on it
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._remove_shm()

    def stop(self) -> None:
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._remove_shm()

    def close(self) -> None:
        self.stop()
        assert self.workdir is not None
        shutil.rmtree(self.workdir if self._own_workdir else self.workdir / "backends", ignore_errors=True)

    def _remove_shm(self) -> None:
        for path in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repository", type=Path)
    p.add_argument("--grpc-port", type=int, default=8001)
    args = p.parse_args(argv)
    server = LocalTriton(args.repository.resolve(), grpc_port=args.grpc_port)
    server.start()
    print(f"tritonserver ready on {server.url} (gRPC); log: {server.log_path}; Ctrl-C stops it", flush=True)
    try:
        assert server.process is not None
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
