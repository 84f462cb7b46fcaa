"""The deployment kit in deploy/: every YAML parses, and the pieces fit together.

No Docker engine (and no cluster) runs here, so this checks by hand what `docker compose config`, a `docker build`
and `kubectl apply --dry-run` would catch first: references between files (mounts, secrets, volumes, ports, service
names, config keys), StreamGuard's own config loader on every config the kit ships, the Dockerfiles' essentials,
and the Kubernetes overlays as `kubectl kustomize` renders them (when kubectl is installed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streamguard.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBECTL = shutil.which("kubectl")


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 20, files
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a top-level {type(doc).__name__}"


def test_readme_has_capacity_placeholder() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "see README benchmarks" in text
    assert "disjoint" in text and "Triton" in text


# -- compose ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _interpolate_default(value: str) -> str:
    """${VAR:-default} -> default (compose's interpolation for an unset VAR)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_services_and_references(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"streamguard", "mediamtx", "demo-publisher", "prometheus", "grafana"}
    assert services["mediamtx"]["image"].startswith("bluenviron/mediamtx:")
    assert "ffmpeg" in services["demo-publisher"]["image"]

    build = services["streamguard"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()

    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown {dep}"
        for secret in svc.get("secrets") or []:
            assert secret in compose["secrets"], f"{name}: secret {secret} is not defined"
        for mount in svc.get("volumes") or []:
            source = _interpolate_default(mount).split(":")[0]
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                # the demo video is the user's: only its folder ships (with a README saying what to put there)
                assert path.exists() or path.parent.is_dir(), f"{name}: bind mount {source} is missing"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
    # the token is required (':?') rather than defaulting to something guessable, and reaches Prometheus as a secret
    assert services["streamguard"]["environment"]["STREAMGUARD_TOKEN"].startswith("${STREAMGUARD_TOKEN:?")
    assert compose["secrets"]["streamguard_token"] == {"environment": "STREAMGUARD_TOKEN"}


def test_compose_wiring_matches_configs(compose: dict) -> None:
    services = compose["services"]
    sg = services["streamguard"]
    # StreamGuard's config: validated by StreamGuard itself, and its camera is what the sidecar publishes
    (config_mount,) = [m for m in sg["volumes"] if m.endswith(":/etc/streamguard/config.yaml:ro")]
    config_path = DEPLOY / config_mount.split(":")[0]
    cfg = load_config(config_path)
    publisher = services["demo-publisher"]["command"]
    assert [s.url for s in cfg.streams] == [publisher[-1]]
    assert publisher[-1].startswith("rtsp://mediamtx:8554/")
    assert sg["command"][:3] == ["serve", "--host", "0.0.0.0"] and "/etc/streamguard/config.yaml" in sg["command"]
    assert "8080:8080" in sg["ports"]

    # Prometheus: its config is the mounted folder's; target = the streamguard service; token file = the secret
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "streamguard"
    assert job["static_configs"][0]["targets"] == ["streamguard:8080"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/" + services["prometheus"]["secrets"][0]
    for pattern in prom["rule_files"]:
        assert list((DEPLOY / "prometheus").glob(pattern)), f"rule_files {pattern} matches nothing"

    # Grafana: provisioning and dashboards mounted where the provider looks; datasource = the prometheus service
    gvols = services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in gvols
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/streamguard.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in gvols
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path) and (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()


def test_grafana_dashboard() -> None:
    dash = json.loads((DEPLOY / "grafana/dashboards/streamguard.json").read_text())
    assert dash["uid"] == "streamguard" and dash["title"] == "StreamGuard"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    targets = 0
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            targets += 1
            assert 'job="streamguard"' in t["expr"] and "$instance" in t["expr"], (p["title"], t["expr"])
    assert targets >= 20


# -- Dockerfiles ------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name: str) -> None:
    ins = _instructions(DEPLOY / name)
    kinds = [k for k, _ in ins]
    froms = [v for k, v in ins if k == "FROM"]
    if name == "Dockerfile":
        assert froms == ["python:3.11-slim"]
        assert any(k == "RUN" and "pip install ." in v and "[gpu]" not in v for k, v in ins)
    else:
        (tag,) = [v.split("=", 1)[1] for k, v in ins if k == "ARG" and v.startswith("TENSORRT_TAG=")]
        assert re.fullmatch(r"24\.\d\d-py3", tag), tag
        assert froms == ["nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}"]
        assert any(k == "RUN" and 'pip install ".[gpu,cluster]"' in v for k, v in ins)
    users = [v for k, v in ins if k == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the image must not run as root"
    assert "HEALTHCHECK" in kinds and "/healthz" in dict(ins)["HEALTHCHECK"]
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["streamguard"]
    assert json.loads(dict(ins)["CMD"]) == ["serve", "--host", "0.0.0.0"]
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "STREAMGUARD_ENGINES=" in env and "STREAMGUARD_DATA_DIR=/data" in env
    assert "STREAMGUARD_TOKEN" not in env, "the token must come at run time"
    # every COPY source exists and survives the dockerignore next to the Dockerfile
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    kept = [line[1:] for line in ignore if line.startswith("!")]
    for k, v in ins:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert list(REPO.glob(src)), f"{name}: COPY {src} matches nothing"
                assert any(src.rstrip("/") == k2.rstrip("/") for k2 in kept), f"{name}: {src} is dockerignored"


# -- Kubernetes -------------------------------------------------------------------------------------------------


def kustomize(overlay: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("needs kubectl (its built-in kustomize renders the overlays)")
    res = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def check_pod(workload: dict, configmap: dict) -> None:
    c = container(workload)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["STREAMGUARD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "streamguard-token", "key": "token"}
    secret = load_all(K8S / "base" / "secret.yaml")[0]
    assert secret["metadata"]["name"] == "streamguard-token" and "token" in secret["stringData"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == "/data" and mounts["config"] == "/etc/streamguard"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    sec = workload["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    # Every STREAMGUARD_* variable the manifest sets is a setting (the service refuses unknown ones), and Kubernetes
    # adds none of its own: service links would set STREAMGUARD_SERVICE_HOST, STREAMGUARD_PORT=tcp://... .
    from streamguard.api.lifecycle import DRAIN_TIMEOUT_S
    from streamguard.config.service import _unknown_variables

    pod = workload["spec"]["template"]["spec"]
    assert _unknown_variables({name: "x" for name in env}) == []
    assert pod["enableServiceLinks"] is False
    # SIGTERM: the service drains, then uvicorn's graceful shutdown (10 s), all before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= DRAIN_TIMEOUT_S + 10 + 5


def test_k8s_base(tmp_path: Path) -> None:
    docs = by_kind(kustomize("base"))
    assert set(docs) == {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    assert "Secret" not in docs, "a placeholder token must never be applied by the kustomization"
    assert all(d["metadata"].get("namespace") == "streamguard" for k, ds in docs.items() if k != "Namespace"
               for d in ds)
    (dep,), (cm,) = docs["Deployment"], docs["ConfigMap"]
    (pvc,), (svc,) = docs["PersistentVolumeClaim"], docs["Service"]
    check_pod(dep, cm)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["sessionAffinity"] == "ClientIP"
    # the ConfigMap's YAML is a valid StreamGuard config
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    load_config(path)


def test_k8s_gpu() -> None:
    docs = by_kind(kustomize("gpu"))
    (dep,), (cm,) = docs["Deployment"], docs["ConfigMap"]
    check_pod(dep, cm)
    c = container(dep)
    assert c["image"] == "streamguard:gpu"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["STREAMGUARD_BACKEND"] == "tensorrt" and "STREAMGUARD_TOKEN" in env
    tolerations = dep["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_k8s_scale_and_hpa() -> None:
    docs = by_kind(kustomize("scale"))
    assert "Deployment" not in docs and "PersistentVolumeClaim" not in docs
    (sts,), (cm,), (hpa,) = docs["StatefulSet"], docs["ConfigMap"], docs["HorizontalPodAutoscaler"]
    check_pod(sts, cm)
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in docs["Service"]}
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # the StatefulSet's container is the base Deployment's but for the command that picks the per-pod config
    base = container(by_kind(kustomize("base"))["Deployment"][0])
    c = dict(container(sts))
    assert "streamguard serve --host 0.0.0.0 --config" in c.pop("args")[0] and c.pop("command") == ["/bin/sh", "-c"]
    c["env"] = [e for e in c["env"] if e["name"] != "POD_NAME"]
    base = {k: v for k, v in base.items() if k != "args"}
    assert c == base, "scale/statefulset.yaml's container drifted from base/deployment.yaml's"
    # HPA: scales the StatefulSet on the metric the adapter serves
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "streamguard"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    adapter = yaml.safe_load((K8S / "scale" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "streamguard_streams_active"
    assert "streamguard_streams{" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert hpa["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"


def test_k8s_monitoring_matches_prometheus_rules() -> None:
    docs = by_kind(kustomize("monitoring"))
    (pm,), (rule,) = docs["PodMonitor"], docs["PrometheusRule"]
    assert pm["spec"]["jobLabel"] == "app.kubernetes.io/name"
    ep = pm["spec"]["podMetricsEndpoints"][0]
    assert ep["port"] == "http" and ep["path"] == "/metrics"
    assert ep["authorization"]["credentials"] == {"name": "streamguard-token", "key": "token"}
    shipped = yaml.safe_load((DEPLOY / "prometheus/rules/streamguard.rules.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == shipped, "k8s/monitoring/prometheusrule.yaml drifted from the rules file"


# -- cluster mode -----------------------------------------------------------------------------------------------

CLUSTER_INSTANCES = ["streamguard-1", "streamguard-2", "streamguard-3"]


@pytest.fixture(scope="module")
def compose_cluster() -> dict:
    return yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())


def test_compose_cluster_services_and_wiring(compose_cluster: dict) -> None:
    """Three instances on one NATS (JetStream on, healthy before they start), the RTSP demo, Prometheus scraping
    the three, Grafana; every STREAMGUARD_* variable a setting; the shared config valid for StreamGuard."""
    from streamguard.config.service import _unknown_variables

    services = compose_cluster["services"]
    assert set(services) == {"nats", *CLUSTER_INSTANCES, "mediamtx", "demo-publisher", "prometheus", "grafana"}
    nats = services["nats"]
    assert nats["image"].startswith("nats:2.") and "-js" in nats["command"]
    assert "/data" in nats["command"] and any(v.endswith(":/data") for v in nats["volumes"])
    named_volumes = set(compose_cluster["volumes"])
    ids, ports = set(), set()
    for name in CLUSTER_INSTANCES:
        sg = services[name]
        assert sg["build"]["dockerfile"] == "deploy/Dockerfile" and sg["command"][:3] == ["serve", "--host", "0.0.0.0"]
        assert sg["depends_on"]["nats"] == {"condition": "service_healthy"}
        env = sg["environment"]
        assert _unknown_variables(dict.fromkeys(env, "x")) == []
        assert env["STREAMGUARD_CLUSTER__NATS_URL"] == "nats://nats:4222"
        assert env["STREAMGUARD_TOKEN"].startswith("${STREAMGUARD_TOKEN:?")
        ids.add(env["STREAMGUARD_CLUSTER__INSTANCE_ID"])
        ports |= {p.split(":")[0] for p in sg["ports"]}
        (config_mount,) = [m for m in sg["volumes"] if m.endswith(":/etc/streamguard/config.yaml:ro")]
        cfg = load_config(DEPLOY / config_mount.split(":")[0])
        assert [s.url for s in cfg.streams] == [services["demo-publisher"]["command"][-1]]
        data = [m.split(":")[0] for m in sg["volumes"] if m.endswith(":/data")]
        assert len(data) == 1 and data[0] in named_volumes
    assert ids == set(CLUSTER_INSTANCES) and len(ports) == 3  # distinct ids, ports and data volumes
    assert len({m for n in CLUSTER_INSTANCES for m in services[n]["volumes"] if m.endswith(":/data")}) == 3
    prom_cmd = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.cluster.yml" in prom_cmd
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.cluster.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "streamguard"
    assert job["static_configs"][0]["targets"] == [f"{n}:8080" for n in CLUSTER_INSTANCES]
    assert prom["rule_files"] == yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["rule_files"]
    assert set(services["prometheus"]["depends_on"]) == set(CLUSTER_INSTANCES)


def test_k8s_cluster_deployment_hpa_and_nats_chart(tmp_path: Path) -> None:
    docs = by_kind(kustomize("cluster"))
    assert "StatefulSet" not in docs and "PersistentVolumeClaim" not in docs and "Secret" not in docs
    (dep,), (cm,), (hpa,), (svc,) = docs["Deployment"], docs["ConfigMap"], docs["HorizontalPodAutoscaler"], \
        docs["Service"]
    check_pod(dep, cm)
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert set(vols["data"]) == {"name", "emptyDir"}, "the store is a copy of the log: no volume per pod"
    env = {e["name"]: e for e in container(dep)["env"]}
    assert env["STREAMGUARD_CLUSTER__NATS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "streamguard-nats",
                                                                                 "key": "url"}
    assert env["STREAMGUARD_CLUSTER__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret = load_all(K8S / "cluster" / "nats-secret.yaml")[0]
    assert secret["metadata"]["name"] == "streamguard-nats" and secret["stringData"]["url"].startswith("nats://")
    assert svc["spec"]["sessionAffinity"] == "None"  # WHIP session requests reach their pod through any pod
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "streamguard"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "streamguard_streams_active"
    assert docs["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1
    # the replicas of the log and buckets match the NATS servers of the chart's values
    values = yaml.safe_load((K8S / "cluster" / "nats-values.yaml").read_text())
    assert values["config"]["jetstream"]["enabled"] is True and values["config"]["cluster"]["enabled"] is True
    assert int(env["STREAMGUARD_CLUSTER__REPLICAS"]["value"]) == values["config"]["cluster"]["replicas"]
    assert "helm install nats nats/nats" in (K8S / "cluster" / "kustomization.yaml").read_text()
    # a pod's settings are valid: the ConfigMap's config with the cluster variables
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    cfg = load_config(path, cluster={"nats_url": secret["stringData"]["url"], "instance_id": "streamguard-abc12",
                                     "replicas": 3})
    assert cfg.cluster.enabled
