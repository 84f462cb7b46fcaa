"""The monitoring kit against a real Prometheus: deploy/prometheus (scrape config, rules, rule unit tests) and the
Grafana dashboard's queries, with promtool's checks.

Static: `promtool check rules --lint=all`, `promtool test rules` (synthetic series: every alert fires with its labels
and annotations, and not before its `for`), `promtool check config --syntax-only` on the file as shipped.

Live: `streamguard serve` (meso4, a bearer token) with two pull streams for activity, a real face video file (live,
scored) and an RTSP URL where nothing listens (reconnecting: reconnects counted). A real Prometheus runs from
deploy/prometheus/prometheus.yml with only the target, the token file and the intervals swapped for the test's; the
test waits until it has scraped, checks the rules are loaded and evaluate without error on the real series, that
StreamGuardStreamDown is pending for the dead RTSP stream, that every query of the Grafana dashboard runs, that
every metric the rules and the dashboard name is exported, and runs `promtool check metrics` on a live scrape.

Needs Debian's prometheus package (/usr/bin/prometheus and promtool): apt-get install -y prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULES = sorted((PROM_DIR / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((PROM_DIR / "rules").glob("*.test.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamguard.json"
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "prometheus-test-token"

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).is_file(),
                                    reason="needs promtool: apt-get install -y prometheus")
needs_prometheus = pytest.mark.skipif(
    not (Path(PROMETHEUS).is_file() and Path(PROMTOOL).is_file()),
    reason="needs prometheus: apt-get install -y prometheus"
)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin.decode() if stdin else None, capture_output=True, text=True,
                          timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def prom_api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        body = json.loads(get(url))
    except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
        body = json.loads(exc.read())
    return body


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT if "streamguard" in " ".join(map(str, proc.args)) else signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def exported_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def metric_names(expr: str) -> set[str]:
    """streamguard_* metric names an expression reads, reduced to their family (histogram suffixes stripped)."""
    names = set(re.findall(r"\bstreamguard_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if re.search(r"_seconds_|_size_", n) else n for n in names}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in as Grafana would for a 5-minute view."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$instance", ".*"))


# -- static checks ----------------------------------------------------------------------------------------------


@needs_promtool
def test_rules_pass_promtool_lint() -> None:
    assert RULES, "no deploy/prometheus/rules/*.rules.yml"
    res = promtool("check", "rules", "--lint=all", "--lint-fatal", *map(str, RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_rule_unit_tests() -> None:
    assert RULE_TESTS, "no deploy/prometheus/rules/*.test.yml"
    res = promtool("test", "rules", *map(str, RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_shipped_config_syntax() -> None:
    # as shipped its token file exists only inside the compose container: full checks run on the live copy below
    res = promtool("check", "config", "--syntax-only", str(PROM_DIR / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_severity_and_text() -> None:
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"].startswith("StreamGuard"), rule["alert"]
                    assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
                else:
                    assert re.fullmatch(r"streamguard:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


# -- live: the service scraped by a real Prometheus ------------------------------------------------------------


@pytest.fixture
def streamguard_server(tmp_path: Path, shared_data: Path):
    video = shared_data / "ffpp_smoke" / "real_519.mp4"
    if not video.is_file():
        pytest.skip(f"needs {video}")
    port, dead_port = free_port(), free_port()
    config = tmp_path / "streamguard.yaml"
    config.write_text(yaml.safe_dump({
        "streams": [
            {"id": "face-file", "url": str(video), "name": "real face (file)"},
            {"id": "dead-camera", "url": f"rtsp://127.0.0.1:{dead_port}/nothing", "name": "nobody listens"},
        ],
        "sources": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "connect_timeout_s": 2.0},
    }))
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "prometheus-streamguard.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamguard.cli", "serve", "--config", str(config), "--port", str(port),
             "--data-dir", str(tmp_path / "data")],
            cwd=REPO, env={**os.environ, "STREAMGUARD_TOKEN": TOKEN}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"streamguard serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        return json.loads(get(base + "/readyz"))["status"] == "ready"

    try:
        wait_for("streamguard /readyz", ready, 90)
        yield base
    finally:
        stop(proc)


@needs_prometheus
@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_prometheus(tmp_path: Path, streamguard_server: str) -> None:
    t0 = time.monotonic()
    sg_target = streamguard_server.removeprefix("http://")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)

    # The shipped config with only what the test must change: intervals, target, token file, rules' absolute path.
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / r) for r in cfg["rule_files"]]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "streamguard"]
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"][0]["targets"] = [sg_target]
    job["static_configs"][0]["labels"] = {"deployment": "test"}
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))

    res = promtool("check", "config", "--lint=all", str(prom_cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout

    port = free_port()
    prom_base = f"http://127.0.0.1:{port}"
    with open(ARTIFACTS / "prometheus.log", "w") as log:
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def scraped() -> bool:
            r = prom_api(prom_base, "query", query='up{job="streamguard"}')["data"]["result"]
            return bool(r) and r[0]["value"][1] == "1"

        wait_for("Prometheus to scrape streamguard (up == 1)", scraped, 60)

        def has(query: str):
            return lambda: prom_api(prom_base, "query", query=query)["data"]["result"]

        wait_for("scored frames", has('streamguard_frames_sampled_total{kind="file"} > 0'), 60)
        wait_for("the dead RTSP stream's reconnects", has('streamguard_reconnects_total{kind="rtsp"} > 0'), 60)
        # rates need two scrapes with the series in them
        wait_for("a sample-to-score rate", has("rate(streamguard_sample_to_score_seconds_count[1m]) > 0"), 60)
        wait_for("a decode rate", has("rate(streamguard_frames_decoded_total[1m]) > 0"), 60)

        targets = prom_api(prom_base, "targets")["data"]["activeTargets"]
        assert [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets] == [("streamguard", "up", "")]

        n_rules = check_rules_and_alerts(prom_base)
        check_dashboard_queries(prom_base)
        n_families = check_live_scrape(streamguard_server)
        print(f"live Prometheus checks passed in {time.monotonic() - t0:.1f} s: {n_rules} rules ok, "
              f"{len(dashboard_exprs())} dashboard queries ok, {n_families} metric families linted")
    finally:
        stop(prom)


def check_rules_and_alerts(prom_base: str) -> int:
    """Every shipped rule loaded and evaluated without error on the real series; the dead camera's alert pending;
    none firing. Returns the number of rules."""
    shipped = {r.get("alert") or r.get("record") for p in RULES for g in yaml.safe_load(p.read_text())["groups"]
               for r in g["rules"]}

    def rules_evaluated():
        groups = prom_api(prom_base, "rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if any(r.get("lastEvaluation", "").startswith("0001") for r in rules):
            return None
        return rules

    rules = wait_for("every rule to be evaluated", rules_evaluated, 30)
    assert {r["name"] for r in rules} == shipped
    bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad

    # The dead camera: StreamGuardStreamDown is pending (its `for` is 2 minutes) with the stream's kind.
    def down_pending():
        alerts = prom_api(prom_base, "alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "StreamGuardStreamDown"]

    (down,) = wait_for("StreamGuardStreamDown pending", down_pending, 30)
    assert down["state"] == "pending" and down["labels"]["kind"] == "rtsp", down
    assert down["labels"]["severity"] == "warning" and "rtsp stream(s) down" in down["annotations"]["summary"]
    firing = [a["labels"]["alertname"] for a in prom_api(prom_base, "alerts")["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing, f"alerts firing on a healthy service: {firing}"
    return len(rules)


def check_dashboard_queries(prom_base: str) -> None:
    """Grafana: every dashboard query runs (valid PromQL on the real series); the main ones return data."""
    errors, empty = [], []
    for title, expr in dashboard_exprs():
        body = prom_api(prom_base, "query", query=concrete(expr))
        if body.get("status") != "success":
            errors.append((title, expr, body.get("error")))
        elif not body["data"]["result"]:
            empty.append((title, expr))
    assert not errors, errors
    must_have_data = {"Instances up", "Streams by state", "Frames", "Sample to score latency", "Streams live",
                      "Events written"}
    no_data = [(t, e) for t, e in empty if t in must_have_data and "frames_dropped" not in e]
    assert not no_data, f"no data for {no_data}"


def check_live_scrape(streamguard_server: str) -> int:
    """promtool check metrics on a live scrape, and every metric the kit reads is exported. Returns the number of
    metric families."""
    scrape = get(streamguard_server + "/metrics", TOKEN)
    (ARTIFACTS / "metrics.txt").write_bytes(scrape)
    lint = promtool("check", "metrics", stdin=scrape)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    families = exported_families(scrape.decode())
    # streamguard_cluster_* exist in cluster mode only: tests/test_cluster.py checks them on a cluster instance.
    read = {m for m in kit_metrics() if not m.startswith("streamguard_cluster_")}
    assert read - families == set(), f"rules/dashboard read metrics the service does not export: {read - families}"
    return len(families)


def kit_metrics() -> set[str]:
    """The streamguard_* metric families the shipped rules and the Grafana dashboard read."""
    read = set()
    for path in RULES:
        for g in yaml.safe_load(path.read_text())["groups"]:
            for r in g["rules"]:
                read |= metric_names(r["expr"])
    for _, expr in dashboard_exprs():
        read |= metric_names(expr)
    return read
