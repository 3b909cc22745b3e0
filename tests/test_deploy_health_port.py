"""Why the Kubernetes probes use --health-port: a real server, saturated.

With ``--max-concurrent-rpcs N`` the gRPC port runs at most N RPCs at once,
health checks included: when N scoring calls are running, a probe on that port
is refused (RESOURCE_EXHAUSTED) and a liveness probe there would restart a
pod for being busy. The health port is a separate gRPC server: it keeps
answering SERVING under the same load, even to a flood of checks.
deploy/kubernetes probes it (tests/test_deploy_manifests.py checks that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.servicer import SERVICE_NAME

from harness.fake_engine import FakeEngine

MAX_CONCURRENT_RPCS = 2
SERVING = health_pb2.HealthCheckResponse.SERVING


def check(target: str, service: str = "") -> Any:
    """The health status of ``service`` at ``target``, or the gRPC status code that refused the check."""
    with grpc.insecure_channel(target) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                .status
            )
        except grpc.RpcError as exc:
            return exc.code()


def test_the_health_port_answers_while_max_concurrent_rpcs_refuses_the_grpc_port(
    start_server: Callable[..., Any],
) -> None:
    gate = threading.Event()
    st = start_server(FakeEngine(score_gate=gate), max_concurrent_rpcs=MAX_CONCURRENT_RPCS, health_port=0)
    main = f"127.0.0.1:{st.server.port}"
    health = f"127.0.0.1:{st.server.health_port}"
    assert st.server.health_port not in (None, st.server.port)
    assert check(main) == SERVING and check(health) == SERVING  # idle: both answer

    channel = grpc.insecure_channel(main)
    stub = pb_grpc.ScoringServiceStub(channel)
    request = pb.ScoreRequest(pairs=[pb.Pair(prompt="Hello", response=" world")])
    refused = grpc.StatusCode.RESOURCE_EXHAUSTED
    running: list[Any] = []
    try:
        # Saturate: MAX_CONCURRENT_RPCS scoring calls held in the (gated) model. A call
        # that arrives while a slot is still taken (by a health check just answered)
        # is refused: send it again.
        for _ in range(200):
            running = [f for f in running if not (f.done() and f.code() is refused)]
            if len(running) == MAX_CONCURRENT_RPCS and check(main) == refused:
                break
            while len(running) < MAX_CONCURRENT_RPCS:
                running.append(stub.Score.future(request, timeout=60))
            time.sleep(0.05)
        # The gRPC port refuses health checks, the way it would refuse a probe ...
        assert check(main) == refused
        assert check(main, SERVICE_NAME) == refused
        # ... while the health port answers, a flood of checks included.
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda i: check(health, SERVICE_NAME if i % 2 else ""), range(200)))
        assert answers == [SERVING] * 200
        assert not any(f.done() for f in running), "the scoring calls still hold their slots"
        gate.set()
        for future in running:
            assert future.result(timeout=30).results[0].HasField("scores")
    finally:
        gate.set()  # also when an assertion failed: let the model go
        channel.close()
    assert check(main) == SERVING
