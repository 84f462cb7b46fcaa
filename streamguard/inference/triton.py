"""Triton backend: every batch from the batcher is one gRPC request to NVIDIA Triton Inference Server, which batches
requests from many StreamGuard instances together on its GPUs (dynamic batching).

The model card travels with the model: `streamguard triton layout` writes it into the model's config.pbtxt as the
parameter `streamguard_card`, and this backend reads it from the server's model configuration at start. So every
instance preprocesses, thresholds and reads the output the way the served model needs, whatever its local files are.

Outages. A batch that fails or misses its deadline (`triton.timeout_s`) marks Triton down: the service turns
degraded (a `service.degraded` event through `watch_health`), and until Triton answers again batches go to
`triton.fallback` at once, without touching the network:
- `local`: the local ONNX Runtime model scores them. It must be the model Triton serves (same card sha256), which
  is checked at start: the same scores, only slower and on this machine's CPU.
- `unscored`: `predict` raises InferenceUnavailable; the worker marks those faces seen but unscored.
A probe thread asks Triton every `triton.retry_interval_s` (model ready, same card, one real inference within the
deadline) and, once it answers, later batches go to Triton again and the service is no longer degraded.
Triton down at start: after `triton.connect_timeout_s` the service starts degraded, on the local model's card.

Everything that waits on the network runs in the batcher's worker thread, the start's thread or the probe thread,
never on the event loop. Header values (credentials) never reach a log line, an error or a metric.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamguard.config import TritonSettings
from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import CPU_CALL_BATCH, Classifier, InferenceUnavailable, preprocess, to_p_fake
from streamguard.inference.gpu import BackendUnavailable

log = logging.getLogger(__name__)

CARD_PARAMETER = "streamguard_card"  # the config.pbtxt parameter that carries the model card (JSON)
TRITONCLIENT_MISSING = ("tritonclient is not installed: `pip install 'streamguard[triton]'` (tritonclient[grpc])")

HealthListener = Callable[[bool, str], None]  # (healthy, why): called from the thread that saw the change


@dataclass(frozen=True, slots=True)
class RemoteModel:
    """What the server's model configuration says about the served model."""

    name: str
    card: ModelCard
    input_name: str
    output_name: str
    max_batch_size: int


def import_grpcclient() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as exc:
        raise BackendUnavailable(f"{TRITONCLIENT_MISSING} ({exc})") from None
    return grpcclient


def remote_model(config: dict) -> RemoteModel:
    """Parse `get_model_config(as_json=True)["config"]`; ValueError says what a StreamGuard model lacks."""
    name = config.get("name", "?")
    raw = config.get("parameters", {}).get(CARD_PARAMETER, {}).get("string_value")
    if not raw:
        raise ValueError(f"Triton model {name!r} has no {CARD_PARAMETER!r} parameter in its config.pbtxt (lay the "
                         "repository out with `streamguard triton layout`)")
    card = ModelCard.model_validate(json.loads(raw))
    inputs, outputs = config.get("input", []), config.get("output", [])
    if len(inputs) != 1 or not outputs:
        raise ValueError(f"Triton model {name!r} must have one input and an output, has {len(inputs)} and "
                         f"{len(outputs)}")
    size, layout = card.preprocess.input_size, card.preprocess.layout
    expected = [3, size, size] if layout == "NCHW" else [size, size, 3]
    dims = [int(d) for d in inputs[0].get("dims", [])]
    if inputs[0].get("data_type") != "TYPE_FP32" or len(dims) != 3 \
            or any(d not in (e, -1) for d, e in zip(dims, expected, strict=True)):
        raise ValueError(f"Triton model {name!r}: input {inputs[0].get('name')!r} is {inputs[0].get('data_type')} "
                         f"{dims}, but its card says FP32 {expected} ({layout})")
    return RemoteModel(name, card, inputs[0]["name"], outputs[0]["name"], int(config.get("max_batch_size", 0)))


def same_model(a: ModelCard, b: ModelCard) -> bool:
    """The same weights: equal ONNX sha256 where both cards have one, else the same name and version."""
    if a.sha256 and b.sha256:
        return a.sha256 == b.sha256
    return (a.name, a.version) == (b.name, b.version)


def describe_error(exc: BaseException) -> str:
    """A transport or server error in words: gRPC status and message (never the request's metadata)."""
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    if callable(status) and callable(message):  # tritonclient's InferenceServerException
        code = str(status() or "").removeprefix("StatusCode.")
        text = str(message() or "").strip()
        return f"{code}: {text}" if code else text
    return f"{type(exc).__name__}: {exc}"


class TritonClassifier:
    """The `Classifier` of a model served by Triton. Thread-safe: gRPC channels are, and the state has a lock."""

    backend = "triton"

    def __init__(self, settings: TritonSettings, card: ModelCard, *, model_name: str, max_batch: int,
                 local: Classifier | None = None, remote: RemoteModel | None = None, down_reason: str | None = None):
        self.settings = settings
        self.card = card
        self.model_name = model_name
        self.max_batch = max_batch
        self.local = local
        self._grpc = import_grpcclient()
        self._headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        self._client = self._new_client()
        self._remote = remote
        self._lock = threading.Lock()
        self._listeners: list[HealthListener] = []
        self._reason = down_reason or ""
        self._healthy = remote is not None and down_reason is None
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self.remote_batches = self.fallback_batches = 0
        if not self._healthy:
            self._start_prober()

    # -- the Classifier protocol ------------------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        return self.card.preprocess.input_size

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), np.float32)
        x = preprocess(crops, self.card)  # bad crops are the caller's error, not an outage: raised here
        if self._healthy:
            try:
                scores = self._infer_all(x)
                self.remote_batches += 1
                return scores
            except Exception as exc:  # down, slow, or broken: this batch falls back, the service turns degraded
                self._mark_down(f"Triton at {self.settings.url}: {describe_error(exc)}")
        self.fallback_batches += 1
        if self.local is None:
            raise InferenceUnavailable(f"{self._reason}; faces unscored (triton.fallback: unscored)")
        return self.local.predict(crops)

    # -- health -----------------------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def degraded_reason(self) -> str | None:
        """Why batches do not go to Triton now (None: they do); backend selection reports it at start."""
        return None if self._healthy else self._describe_down(self._reason)

    def watch_health(self, listener: HealthListener) -> None:
        """Call `listener(healthy, why)` now with the current state, then on every change (from any thread)."""
        with self._lock:
            self._listeners.append(listener)
            healthy, why = self._healthy, self._health_words()
        listener(healthy, why)

    def close(self) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(timeout=self.settings.timeout_s + 5.0)
        self._client.close()

    def _describe_down(self, reason: str) -> str:
        instead = ("scoring on the local model" if self.local is not None
                   else "faces unscored (triton.fallback: unscored)")
        return f"{reason}; {instead} until it answers"

    def _health_words(self) -> str:
        if self._healthy:
            return f"scoring on Triton at {self.settings.url} (model {self.model_name})"
        return self._describe_down(self._reason)

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            if not self._healthy:
                return
            self._healthy, self._reason = False, reason
            listeners, words = list(self._listeners), self._health_words()
        log.warning("inference degraded: %s", words)
        for listener in listeners:
            listener(False, words)
        self._start_prober()

    def _mark_up(self, client: Any, remote: RemoteModel) -> None:
        with self._lock:
            old, self._client, self._remote = self._client, client, remote
            self._healthy, self._reason = True, ""
            listeners, words = list(self._listeners), self._health_words()
        old.close()
        log.warning("inference recovered: %s", words)
        for listener in listeners:
            listener(True, words)

    def _start_prober(self) -> None:
        with self._lock:
            if self._stop.is_set() or (self._prober is not None and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._probe_loop, name="streamguard-triton-probe", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.settings.retry_interval_s):
            # A fresh channel each time: an old one may sit in gRPC's reconnect backoff (up to minutes) after an
            # outage, failing every call at once although the server is back.
            client = self._new_client()
            try:
                remote = self.check(client)
            except Exception as exc:
                client.close()
                with self._lock:
                    self._reason = f"Triton at {self.settings.url}: {describe_error(exc)}"
                log.debug("Triton probe failed: %s", self._reason)
                continue
            if self._stop.is_set():  # closed while this probe ran
                client.close()
                return
            self._mark_up(client, remote)
            return

    # -- talking to Triton ------------------------------------------------------------------------------------------

    def _new_client(self) -> Any:
        return make_client(self.settings)

    def check(self, client: Any) -> RemoteModel:
        """The model is ready, serves this instance's model and batch size, and answers one crop in time."""
        remote = fetch_model(client, self.model_name, self.settings, self._headers)
        problem = model_problem(remote, self.card, self.max_batch)
        if problem:
            raise ValueError(problem)
        size = self.input_size
        self._infer(client, remote, preprocess(np.zeros((1, size, size, 3), np.uint8), self.card))
        return remote

    def _infer_all(self, x: np.ndarray) -> np.ndarray:
        """The batcher's batches fit the served max_batch_size (checked at start): one request each. Larger calls
        (occlusion heatmaps) are split rather than refused by Triton, which would read as an outage."""
        client, remote = self._client, self._remote
        assert remote is not None  # healthy implies a remote model
        step = remote.max_batch_size or len(x)
        parts = [self._infer(client, remote, x[i:i + step]) for i in range(0, len(x), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, client: Any, remote: RemoteModel, x: np.ndarray) -> np.ndarray:
        """One request: x is the preprocessed float32 batch."""
        inp = self._grpc.InferInput(remote.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        timeout = self.settings.timeout_s
        result = client.infer(
            remote.name, [inp], model_version=self.settings.model_version,
            outputs=[self._grpc.InferRequestedOutput(remote.output_name)], headers=self._headers,
            client_timeout=timeout, timeout=int(timeout * 1e6),  # server side too: drop it from the queue past then
        )
        raw = result.as_numpy(remote.output_name)
        if raw is None or raw.shape[0] != len(x):
            shape = None if raw is None else raw.shape
            raise ValueError(f"Triton returned {remote.output_name!r} of shape {shape} for {len(x)} crops")
        return to_p_fake(raw, self.card)


def make_client(settings: TritonSettings) -> Any:
    """A gRPC client (tritonclient reads the PEM files itself). Creating one does not connect."""
    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    return import_grpcclient().InferenceServerClient(
        settings.url, ssl=settings.ssl, root_certificates=text(settings.root_certificates),
        private_key=text(settings.private_key), certificate_chain=text(settings.certificate_chain))


def fetch_model(client: Any, name: str, settings: TritonSettings, headers: dict[str, str]) -> RemoteModel:
    """The served model's configuration, once the server says it is ready (raises otherwise)."""
    timeout = settings.timeout_s
    version = settings.model_version
    if not client.is_model_ready(name, version, headers=headers, client_timeout=timeout):
        raise ValueError(f"model {name!r}{' version ' + version if version else ''} is not ready on Triton")
    config = client.get_model_config(name, version, headers=headers, as_json=True, client_timeout=timeout)
    return remote_model(config["config"])


def model_problem(remote: RemoteModel, card: ModelCard, max_batch: int,
                  fix: str = "restart this instance") -> str | None:
    """Why this instance cannot use the served model (None: it can); `fix` says what to do about another model."""
    if not same_model(remote.card, card):
        return (f"Triton serves {remote.card.name} {remote.card.version} (sha256 {str(remote.card.sha256)[:12]}) "
                f"but this instance runs {card.name} {card.version} (sha256 {str(card.sha256)[:12]}): {fix}")
    if 0 < remote.max_batch_size < max_batch:
        return (f"batcher.max_batch {max_batch} exceeds the Triton model's max_batch_size {remote.max_batch_size} "
                "(lower batcher.max_batch, or lay the repository out with a larger --max-batch)")
    return None


def wait_for_model(settings: TritonSettings, name: str) -> tuple[RemoteModel | None, str]:
    """Ask until the model is ready or `connect_timeout_s` passed: (model, "") or (None, why not)."""
    headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
    deadline = time.monotonic() + settings.connect_timeout_s
    while True:
        client = make_client(settings)
        try:
            return fetch_model(client, name, settings, headers), ""
        except Exception as exc:
            why = f"Triton at {settings.url}: {describe_error(exc)}"
        finally:
            client.close()
        left = deadline - time.monotonic()
        if left <= 0:
            return None, why
        time.sleep(min(0.5, left))


def load_triton_classifier(settings: TritonSettings, onnx_path: Path, card: ModelCard, *, max_batch: int,
                           threads: int = 0, cpu_call_batch: int = CPU_CALL_BATCH) -> TritonClassifier:
    """The start: wait for the served model, check it against the local one, and build the classifier.

    Raises BackendUnavailable when tritonclient is missing or the served model cannot be used by this instance (a
    different model than the local fallback, a smaller max_batch_size): configuration errors, not outages.
    """
    import_grpcclient()
    name = settings.model_name or card.name
    local = None
    if settings.fallback == "local":
        from streamguard.inference.onnx import OnnxClassifier

        local = OnnxClassifier(onnx_path, card, threads=threads, call_batch=cpu_call_batch)
    remote, why = wait_for_model(settings, name)
    if remote is None:
        # Down at start: the local card stands in (the recovery check insists Triton serves that same model).
        return TritonClassifier(settings, card, model_name=name, max_batch=max_batch, local=local, down_reason=why)
    # With a local fallback, it must be the served model (or outages would score with other weights and thresholds).
    problem = model_problem(remote, card if local is not None else remote.card, max_batch,
                            fix="set `model` to the model Triton serves, or triton.fallback: unscored")
    if problem:
        raise BackendUnavailable(f"{problem} [Triton at {settings.url}, model {name}]")
    return TritonClassifier(settings, remote.card, model_name=name, max_batch=max_batch, local=local, remote=remote)
