"""Plain HTTP calls to the OpenAI-compatible port (``--openai-port``), for its tests."""

from __future__ import annotations

import json
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
) -> HttpAnswer:
    """``POST`` ``body`` as JSON (or ``raw`` bytes), or ``GET`` without either; errors are answers too."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, dict(exc.headers), exc.read()
    return HttpAnswer(status, {k.lower(): v for k, v in headers.items()}, json.loads(payload))


def openai_base(server: Any) -> str:
    """``http://127.0.0.1:PORT/v1`` of a harness.servers.ServerThread started with openai_port."""
    return f"http://127.0.0.1:{server.server.openai_port}/v1"
