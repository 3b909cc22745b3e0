"""Plain HTTP calls to the OpenAI-compatible port (``--openai-port``), for its tests."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpAnswer:
    """One HTTP answer: status, headers (lower-case names) and the parsed JSON body."""

    status: int
    headers: dict[str, str]
    body: Any


def http_call(
    url: str,
    *,
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = None,
    method: str | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> HttpAnswer:
    """``POST`` ``body`` as JSON (or ``raw`` bytes), or ``GET`` without either; errors are answers too."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, dict(exc.headers), exc.read()
    return HttpAnswer(status, {k.lower(): v for k, v in headers.items()}, json.loads(payload))


def openai_base(server: Any) -> str:
    """``http://127.0.0.1:PORT/v1`` of a harness.servers.ServerThread started with openai_port."""
    return f"http://127.0.0.1:{server.server.openai_port}/v1"


def openai_url(server: Any, host: str = "127.0.0.1") -> str:
    """``http://HOST:PORT/v1`` of the OpenAI port of a harness.servers.ServerThread (IPv6 bracketed)."""
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.server.openai_port}/v1"


def raw_connection(port: int, data: bytes = b"", *, host: str = "127.0.0.1") -> socket.socket:
    """A plain TCP connection to ``host:port`` that has sent ``data`` (and waits for more)."""
    sock = socket.create_connection((host, port), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection: (bytes, closed within ``timeout``).

    A reset counts as closed."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return received, True
    except TimeoutError:
        return received, False


def parse_raw_answer(data: bytes) -> tuple[int, dict[str, str], Any]:
    """(status, headers with lower-case names, JSON body) of one raw HTTP/1.1 answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    return status, headers, json.loads(body[:length])
