"""Issue 22, the HTTP port: where it listens, slow and stalled clients, the connection cap,
bodies that used to be a 500, and the answer-size bound.

A real server with the fake engine and real sockets over loopback. Before
issue 22 the port listened on IPv6 only, held partial heads and stalled
bodies for ever, ignored ``--max-concurrent-rpcs``, answered a lone
surrogate or deep nesting with a 500 and a traceback, and refused answers
for per-token detail nobody asked for.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from typing import Any

import pytest

from harness.fake_engine import FakeEngine
from harness.openai_http import (
    HttpAnswer,
    http_call,
    openai_url,
    parse_raw_answer,
    raw_connection,
    read_until_closed,
)
from harness.servers import ServerThread, metric_samples

GOOD = {"model": "fake-model", "prompt": "hello", "echo": True, "max_tokens": 0, "logprobs": 0}
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def completions(st: ServerThread, body: Any = None, **kwargs: Any) -> HttpAnswer:
    return http_call(f"{openai_url(st)}/completions", body=body, **kwargs)


def assert_json_error(answer: HttpAnswer, status: int, code: str, *words: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in error["message"]


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- where it listens -------------------------------------------------------------


def test_the_default_host_serves_ipv4_and_ipv6_clients_as_grpc_does(start_server: Any) -> None:
    # before: [::] bound IPv6 only, so 127.0.0.1 (and clients whose localhost is IPv4) was refused
    st = start_server(FakeEngine(), openai_port=0, host="[::]")
    hosts = ["127.0.0.1", "localhost"] + (["::1"] if ipv6_loopback() else [])
    for host in hosts:
        answer = http_call(f"{openai_url(st, host)}/completions", body=GOOD)
        assert answer.status == 200, (host, answer.body)


def test_a_named_host_is_served_on_each_of_its_addresses_on_one_port(start_server: Any) -> None:
    st = start_server(FakeEngine(), openai_port=0, host="localhost")
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
    for host in addresses:
        answer = http_call(f"{openai_url(st, host)}/models")
        assert answer.status == 200, (host, answer.body)


def test_openai_host_keeps_the_port_local_while_grpc_serves_every_interface(start_server: Any) -> None:
    from pairscore_server.flags import build_config

    assert build_config([], {}).openai_host is None  # default: --host
    assert build_config([], {"PAIRSCORE_OPENAI_HOST": "127.0.0.1"}).openai_host == "127.0.0.1"
    assert build_config(["--openai-host", "::1"], {"PAIRSCORE_OPENAI_HOST": "x"}).openai_host == "::1"
    st = start_server(FakeEngine(), openai_port=0, host="[::]", openai_host="127.0.0.1")
    assert http_call(f"{openai_url(st)}/completions", body=GOOD).status == 200
    if ipv6_loopback():
        with pytest.raises(OSError):
            socket.create_connection(("::1", st.server.openai_port), timeout=5).close()
    assert st.client().score([("a", "b")])  # gRPC on every interface


# --- slow and stalled clients, the connection cap --------------------------------


def test_partial_heads_are_closed_after_the_header_timeout_while_others_are_served(
    start_server: Any,
) -> None:
    # before: 150 partial-header connections were held 15+ s (for ever, in fact)
    st = start_server(FakeEngine(), openai_port=0, openai_header_timeout_s=1.0, max_concurrent_rpcs=512)
    port = st.server.openai_port
    opened = time.monotonic()
    slow = [raw_connection(port, HEAD) for _ in range(150)]
    answer = completions(st, GOOD)  # a normal request meanwhile
    assert answer.status == 200, answer.body
    for sock in slow:
        _, closed = read_until_closed(sock, timeout=max(0.1, opened + 15.0 - time.monotonic()))
        assert closed, "a partial head was held past the header timeout"
        sock.close()
    elapsed = time.monotonic() - opened
    assert elapsed >= 1.0 - 0.05, elapsed  # not before the timeout
    # the connections are gone from the count: a new one is served
    assert st.call(_open_connections(st)) == 0
    assert completions(st, GOOD).status == 200


async def _open_connections(st: ServerThread) -> int:
    endpoint = st.server._openai
    assert endpoint is not None
    return int(endpoint.connections.open)


def test_a_stalled_body_gets_408_after_the_body_timeout_and_the_connection_closes(
    start_server: Any,
) -> None:
    # before: 100 stalled 2 MB bodies were held for ever
    st = start_server(FakeEngine(), openai_port=0, openai_body_timeout_s=1.0, openai_header_timeout_s=30.0)
    port = st.server.openai_port
    head = HEAD + b"Content-Length: 2000000\r\n\r\n"
    stalled = [raw_connection(port, head + b'{"prompt": "' + b"x" * 1000) for _ in range(40)]
    assert completions(st, GOOD).status == 200
    started = time.monotonic()
    for sock in stalled:
        data, closed = read_until_closed(sock, timeout=max(0.1, started + 20.0 - time.monotonic()))
        assert closed
        status, _, body = parse_raw_answer(data)
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert "1 s" in body["error"]["message"] and "--openai-body-timeout" in body["error"]["message"]
        sock.close()
    assert completions(st, GOOD).status == 200


def test_connections_over_the_cap_are_answered_503_at_once(start_server: Any) -> None:
    # before: the port ignored --max-concurrent-rpcs
    st = start_server(FakeEngine(), openai_port=0, max_concurrent_rpcs=8, openai_header_timeout_s=30.0)
    port = st.server.openai_port
    held = [raw_connection(port) for _ in range(8)]
    time.sleep(0.2)  # let the server accept them
    request = json.dumps(GOOD).encode()
    started = time.monotonic()
    extra = raw_connection(port, HEAD + f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
    data, closed = read_until_closed(extra, timeout=10.0)
    waited = time.monotonic() - started
    extra.close()
    status, headers, body = parse_raw_answer(data)
    assert status == 503 and headers["retry-after"] == "1" and closed
    assert body["error"]["code"] == "too_many_connections"
    assert "at most 8 HTTP connections" in body["error"]["message"]
    assert waited < 5.0, waited  # at once, not after a timeout (generous for a loaded machine)
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while st.call(_open_connections(st)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert completions(st, GOOD).status == 200


# --- bodies that were a 500 -------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Any:
    st = ServerThread(FakeEngine(max_context=4096), openai_port=0, max_message_bytes=1 << 20)
    st.start()
    yield st
    st.stop()


def test_a_lone_surrogate_is_a_400_with_a_json_error(shared: ServerThread) -> None:
    # before: 500 with a traceback
    for prompt in ['"ab\\ud800cd"', '["ok", "ab\\udc00"]', '"\\ud83d"']:
        raw = f'{{"model": "fake-model", "prompt": {prompt}, "echo": true, "max_tokens": 0}}'.encode()
        answer = completions(shared, raw=raw)
        assert_json_error(answer, 400, "invalid_unicode", "prompt", "lone UTF-16 surrogate")
    # a surrogate pair is one character, and fine
    raw = b'{"model": "fake-model", "prompt": "a\\ud83d\\ude00", "echo": true, "max_tokens": 0}'
    answer = completions(shared, raw=raw)
    assert answer.status == 200 and answer.body["choices"][0]["text"] == "a\U0001f600"


def test_deep_nesting_is_a_400_with_a_json_error(shared: ServerThread) -> None:
    # before: 500 text/plain with a 30-line traceback per request
    for depth in (33, 100_000):
        raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        assert_json_error(completions(shared, raw=raw), 400, "json_too_deep", f"{depth + 1} deep")
    # brackets inside strings are text, not nesting
    answer = completions(shared, {**GOOD, "prompt": "[[[[" * 20})
    assert answer.status == 200, answer.body
    assert completions(shared, GOOD).status == 200


def test_a_gzip_body_is_read_and_its_expansion_is_capped_by_the_body_limit(shared: ServerThread) -> None:
    packed = gzip.compress(json.dumps(GOOD).encode())
    answer = completions(shared, raw=packed, headers={"Content-Encoding": "gzip"})
    assert answer.status == 200, answer.body
    # a bomb: 64 MiB of zeros in ~64 kB, for a 1 MiB body limit
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"0" * (1 << 20)
    bomb = b"".join(squeeze.compress(zeros) for _ in range(64)) + squeeze.flush()
    assert len(bomb) < 100_000
    before = _peak_rss_reset()
    answer = completions(shared, raw=bomb, headers={"Content-Encoding": "gzip"})
    assert_json_error(answer, 413, "request_entity_too_large", "1048576-byte limit")
    if before is not None:
        grown = _peak_rss() - before
        assert grown < 32 << 20, f"the server grew by {grown >> 20} MiB for a 1 MiB body limit"
    # another encoding is named, not guessed at
    answer = completions(shared, raw=packed, headers={"Content-Encoding": "compress"})
    assert_json_error(answer, 415, "unsupported_content_encoding", "'compress'", "gzip or deflate")
    assert completions(shared, GOOD).status == 200


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _peak_rss_reset() -> int | None:
    """Reset the process's peak RSS (Linux); its current RSS, or None where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss()
    except OSError:
        return None


# --- the answer-size bound counts what was asked for ------------------------------


def test_the_answer_bound_counts_only_what_was_asked_for(start_server: Any) -> None:
    engine = FakeEngine(max_context=4096)
    st = start_server(engine, openai_port=0, max_response_bytes=256 << 10)
    prompts = [f"{i:03d}" + "x" * 227 for i in range(200)]  # 200 prompts of 230 tokens
    # the echoed text without logprobs: before, refused, the bound counting each prompt
    # token's detail (46,000 tokens of it) that the answer does not hold
    answer = completions(st, {"model": "fake-model", "prompt": prompts, "echo": True, "max_tokens": 0})
    assert answer.status == 200, answer.body
    assert [c["text"] for c in answer.body["choices"]] == prompts
    # asking for the per-token detail of every prompt token is refused before scoring
    batches = len(engine.batches)
    answer = completions(
        st, {"model": "fake-model", "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 0}
    )
    assert_json_error(answer, 400, "invalid_argument", "262144-byte answer limit", "less per-token detail")
    assert len(engine.batches) == batches, "nothing was scored"
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_rejected_pairs_total", (("reason", "response_too_large"),))] == 200


def test_many_concurrent_normal_requests_pass_the_cap_one_connection_each(start_server: Any) -> None:
    st = start_server(FakeEngine(), openai_port=0, max_concurrent_rpcs=32)
    answers: list[int] = []

    def call() -> None:
        answers.append(completions(st, GOOD).status)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert answers == [200] * 16
