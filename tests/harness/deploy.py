"""Shared helpers of the deploy/ tests (tests/test_deploy_*.py, tests/test_docs.py).

Paths and constants, the tools the tests run (kubectl, promtool, hadolint,
found in this venv's bin or on PATH, skipping with the reason when absent),
the built kustomize overlays (the ``built`` fixture), the Dockerfile parsed
into stages, and the PromQL queries of the alerts, the dashboard and the
autoscaler. The CRD schemas that the manifests are checked against live in
tests/data/deploy/crd-schemas.json.

Test modules wrap ``build_overlays()`` and ``need_promtool()`` in fixtures of
their own (no test module imports another).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
MONITORING = K8S / "components" / "monitoring"
AUTOSCALING = K8S / "components" / "autoscaling"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
GPU_OVERLAY = "gpu-prod"
#: gpu-prod with the model on a PersistentVolumeClaim, filled by an init container.
MODEL_VOLUME_OVERLAY = "gpu-model-volume"
#: Overlays that run on NVIDIA GPUs.
GPU_OVERLAYS = {GPU_OVERLAY, MODEL_VOLUME_OVERLAY}
#: Built-in kinds that only some overlays deploy.
EXTRA_KINDS = {MODEL_VOLUME_OVERLAY: {"PersistentVolumeClaim"}}

#: The oldest Kubernetes the manifests are for: gRPC probes are GA since 1.27.
MIN_KUBERNETES = "1.29.0"
#: Labels that Prometheus (via the ServiceMonitor) adds to every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
#: Kinds that kubernetes-validate knows.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
#: The parts of the prometheus-operator (monitoring.coreos.com/v1) and KEDA
#: (keda.sh/v1alpha1) CRD schemas that matter here, with no unknown fields allowed.
CRD_SCHEMAS: dict[str, Any] = json.loads(
    (ROOT / "tests" / "data" / "deploy" / "crd-schemas.json").read_text()
)


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
    kwargs.setdefault("timeout", 120)
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


# --- the built overlays ---------------------------------------------------------------------


def build_overlays() -> dict[str, list[dict[str, Any]]]:
    """Each overlay's ``kubectl kustomize`` output, as documents (skips without kubectl)."""
    kubectl = need_tool("kubectl", "kubectl kustomize builds the overlays (install kubectl)")
    out = {}
    for overlay in OVERLAYS:
        proc = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = only(docs, "Deployment", "pairscore")["spec"]["template"]["spec"]["containers"]
    return c


def configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The ConfigMap the server container takes its PAIRSCORE_* flags from."""
    [ref] = container(docs)["envFrom"]
    return only(docs, "ConfigMap", ref["configMapRef"]["name"])["data"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- PromQL: alerts, dashboard, autoscaler -----------------------------------------------------


def alert_groups() -> dict[str, Any]:
    """The rule groups of the PrometheusRule, as a Prometheus rule file."""
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return doc["spec"]


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``panels`` and the panels nested in them (rows), depth first."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    return [
        t["expr"] for p in all_panels(dashboard()["panels"]) for t in p.get("targets", []) if t.get("expr")
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


def need_promtool() -> str:
    """promtool's path (skips without it)."""
    return need_tool(
        "promtool", "`make test` installs it (Makefile target tools, from Debian's prometheus package)"
    )


# --- the Dockerfile ---------------------------------------------------------------------------------


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


def stage_args(stage: dict[str, Any]) -> dict[str, str]:
    out = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def stage_env(stage: dict[str, Any]) -> dict[str, str]:
    out = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def dockerfile_stage(name: str) -> dict[str, Any]:
    [stage] = [s for s in dockerfile_stages() if s["name"] == name]
    return stage


def dockerfile_uid() -> int:
    final = dockerfile_stages()[-1]
    users = [args for keyword, args in final["instructions"] if keyword == "USER"]
    return int(users[-1].split(":")[0])
