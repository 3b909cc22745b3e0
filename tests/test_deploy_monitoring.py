"""deploy/kubernetes/components/monitoring and autoscaling: alerts, dashboard, autoscaler.

* ``promtool check rules`` and ``promtool test rules`` on the alerts, and
  every dashboard and autoscaler query is valid PromQL.
* ``promtool check metrics`` on the /metrics of a real in-process server, and
  every metric (and label) that the alerts, the dashboard and the autoscaler
  use is in that exposition.

``make test`` installs promtool (Makefile ``tools``). Without it the tests
that need it skip and say so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.config import ServerConfig

from harness.deploy import (
    MONITORING,
    ROOT,
    TARGET_LABELS,
    alert_groups,
    alert_queries,
    all_panels,
    autoscaler_queries,
    dashboard,
    dashboard_queries,
    dashboard_variable_queries,
    grafana_to_promql,
    need_promtool,
    run,
)


@pytest.fixture(scope="module")
def promtool() -> str:
    return need_promtool()


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


def test_the_rule_file_for_promtool_is_the_prometheusrule_spec() -> None:
    """pairscore-alerts.yaml, which alerts.test.yaml loads, is prometheusrule.yaml's spec."""
    committed = yaml.safe_load((MONITORING / "pairscore-alerts.yaml").read_text())
    assert committed == alert_groups(), "copy prometheusrule.yaml's spec into pairscore-alerts.yaml"


@pytest.mark.parametrize("cwd", ["monitoring folder", "repository root"])
def test_promtool_runs_the_alert_tests_from_the_checkout(promtool: str, cwd: str) -> None:
    """What a user types: from the monitoring folder, or with the path from the root."""
    folder = MONITORING.relative_to(ROOT)
    here, prefix = (MONITORING, Path()) if cwd == "monitoring folder" else (ROOT, folder)
    proc = run([promtool, "check", "rules", str(prefix / "pairscore-alerts.yaml")], cwd=here)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([promtool, "test", "rules", str(prefix / "alerts.test.yaml")], cwd=here)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout and "WARNING" not in proc.stdout + proc.stderr


def test_dashboard_and_autoscaler_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = [grafana_to_promql(q) for q in dashboard_queries()] + autoscaler_queries()
    assert len(queries) > 10
    # promtool checks PromQL inside rule files: one recording rule per query.
    rules = {
        "groups": [
            {
                "name": "queries",
                "rules": [{"record": f"pairscore:query_{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_wired_to_its_variables() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= names
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dash["panels"]):
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

    return {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


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
            stub.Score(
                pb.ScoreRequest(
                    pairs=[
                        pb.Pair(prompt="Hello", response=" world"),
                        pb.Pair(prompt="a " * n, response=" b" * n),  # an item error
                    ]
                ),
                timeout=30,
            )
            request = pb.ScoreRequest(pairs=[pb.Pair(prompt="x", response=" y")])
            list(stub.ScoreStream(iter([request, request]), timeout=30))
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            with pytest.raises(grpc.RpcError):  # a failed RPC
                stub.Score(
                    pb.ScoreRequest(
                        pairs=[pb.Pair(prompt="x", response="y")],
                        options=pb.ScoreOptions(tokenization=99),
                    ),
                    timeout=30,
                )
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
