"""The /metrics HTTP endpoint: /metrics only, on the host the server listens on."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pairscore_server.metrics import Metrics

from harness.fake_engine import FakeEngine


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def metrics_url() -> Iterator[str]:
    metrics = Metrics()
    metrics.serving.set(1)
    port = metrics.start_http_server(port=0, host="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        metrics.stop_http_server()


def test_metrics_are_served_on_the_metrics_path(metrics_url: str) -> None:
    code, body = get(f"{metrics_url}/metrics")
    assert code == 200 and "pairscore_serving 1.0" in body
    # prometheus_client's name[] filter still works.
    code, body = get(f"{metrics_url}/metrics?name[]=pairscore_serving")
    assert code == 200 and "pairscore_serving 1.0" in body and "pairscore_requests" not in body


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/metricsx", "/metrics/x", "/x/metrics", "/admin"])
def test_other_paths_are_not_found(metrics_url: str, path: str) -> None:
    code, body = get(metrics_url + path)
    assert code == 404, path
    assert "pairscore_" not in body


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def test_the_metrics_port_binds_the_server_host_only(start_server: Callable[..., Any]) -> None:
    """--host 127.0.0.1 keeps /metrics on 127.0.0.1: another loopback address is refused."""
    st = start_server(FakeEngine(), host="127.0.0.1", metrics_port=0)
    port = st.server.metrics_port
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    if not _connects("127.0.0.2", st.server.port):
        assert not _connects("127.0.0.2", port)
    else:  # pragma: no cover - 127.0.0.2 routed elsewhere: cannot tell
        pytest.skip("127.0.0.2 reaches 127.0.0.1's listeners here")


def test_the_default_host_of_the_http_server_is_loopback() -> None:
    metrics = Metrics()
    port = metrics.start_http_server(port=0)
    try:
        assert _connects("127.0.0.1", port)
        assert not _connects("127.0.0.2", port)
    finally:
        metrics.stop_http_server()
