"""Bearer-token auth does not tell an unauthenticated caller which methods exist.

Without a valid token, a method the server does not have answers exactly as
one it has: UNAUTHENTICATED, with the same message. Only a caller with a
valid token learns that a method is UNIMPLEMENTED. Health checks stay open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.fake_engine import FakeEngine

TOKEN = "s3cret-token-for-tests"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
BAD_METADATA = [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
KNOWN = "/pairscore.v1.ScoringService/GetModelInfo"
UNKNOWN = [
    "/pairscore.v1.ScoringService/NoSuchMethod",
    "/no.such.Service/Method",
    "/grpc.reflection.v1alpha.ServerReflection/Nope",
]


def status(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details of ``call(*args, **kwargs)``, which must fail."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not isinstance(result, bytes):
            list(result)  # a stream: its status comes with its end
    return info.value.code(), info.value.details()


@pytest.fixture
def target(start_server: Callable[..., Any]) -> str:
    st = start_server(FakeEngine(), auth_tokens=(TOKEN,))
    return f"127.0.0.1:{st.server.port}"


def test_unknown_methods_answer_unauthenticated_without_a_token(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        # A method that exists, without a token: the reference answer.
        known = status(channel.unary_unary(KNOWN), b"", timeout=10)
        assert known[0] is grpc.StatusCode.UNAUTHENTICATED
        for metadata in BAD_METADATA:
            for method in UNKNOWN + [KNOWN]:
                unary = channel.unary_unary(method)
                assert status(unary, b"", timeout=10, metadata=metadata) == known, method
                streaming = channel.stream_stream(method)
                requests = iter([b"", b""])
                assert status(streaming, requests, timeout=10, metadata=metadata) == known, method
                server_streaming = channel.unary_stream(method)
                garbage = b"\x0a\xff\xff"
                assert status(server_streaming, garbage, timeout=10, metadata=metadata) == known, method


def test_a_valid_token_still_learns_that_a_method_is_unimplemented(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        for method in UNKNOWN:
            code, _ = status(channel.unary_unary(method), b"", timeout=10, metadata=GOOD)
            assert code is grpc.StatusCode.UNIMPLEMENTED, method
        # Health checks need no token, and an unknown Health method is simply unimplemented.
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        nope = channel.unary_unary("/grpc.health.v1.Health/Nope")
        assert status(nope, b"", timeout=10)[0] is grpc.StatusCode.UNIMPLEMENTED
