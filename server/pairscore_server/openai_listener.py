"""The OpenAI port's sockets and connections: where it listens and how many it holds.

:func:`listen_sockets` binds the gRPC port's host the way gRPC does: the
wildcard ``::`` (``[::]``) as one dual-stack socket, so that IPv4 clients
(``127.0.0.1``) and IPv6 clients (``::1``) both connect, with an IPv4-only
socket where the host has no IPv6; ``0.0.0.0`` as IPv4 only; a name such as
``localhost`` on each of its addresses, all on one port.

:class:`ConnectionCap` holds at most ``limit`` connections open at once: one
more is answered ``503`` with a ``Retry-After`` hint before its request is
read, and closed. Slow clients are bounded elsewhere: the request head by
aiohttp's keep-alive timer (openai_http.py), the body by the handler.

Every refusal is reported to ``on_refused`` with its reason (the
``pairscore_http_refusals_total`` counter): :data:`REFUSED_CONNECTION_CAP`
here; :data:`REFUSED_HEADER_TIMEOUT` for a connection the header timer closed
while it owed a request head (it had sent part of one, or nothing at all since
it opened), not for an idle keep-alive connection closed after its answers; the
handler reports :data:`REFUSED_BODY_TIMEOUT` (its 408).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pairscore_server.metrics import (
    REFUSAL_REASONS,
    REFUSED_CONNECTION_CAP,
    REFUSED_HEADER_TIMEOUT,
)

#: How long a refused connection may stay open while its 503 is delivered.
REFUSED_LINGER_S = 1.0


def _bind(family: int, address: tuple[Any, ...], *, v6only: bool | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for ``host:port``; port 0 picks one free port for all.

    ``host`` may carry IPv6 brackets (``[::]``, as gRPC's address takes it).
    OSError when nothing can be bound.
    """
    host = host.strip().strip("[]")
    if host in ("", "::"):
        if socket.has_ipv6:
            try:
                return [_bind(socket.AF_INET6, ("::", port), v6only=False)]
            except OSError:
                pass  # no IPv6 on this host (or no dual stack): IPv4 always
        return [_bind(socket.AF_INET, ("0.0.0.0", port), v6only=None)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, _, _, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            bound_port = sockets[0].getsockname()[1] if sockets else port
            sockets.append(_bind(family, (address[0], bound_port, *address[2:]), v6only=True))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"{host!r} resolves to no address to listen on")
    return sockets


def _busy_answer(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"this server holds at most {limit} HTTP connections at once "
                "(--max-concurrent-rpcs) and all are in use; retry shortly, or reuse a connection",
                "type": "service_unavailable_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Connection(asyncio.Protocol):
    """One connection: aiohttp's protocol, counted while open, or, over the cap, a refusal.

    A refused connection gets its 503 at once; what it sends is dropped, and it
    is closed when the client has read the answer or after :data:`REFUSED_LINGER_S`.
    The cap is checked when the connection is made (after a TLS handshake),
    one connection at a time, so the count is exact.
    """

    def __init__(self, cap: ConnectionCap, factory: Callable[[], asyncio.Protocol]) -> None:
        self._cap = cap
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # what the header timer needs: requests in progress, whether a request head is
        # owed (bytes since the last request, or none ever), since when it is owed
        self.requests = 0
        self.served = 0
        self.partial = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        cap = self._cap
        self.idle_since = asyncio.get_running_loop().time()
        if cap.limit is not None and cap.open >= cap.limit:
            cap.refuse(REFUSED_CONNECTION_CAP)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(cap.busy_answer)
            if transport.can_write_eof():
                transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            return
        cap.open += 1
        cap.connections[transport] = self
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            if not self.requests:
                self.partial = True
            self._inner.data_received(data)

    def owes_a_head(self) -> bool:
        """Whether the connection waits for a request head it was given time to send:
        none in progress, and part of one received or none ever, for the header timeout."""
        timeout = self._cap.header_timeout_s
        if timeout is None or self.requests or not (self.partial or not self.served):
            return False
        waited = asyncio.get_running_loop().time() - self.idle_since
        return waited >= timeout * 0.99

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        if self._transport is not None:
            self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            cap = self._cap
            cap.open -= 1
            cap.connections.pop(self._transport, None)
            if exc is None and self.owes_a_head():
                cap.refuse(REFUSED_HEADER_TIMEOUT)
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class ConnectionCap:
    """At most ``limit`` open connections (None: no cap); ``refused`` counts refusals by
    reason, each also reported to ``on_refused``. ``header_timeout_s``: the header timer
    of the connections (None: no header timeouts are told apart). The handler tells it
    when each request starts and ends (:meth:`request_started`, :meth:`request_ended`)."""

    def __init__(
        self,
        limit: int | None,
        *,
        header_timeout_s: float | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.limit = limit
        self.open = 0
        self.header_timeout_s = header_timeout_s
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._on_refused = on_refused
        self.busy_answer = _busy_answer(limit or 0)
        self.connections: dict[asyncio.BaseTransport | None, _Connection] = {}

    def refuse(self, reason: str) -> None:
        """Count one refusal for ``reason`` (one of :data:`REFUSAL_REASONS`)."""
        self.refused[reason] += 1
        if self._on_refused is not None:
            self._on_refused(reason)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's head arrived on the connection of ``transport``."""
        conn = self.connections.get(transport) if transport is not None else None
        if conn is not None:
            conn.requests += 1
            conn.partial = False

    def request_ended(self, transport: asyncio.BaseTransport | None) -> None:
        """The request's handler returned: the connection's header timer starts again."""
        conn = self.connections.get(transport) if transport is not None else None
        if conn is not None:
            conn.requests -= 1
            conn.served += 1
            conn.idle_since = asyncio.get_running_loop().time()

    def protocol(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """The protocol for a new connection (``factory``'s unless the cap is reached)."""
        return _Connection(self, factory)


class CappedSite(web.SockSite):
    """aiohttp's site on one bound socket, its connections counted by ``cap``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        cap: ConnectionCap,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._cap = cap
        self._handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        """Listen (as SockSite.start does), making each connection's protocol through the cap."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._cap.protocol(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout_s if self._ssl_context is not None else None,
        )
