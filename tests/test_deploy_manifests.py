"""deploy/kubernetes: the kustomize overlays, checked without a cluster.

* Every kustomize overlay builds (``kubectl kustomize``) and its built-in kinds
  pass ``kubernetes-validate --strict`` for the oldest supported and the newest
  Kubernetes; the CRDs (ServiceMonitor, PrometheusRule, ScaledObject) are
  checked for shape against the subset of their schemas used here
  (tests/data/deploy/crd-schemas.json).
* The pieces fit together: Services and the PDB select the pods, probes hit
  the dedicated health port (not the gRPC port, where health checks count
  toward --max-concurrent-rpcs) and the health service names, the ConfigMap is a valid server
  configuration, the drain fits in the termination grace period.

kubernetes-validate comes with the test extra; kubectl comes with the machine.
Without one of them the tests that need it skip and say so.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest

from pairscore_server.flags import build_config, make_parser
from pairscore_server.servicer import SERVICE_NAME

from harness.deploy import (
    CRD_KINDS,
    CRD_SCHEMAS,
    EXTRA_KINDS,
    GPU_OVERLAY,
    GPU_OVERLAYS,
    MIN_KUBERNETES,
    OVERLAYS,
    build_overlays,
    configmap_env,
    container,
    dockerfile_uid,
    matches,
    only,
)


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    """Each overlay's ``kubectl kustomize`` output, as documents."""
    return build_overlays()


def test_there_are_cpu_and_gpu_overlays() -> None:
    assert {"cpu-dev", "gpu-prod", "gpu-model-volume"} <= set(OVERLAYS)


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
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    }
    for overlay, docs in built.items():
        kinds = {d["kind"] for d in docs}
        assert kinds <= builtin | CRD_KINDS | EXTRA_KINDS.get(overlay, set()), overlay
        assert builtin <= kinds, overlay
    assert {d["kind"] for d in built[GPU_OVERLAY]} >= CRD_KINDS


# --- CRD shapes --------------------------------------------------------------------------------


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdb_and_monitor_select_the_right_things(
    overlay: str, built: dict[str, list[dict[str, Any]]]
) -> None:
    docs = built[overlay]
    deployment = only(docs, "Deployment", "pairscore")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}

    grpc_svc = only(docs, "Service", "pairscore")
    assert grpc_svc["spec"]["clusterIP"] == "None", "headless, for client-side round_robin"
    assert matches(grpc_svc["spec"]["selector"], pod_labels)
    [port] = grpc_svc["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == ("grpc", "grpc", ports["grpc"])
    assert not grpc_svc["spec"].get("publishNotReadyAddresses"), "DNS must list ready pods only"

    metrics_svc = only(docs, "Service", "pairscore-metrics")
    assert metrics_svc["spec"].get("clusterIP") != "None"
    assert matches(metrics_svc["spec"]["selector"], pod_labels)
    [port] = metrics_svc["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == ("metrics", "metrics", ports["metrics"])

    pdb = only(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)

    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {only(docs, "Namespace")["metadata"]["name"]}

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        selected = [
            d
            for d in docs
            if d["kind"] == "Service"
            and matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
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
    assert config.health_port == ports["health"]
    if overlay in GPU_OVERLAYS:
        assert config.model.device.startswith("cuda")
    else:
        assert config.model.device == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_probes_drain_and_security(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built[overlay]
    pod = only(docs, "Deployment", "pairscore")["spec"]["template"]["spec"]
    c = container(docs)
    config = build_config([], configmap_env(docs))

    # Probes: gRPC-native, against the standard health service, on the dedicated
    # health port: on the gRPC port health checks count toward
    # --max-concurrent-rpcs, and a saturated server would fail its liveness probe.
    assert config.health_port is not None, "probes need PAIRSCORE_HEALTH_PORT"
    assert config.health_port not in (config.port, config.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == config.health_port, probe
        assert c[probe]["grpc"]["port"] != config.port, probe
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
    if overlay in GPU_OVERLAYS:
        assert int(gpus) == 1 and int(resources["requests"]["nvidia.com/gpu"]) == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus is None
