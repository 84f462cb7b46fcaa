"""The `streamguard` command: scan, eval, models; serve and engine build join as their issues land."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar, cast, get_args

import typer
from tqdm import tqdm

from streamguard.inference.classifier import Classifier
from streamguard.inference.models import ModelNotFound, available_models, load_classifier, resolve_model

if TYPE_CHECKING:  # imported where used: scan pulls in mediapipe and cv2, which a bad flag must not wait for
    from streamguard.config import ServiceConfig
    from streamguard.inference.card import ModelCard
    from streamguard.ingest.av_source import ProbeInfo
    from streamguard.scan import FileReport, ScanSettings

# mediapipe's C++ side logs warnings to stderr at every graph start; they are noise to our users.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(help="StreamGuard: live deepfake and impostor-face detection.", no_args_is_help=True)
models_app = typer.Typer(help="List and import models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
engine_app = typer.Typer(help="TensorRT engines for NVIDIA GPUs.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")
triton_app = typer.Typer(help="NVIDIA Triton Inference Server: model repositories for `backend: triton`.",
                         no_args_is_help=True)
app.add_typer(triton_app, name="triton")

ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="a model name in engines/ or a path to its .onnx")
]


def _load_model(model: str | None) -> Classifier:
    try:
        resolve_model(model)  # a wrong name fails here, before onnxruntime is imported
        return load_classifier(model)
    except ModelNotFound as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    except Exception as exc:  # a corrupt ONNX or card: say which, do not print a traceback
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="--model") from None


def _settings(fps: float, min_samples: int, images_are_crops: bool, hwdecode: str = "off") -> ScanSettings:
    from pydantic import ValidationError

    from streamguard.scan import ScanSettings

    try:  # validated as the flags' values: an unknown --hwdecode is refused here, with the flag named
        return ScanSettings.model_validate({"fps": fps, "min_samples": min_samples,
                                            "images_are_crops": images_are_crops, "hwdecode": hwdecode})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise typer.BadParameter(err["msg"], param_hint=f"--{str(err['loc'][0]).replace('_', '-')}") from None


# -- output paths: checked before any work, written so that a failure at the end loses nothing ------------------------


def _probe_writable(folder: Path) -> None:
    """OSError unless a file can be created in `folder` (an anonymous temporary file: nothing is left behind)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_output_dir(path: Path, option: str) -> None:
    """`path` is a folder we can write in, or one we can create: else a usage error naming `option`."""
    problem = f"cannot use {path}"
    try:
        if path.exists():
            if not path.is_dir():
                raise typer.BadParameter(f"{path} exists and is not a folder", param_hint=option)
            problem = f"cannot write in {path}"
            where = path
        else:
            where = _nearest_existing(path)
            if not where.is_dir():
                raise typer.BadParameter(f"cannot create the folder {path}: {where} is not a folder", param_hint=option)
            problem = f"cannot create the folder {path} (in {where})"
        _probe_writable(where)
    except OSError as exc:
        raise typer.BadParameter(f"{problem}: {exc.strerror or exc}", param_hint=option) from None


def _check_output_file(path: Path, option: str) -> None:
    """`path` is a file we can (over)write, in an existing folder: else a usage error naming `option`."""
    parent = path.parent
    try:
        if path.is_dir():
            raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
        if not parent.exists():
            raise typer.BadParameter(f"{path}: the folder {parent} does not exist", param_hint=option)
        if not parent.is_dir():
            raise typer.BadParameter(f"{path}: {parent} is not a folder", param_hint=option)
        if path.exists():
            with open(path, "ab"):  # opened, not written: nothing changes
                pass
        else:
            _probe_writable(parent)
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {path}: {exc.strerror or exc}", param_hint=option) from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file beside `path`, so a failure leaves any previous file whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes it 0600: give it a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_report(path: Path, text: str, option: str, make_folder: bool = False) -> bool:
    """Write `text` to `path`; when that fails, say why and save it elsewhere (a temp file, else stdout). True: saved
    where asked."""
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text.encode())
        return True
    except OSError as exc:
        problem = f"error: {option}: cannot write {path}: {exc.strerror or exc}"
    try:
        fd, fallback = tempfile.mkstemp(prefix=f"streamguard-{path.stem}-", suffix=path.suffix or ".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        typer.echo(f"{problem}; saved it to {fallback} instead", err=True)
    except OSError:
        typer.echo(f"{problem}; here it is:", err=True)
        sys.stdout.write(text)
    return False


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="videos, images or folders")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the JSON report here ('-': stdout)")] = None,
    fps: Annotated[float, typer.Option(help="samples per second of video")] = 1.0,
    min_samples: Annotated[int, typer.Option(help="scored samples a person needs in a video")] = 3,
    images_are_crops: Annotated[bool, typer.Option(help="images are aligned face crops: skip detection")] = False,
    heatmaps: Annotated[
        Path | None, typer.Option(help="write an artefact heatmap PNG per flagged participant here")] = None,
    heatmap_method: Annotated[str, typer.Option(
        help="model: the model's own artefact map where it has one, else occlusion; occlusion: the drop in P(fake) "
        "as each patch is hidden (226 model calls per heatmap)")] = "model",
    hwdecode: Annotated[str, typer.Option(help="decode on NVDEC: off, auto (when it works here) or nvdec")] = "off",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Scan files for deepfaked faces: a verdict per file and a score per participant."""
    from streamguard import logs
    from streamguard.inference.heatmap import HeatmapMethod, heatmapper_for
    from streamguard.ingest.av_source import SourceError, probe
    from streamguard.scan import Scanner, ScanReport, expand_paths, model_info

    settings = _settings(fps, min_samples, images_are_crops, hwdecode)
    logs.filter_native_stderr()  # mediapipe's start-up lines are noise between the progress bars
    if json_out is not None and str(json_out) != "-":
        _check_output_file(json_out, "--json")
    if heatmaps is not None:
        _check_output_dir(heatmaps, "--heatmaps")
    if heatmap_method not in get_args(HeatmapMethod):
        raise typer.BadParameter(f"{heatmap_method!r} is not one of {', '.join(get_args(HeatmapMethod))}",
                                 param_hint="--heatmap-method")
    classifier = _load_model(model)
    method = cast(HeatmapMethod, heatmap_method)
    heatmapper = heatmapper_for(classifier, resolve_model(model)[0], method) if heatmaps is not None else None
    files = list(expand_paths(paths))
    if not files:
        raise typer.BadParameter("no video or image found", param_hint="PATHS")
    try:
        scanner = Scanner(classifier, settings)
    except SourceError as exc:  # --hwdecode nvdec where NVDEC cannot be used
        raise typer.BadParameter(str(exc).removeprefix("--hwdecode nvdec: "), param_hint="--hwdecode") from None
    reports = []
    human = json_out is None or str(json_out) != "-"
    failed = False  # an output could not be written where asked
    heatmaps_written = 0
    try:
        for path in tqdm(files, desc="files", unit="file", disable=quiet or len(files) < 2, file=sys.stderr):
            bar = tqdm(desc=path.name, unit="s", leave=False, disable=quiet, file=sys.stderr,
                       total=_duration(probe, path), bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s")
            result = scanner.scan(path, on_sample=_progress(bar))
            bar.close()
            if heatmaps is not None and heatmapper is not None:
                try:
                    heatmaps_written += len(result.write_heatmaps(heatmapper, classifier.card.threshold, heatmaps))
                except OSError as exc:  # the disk filled, the folder went away: keep scanning, without heatmaps
                    typer.echo(f"error: --heatmaps: cannot write in {heatmaps}: {exc.strerror or exc}; "
                               "no more heatmaps are written", err=True)
                    heatmaps, failed = None, True
            reports.append(result.report)
            if human:
                _print_file(result.report)
    finally:
        scanner.close()
    if heatmaps is not None and not heatmaps_written:
        typer.echo(f"--heatmaps: no participant was flagged (P(fake) >= {classifier.card.threshold:g}), so no heatmap "
                   "was written", err=True)
    report = ScanReport(model=model_info(classifier), settings=settings, files=reports)
    if json_out is not None:
        text = report.model_dump_json(indent=2) + "\n"
        if str(json_out) == "-":
            sys.stdout.write(text)
        elif not _save_report(json_out, text, "--json"):
            failed = True
    if failed or any(r.error for r in reports):
        raise typer.Exit(1)


def _progress(bar: Any) -> Callable[[float], None]:
    """The file's bar moved to media time `pts` (seconds)."""
    return lambda pts: bar.update(max(0.0, pts - bar.n))


def _duration(probe: Callable[[str], ProbeInfo], path: Path) -> float | None:
    try:
        return probe(str(path)).get("duration_s")
    except Exception:
        return None


def _print_file(r: FileReport) -> None:
    score = "   -  " if r.score is None else f"{r.score:.3f}"
    line = f"{r.verdict.value.upper():8s} P(fake) {score}  {r.path}"
    if r.error:
        line += f"\n  error: {r.error}"
    typer.echo(line)
    for p in r.participants:
        pscore = "-" if p.score is None else f"{p.score:.3f}"
        typer.echo(f"  {p.id:4s} samples {p.samples:4d}  low-quality {p.low_quality:3d}  P(fake) {pscore}"
                   f"  seen {p.first_seen_s:.1f}-{p.last_seen_s:.1f} s"
                   + (f"  face {p.face_px:.0f} px" if p.face_px is not None else "")
                   + (f"  heatmap {p.heatmap}" if p.heatmap else ""))


EVAL_HELP = (
    "Measure a model on labelled files: AUC, accuracy, TPR/FPR at the threshold, log loss, ROC curve.\n\n"
    "LABELS is a labels CSV (path,label: paths relative to it, labels real/fake or 0/1), or a folder whose "
    "sub-folder names (real/, fake/, df/, original/, Celeb-synthesis/, ...), own name (real/) or file-name prefixes "
    "(real_..., fake_...) say each file's label; --label labels the files nothing else labels.\n\n"
    "Each rate is given per file (the file's verdict) and per face (every scored sample of every file)."
)


@app.command("eval", help=EVAL_HELP)
def eval_cmd(
    labels: Annotated[Path, typer.Argument(help="a labels CSV (path,label) or a folder; see above")],
    model: ModelOption = None,
    label: Annotated[str | None, typer.Option(
        help="real or fake: the label of every file whose names say neither (--label real on a folder of real "
             "photos measures false positives)")] = None,
    out: Annotated[Path, typer.Option(help="folder for eval.json and roc.png")] = Path("eval-out"),
    fps: Annotated[float, typer.Option(help="samples per second of video")] = 1.0,
    min_samples: Annotated[int, typer.Option(help="scored samples a person needs in a video")] = 3,
    images_are_crops: Annotated[bool, typer.Option(help="images are aligned face crops: skip detection")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Measure a model on labelled files (see EVAL_HELP)."""
    settings = _settings(fps, min_samples, images_are_crops)
    if label not in (None, "real", "fake"):
        raise typer.BadParameter(f"use real or fake, got {label!r}", param_hint="--label")
    from streamguard import logs
    from streamguard.evaluate import evaluate, load_labels, plot_roc  # scikit-learn: after the options are checked
    from streamguard.scan import Scanner

    try:
        items = load_labels(labels, None if label is None else int(label == "fake"))
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="LABELS") from None
    _check_output_dir(out, "--out")
    for name in ("eval.json", "roc.png"):
        if (out / name).is_dir():
            raise typer.BadParameter(f"{out / name} is a folder", param_hint="--out")
    classifier = _load_model(model)
    logs.filter_native_stderr()
    scanner = Scanner(classifier, settings)
    bar = tqdm(total=len(items), desc="eval", unit="file", disable=quiet, file=sys.stderr)
    try:
        report, curves = evaluate(scanner, items, on_file=lambda _: bar.update())
    finally:
        bar.close()
        scanner.close()
    saved = _save_report(out / "eval.json", report.model_dump_json(indent=2) + "\n", "--out", make_folder=True)
    has_plot = False
    if saved:
        try:
            has_plot = plot_roc(curves, f"{classifier.card.name} on {labels.name}", out / "roc.png")
        except Exception as exc:  # the ROC plot is extra: its failure must not hide the metrics
            typer.echo(f"error: --out: cannot write {out / 'roc.png'}: {exc}", err=True)
    typer.echo(f"model {classifier.card.name} ({classifier.backend}), threshold {report.threshold}")
    for level, m in (("files", report.files), ("faces", report.faces)):
        if m is None:
            typer.echo(f"{level:5s}: nothing scored")
            continue
        fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        ci = f" [{m.auc_ci95[0]:.2f}, {m.auc_ci95[1]:.2f}]" if m.auc_ci95 else ""
        typer.echo(f"{level:5s}: n={m.n} (real {m.n_real}, fake {m.n_fake})  AUC {fmt(m.auc)}{ci}  acc {m.accuracy:.3f}"
                   f"  TPR {fmt(m.tpr)}  FPR {fmt(m.fpr)}  log loss {m.log_loss:.3f}")
    typer.echo(f"no face: {report.no_face}  errors: {report.errors}"
               + (f"  report: {out / 'eval.json'}" if saved else "")
               + (f"  ROC: {out / 'roc.png'}" if has_plot else ""))
    failed_rows = [row for row in report.rows if row.get("error")]
    for row in failed_rows:  # as scan says it: the scanner's error names the file already, or it is added here
        error = row["error"] if row["path"] in row["error"] else f"{row['path']}: {row['error']}"
        typer.echo(f"  error: {error}")
    if failed_rows or not saved:
        raise typer.Exit(1)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    host: Annotated[str | None, typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8080)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="event store and evidence (default ./streamguard-data)")] = None,
    model: ModelOption = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning or error; debug also shows every request, WebSocket, ICE and native library line"
    )] = None,
    allow_unauthenticated: Annotated[bool | None, typer.Option(
        "--allow-unauthenticated", help="serve a non-loopback --host without a token (only behind something that "
        "authenticates: anyone reaching the port could watch and control every stream)")] = None,
) -> None:
    """Run the live service: WHIP and RTSP/RTMP/HLS ingest, scoring, alerts over WebSocket, API and console.

    Settings come from --config, then STREAMGUARD_* environment variables (nested with __, e.g.
    STREAMGUARD_SCORING__WINDOW_S=15), then these flags, each overriding the one before.
    """
    from streamguard import logs
    from streamguard.config import ConfigError, load_config

    try:
        cfg = load_config(config, host=host, port=port, data_dir=data_dir, model=model, log_level=log_level,
                          allow_unauthenticated=allow_unauthenticated)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if cfg.log_level != "debug":
        logs.filter_native_stderr()
    log_config = logs.configure(cfg.log_level, cfg.secrets())
    _check_authentication(cfg, host is not None)
    _check_model_card(cfg)
    _check_data_dir(cfg.data_dir, data_dir is not None)
    _check_cluster(cfg)
    sock = _bind(cfg.host, cfg.port, port is not None, host is not None)
    try:
        _load_model(cfg.model)  # fail fast, with the flag named, before the server starts
    except typer.BadParameter as exc:
        sock.close()
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    # The server's parts (mediapipe, aiortc, FastAPI: seconds to import) only once the config and the model are
    # known to be good, so their errors come at once.
    import uvicorn

    from streamguard.api.app import create_app
    from streamguard.service import Service

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn says where it listens only for sockets it bound itself
                logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s (Press CTRL+C to quit)",
                                                        _host_port(cfg.host, cfg.port))

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to whatever handler was there
    # before it: make that handler a clean exit, so a graceful stop exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    # The socket bound above is the one served: nothing can take the port between the check and the start.
    server = Server(uvicorn.Config(
        create_app(Service(cfg)), host=cfg.host, port=cfg.port, log_config=log_config, log_level=None,
        ws_ping_interval=cfg.events.ping_interval_s, ws_ping_timeout=cfg.events.ping_interval_s,
        timeout_graceful_shutdown=10,
    ))
    try:
        server.run(sockets=[sock])
    except OSError as exc:  # listen() refused: another process took the port while the service started
        if server.started:
            raise
        _serve_error(f"port: cannot listen on {_host_port(cfg.host, cfg.port)}: {exc.strerror or exc}"
                     + _where("port", "--port" if port is not None else None))
    finally:
        sock.close()
    if not server.started:
        raise typer.Exit(3)  # the service could not start; uvicorn has logged why


def _check_authentication(cfg: ServiceConfig, host_from_flag: bool) -> None:
    """No token on a host other hosts can reach: refuse to start, unless unauthenticated access was asked for."""
    log = logging.getLogger("streamguard")
    if cfg.token is not None:
        return
    if cfg.is_loopback:
        log.info("no token configured: listening on %s only, without authentication", cfg.host)
    elif cfg.allow_unauthenticated:
        log.warning("no token configured: serving %s WITHOUT authentication (allow_unauthenticated): anyone who "
                    "reaches the port can watch and control every stream", cfg.host)
    else:
        _serve_error(
            f"host: refusing to listen on {cfg.host} without a token: anyone who reaches it could watch and control "
            "every stream. Set one (STREAMGUARD_TOKEN=$(openssl rand -hex 24), or token: in the config file), or "
            "listen on 127.0.0.1, or, behind a proxy that authenticates, pass --allow-unauthenticated "
            "(allow_unauthenticated: true)" + _where("host", "--host" if host_from_flag else None))


def _serve_error(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _where(field: str, flag: str | None = None) -> str:
    """Where a setting comes from, as the config errors say it: [flag ..., file key ..., env ...]."""
    env = "STREAMGUARD_" + field.replace(".", "__").upper()
    return f" [{f'flag {flag}, ' if flag else ''}file key {field}, env {env}]"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_model_card(cfg: ServiceConfig) -> None:
    """The model's card, and the thresholds it gives: a wrong name fails here, before onnxruntime is imported."""
    try:
        _, card = resolve_model(cfg.model)
    except ModelNotFound as exc:
        _serve_error(str(exc))
    except Exception as exc:  # a corrupt card
        _serve_error(f"cannot load model {cfg.model!r}: {exc}")
    _check_thresholds(cfg, card)


def _check_thresholds(cfg: ServiceConfig, card: ModelCard) -> None:
    """The alert thresholds the service would derive from the model card (Service.start's check), named."""
    from streamguard.config import CardThresholds

    scoring = cfg.scoring
    try:
        scoring.thresholds(CardThresholds.from_card(card))
    except ValueError as exc:
        if scoring.raise_threshold is not None and scoring.clear_threshold is None:
            fields = ["scoring.raise_threshold"]
        elif scoring.clear_threshold is not None and scoring.raise_threshold is None:
            fields = ["scoring.clear_threshold"]
        else:
            fields = ["scoring.raise_threshold", "scoring.clear_threshold"]
        _serve_error(f"{', '.join(fields)}: {exc} (model {card.name})" + "".join(_where(f) for f in fields))


def _check_cluster(cfg: ServiceConfig) -> None:
    """Cluster mode: NATS must answer, with JetStream (what Service.start connects to), said now and named."""
    if not cfg.cluster.enabled:
        return
    import asyncio

    from streamguard.cluster.link import ClusterUnavailable, probe

    try:
        asyncio.run(probe(cfg.cluster))
    except ClusterUnavailable as exc:
        _serve_error(f"{exc}{_where('cluster.nats_url')}")


def _check_data_dir(path: Path, from_flag: bool) -> None:
    """Create the data folder (event store, evidence) and check that files can be created in it."""
    where = _where("data_dir", "--data-dir" if from_flag else None)
    try:
        if path.exists() and not path.is_dir():
            _serve_error(f"data_dir: {path} exists and is not a folder{where}")
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        _serve_error(f"data_dir: cannot create the folder {path}: a parent of it is not a folder{where}")
    except OSError as exc:
        _serve_error(f"data_dir: cannot create the folder {path}: {exc.strerror or exc}{where}")
    try:
        _probe_writable(path)
    except OSError as exc:
        _serve_error(f"data_dir: cannot write in {path}: {exc.strerror or exc}{where}")
    store = path / "events.sqlite3"
    if store.exists() and not store.is_file():
        _serve_error(f"data_dir: {store} (the event store) is not a file{where}")


def _bind(host: str, port: int, port_from_flag: bool, host_from_flag: bool) -> socket.socket:
    """A TCP socket bound to host:port (as uvicorn binds: SO_REUSEADDR, IPv6 when the host has a colon), handed to
    uvicorn; a port in use or an address not on this machine is an error naming the setting."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            _serve_error(f"host: cannot listen on {host!r}: {reason}"
                         + _where("host", "--host" if host_from_flag else None))
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is in use (another streamguard serve, or another server, listens there)"
        _serve_error(f"port: cannot listen on {_host_port(host, port)}: {reason}"
                     + _where("port", "--port" if port_from_flag else None))
    sock.set_inheritable(True)
    return sock


@models_app.command("list")
def models_list() -> None:
    """Models in engines/ with their cards."""
    for name in available_models():
        try:
            _, card = resolve_model(name)
        except Exception as exc:  # one bad card must not hide the other models
            typer.echo(f"{name:28s} unreadable card: {str(exc).splitlines()[0]}")
            continue
        size = card.preprocess.input_size
        # Some cards name the input size in their architecture already ("... input=160, flip-averaged"): say it once.
        arch = re.sub(rf"\s*\binput={size}\b", "", card.architecture)
        typer.echo(f"{name:28s} {arch:24s} input {size}  threshold {card.threshold}  {card.source[:60]}")


IMPORT_KINDS = ("mesonet", "deepware", "selimsef", "icpr2020dfdc", "sbi")
_CHECKPOINT_KINDS: tuple[Literal["deepware", "selimsef", "icpr2020dfdc", "sbi"], ...] = (
    "deepware", "selimsef", "icpr2020dfdc", "sbi")
_ARCHS: tuple[Literal["meso4", "mesoinception"], ...] = ("meso4", "mesoinception")
_PADDINGS: tuple[Literal["per_layer", "global"], ...] = ("per_layer", "global")
_PRECISIONS: tuple[Literal["fp32", "fp16", "int8"], ...] = ("fp32", "fp16", "int8")
_L = TypeVar("_L", bound=str)


def _one_of(value: str | None, choices: tuple[_L, ...], message: str, hint: str) -> _L:
    """`value` as the choice it names (typed as that choice), or the flag's error."""
    for choice in choices:
        if value == choice:
            return choice
    raise typer.BadParameter(message, param_hint=hint)


@models_app.command("import")
def models_import(
    kind: Annotated[str, typer.Argument(help=f"checkpoint kind: {', '.join(IMPORT_KINDS)}")],
    file: Annotated[Path, typer.Argument(help="the checkpoint file")],
    arch: Annotated[str | None, typer.Option(help="mesonet only: meso4 or mesoinception")] = None,
    output: Annotated[
        Path | None, typer.Option(help="write the .onnx here (card beside it) instead of engines/")] = None,
    name: Annotated[str | None, typer.Option(help="model name (default: from the file name)")] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="allow pickled objects in a torch checkpoint (only for files you trust)")] = False,
    padding: Annotated[
        str | None, typer.Option(help="icpr2020dfdc/sbi: efficientnet_pytorch padding, per_layer or global")] = None,
) -> None:
    """Convert a published checkpoint into an ONNX model + model card (output: P(fake)). See engines/IMPORTING.md."""
    if kind not in IMPORT_KINDS:
        raise typer.BadParameter(f"unknown kind {kind!r}; known: {', '.join(IMPORT_KINDS)}", param_hint="KIND")
    try:
        if kind == "mesonet":
            mesonet_arch = _one_of(arch, _ARCHS, "mesonet needs --arch meso4 or --arch mesoinception", "--arch")
            from streamguard.inference.importers.mesonet import import_mesonet

            onnx_path, _ = import_mesonet(file, mesonet_arch, output=output, name=name)
        else:
            try:
                from streamguard.inference.importers.checkpoints import import_checkpoint
            except ImportError:
                raise typer.BadParameter(f"importing {kind} checkpoints needs torch: pip install -e '.[train]'",
                                         param_hint="KIND") from None
            lukemelas = None if padding is None else _one_of(padding, _PADDINGS, "use per_layer or global", "--padding")
            onnx_path, _ = import_checkpoint(_one_of(kind, _CHECKPOINT_KINDS, f"unknown kind {kind!r}", "KIND"), file,
                                             output=output, name=name, trust_pickle=trust_pickle,
                                             lukemelas_padding=lukemelas)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from None
    typer.echo(f"wrote {onnx_path} and its card {onnx_path.with_suffix('.json').name} (output: P(fake))")


@models_app.command("quantize")
def models_quantize(
    model: Annotated[str | None, typer.Argument(help="name in engines/ or path to an .onnx (default model)")] = None,
    calibration: Annotated[Path | None, typer.Option(help="folder of real face photos (3 in 4 calibrate)")] = None,
    calibration_are_crops: Annotated[bool, typer.Option(help="the calibration images are aligned crops")] = False,
    keep_float_first: Annotated[int, typer.Option(help="leave the first N convolutions in float")] = 0,
    keep_float_last: Annotated[int, typer.Option(help="leave the last N convolutions in float")] = 0,
    tolerance: Annotated[float, typer.Option(help="max |dP(fake)| against the float model")] = 0.02,
    output: Annotated[Path | None, typer.Option(help="write the .onnx here (default engines/NAME-int8.onnx)")] = None,
) -> None:
    """INT8 for the CPU (ONNX Runtime QDQ), written only when it holds the float model's scores on held-out real
    faces. Exit status: 0 written, 1 the INT8 model does not hold them, 2 a bad flag or model."""
    from streamguard.inference.quantize import quantize_model

    if calibration is None or not calibration.exists():
        raise typer.BadParameter(f"a folder of real face photos is needed, got {calibration}",
                                 param_hint="--calibration")
    for flag, value in (("--keep-float-first", keep_float_first), ("--keep-float-last", keep_float_last)):
        if value < 0:
            raise typer.BadParameter(f"must be >= 0, got {value}", param_hint=flag)
    if not tolerance > 0:
        raise typer.BadParameter(f"must be > 0, got {tolerance}", param_hint="--tolerance")
    try:
        resolve_model(model)
    except Exception as exc:  # unknown model or a card that does not parse
        raise typer.BadParameter(str(exc).splitlines()[0], param_hint="MODEL") from None
    try:
        result = quantize_model(model, calibration, images_are_crops=calibration_are_crops,
                                keep_float_first=keep_float_first, keep_float_last=keep_float_last,
                                tolerance=tolerance, output=output)
    except ValueError as exc:  # no usable face in the calibration photos
        raise typer.BadParameter(str(exc), param_hint="--calibration") from None
    typer.echo(result.summary())
    if result.path is None:
        raise typer.Exit(1)


@engine_app.command("build")
def engine_build(
    model: Annotated[str | None, typer.Argument(help="name in engines/ or path to an .onnx (default model)")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8")] = "fp16",
    max_batch: Annotated[int, typer.Option(help="largest batch the engine runs")] = 64,
    opt_batch: Annotated[int | None, typer.Option(help="batch TensorRT tunes for (default: the batcher's 16)")] = None,
    calibration: Annotated[Path | None, typer.Option(help="INT8: folder of real face photos")] = None,
    calibration_are_crops: Annotated[bool, typer.Option(help="the calibration images are aligned crops")] = False,
    tolerance: Annotated[float, typer.Option(help="INT8: max |dP(fake)| against ONNX Runtime")] = 0.02,
    int8_fallback: Annotated[bool, typer.Option(
        "--int8-fallback/--no-int8-fallback",
        help="when INT8 loses accuracy, build FP16 instead (--no-int8-fallback: fail)")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="default: engines/cache or $STREAMGUARD_ENGINE_CACHE")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when a matching engine is cached")] = False,
    workspace_gb: Annotated[float | None, typer.Option(help="TensorRT builder workspace limit")] = None,
) -> None:
    """Build (or reuse) a TensorRT engine, cached under (model hash, TensorRT version, GPU, precision, profile).

    Exit status: 0 built or reused, 1 the build failed, 2 a bad flag, an unknown model or no GPU/TensorRT here.
    """
    from streamguard.inference.engine_build import BuildArgumentError, EngineBuildError, build_engine, check_build_args
    from streamguard.inference.gpu import BackendUnavailable

    # Flags and model first: a mistake in them is reported on any machine, before the GPU is looked at.
    workspace_bytes = int(workspace_gb * (1 << 30)) if workspace_gb is not None else None
    try:
        check_build_args(precision=precision, max_batch=max_batch, opt_batch=opt_batch, calibration=calibration,
                         tolerance=tolerance, workspace_bytes=workspace_bytes, require_calibration=True)
    except BuildArgumentError as exc:
        flag = {"workspace_bytes": "--workspace-gb"}.get(exc.argument, "--" + exc.argument.replace("_", "-"))
        message = exc.message
        if exc.argument == "workspace_bytes":
            message = f"must be > 0, got {workspace_gb}"
        raise typer.BadParameter(message, param_hint=flag) from None
    try:
        resolve_model(model)
    except ModelNotFound as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None
    except Exception as exc:  # a card that does not parse
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="MODEL") from None
    try:
        result = build_engine(
            model, precision=_one_of(precision, _PRECISIONS, "use fp32, fp16 or int8", "--precision"),
            max_batch=max_batch, opt_batch=opt_batch, calibration=calibration,
            calibration_images_are_crops=calibration_are_crops, tolerance=tolerance,
            int8_fallback=int8_fallback, cache_dir=cache_dir, force=force, workspace_bytes=workspace_bytes,
        )
    except BackendUnavailable as exc:
        typer.echo(f"error: cannot build a TensorRT engine here: {exc}", err=True)
        raise typer.Exit(2) from None
    except (ModelNotFound, EngineBuildError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.summary())


@triton_app.command("layout")
def triton_layout(
    out: Annotated[Path, typer.Argument(help="the model repository folder (its model folders are replaced)")],
    model: ModelOption = None,
    runtime: Annotated[str, typer.Option(help="onnxruntime (Triton's backend), or python (ONNX Runtime in a "
                                              "Python-backend model, for Triton builds without it)")] = "onnxruntime",
    max_batch: Annotated[int, typer.Option(help="max_batch_size: at least the instances' batcher.max_batch")] = 64,
    max_queue_delay_ms: Annotated[float, typer.Option(help="longest Triton waits to fill a batch")] = 10.0,
    gpu_instances: Annotated[int, typer.Option(help="model instances per GPU")] = 1,
    cpu_instances: Annotated[int, typer.Option(help="CPU instances (configs/cpu.pbtxt, python runtime)")] = 1,
    tensorrt: Annotated[bool, typer.Option(help="also <model>-tensorrt, from a plan `engine build` cached")] = False,
    plan: Annotated[Path | None, typer.Option(help="with --tensorrt: this engine (default: the newest cached "
                                                      "one built from the model's ONNX)")] = None,
    config_only: Annotated[bool, typer.Option(help="write the configs without model files")] = False,
) -> None:
    """Lay out a Triton model repository from a model in engines/: config.pbtxt with the model card, the model.

    Then: tritonserver --model-repository OUT (CPU-only servers: --model-config-name=cpu).
    """
    from streamguard.inference.triton_repository import LayoutError, LayoutOptions, layout

    try:
        options = LayoutOptions(runtime=runtime,  # type: ignore[arg-type]  # checked by LayoutOptions
                                max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms,
                                gpu_instances=gpu_instances, cpu_instances=cpu_instances, tensorrt=tensorrt,
                                plan=plan, config_only=config_only)
        written = layout(out, model, options)
    except ModelNotFound as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    except LayoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"serve it: tritonserver --model-repository {out}"
               + ("" if runtime == "python" else "   (CPU-only servers: add --model-config-name=cpu)"))


if __name__ == "__main__":
    app()
