"""The grpc.health.v1 service of a pairscore server.

Like grpc's reference ``grpc_health.v1.health.aio.HealthServicer``, with one
difference that matters for shutdown: once :meth:`enter_graceful_shutdown`
ran, every ``Watch`` stream sends NOT_SERVING and then ends (OK). The
reference implementation keeps them open, and since the gRPC server's
graceful stop waits for every running call, a single client using gRPC
client-side health checking (which keeps a Watch open) would hold each
shutdown for the whole grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    """Health of a fixed set of services ("" is the server as a whole), NOT_SERVING at first."""

    def __init__(self, services: Iterable[str]) -> None:
        self._status: dict[str, int] = {name: NOT_SERVING for name in services}
        self._version = 0
        self._changed = asyncio.Condition()
        self._draining = False

    def status(self, service: str = "") -> int | None:
        """The current status of ``service`` (a HealthCheckResponse.ServingStatus), or None."""
        return self._status.get(service)

    async def set(self, service: str, status: int) -> None:
        """Set one service's status; ignored once shutdown began."""
        if not self._draining:
            await self._update({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; Watch streams get that and then end."""
        if self._draining:
            return
        self._draining = True
        await self._update(dict.fromkeys(self._status, NOT_SERVING))

    async def _update(self, changes: dict[str, int]) -> None:
        async with self._changed:
            self._status.update(changes)
            self._version += 1
            self._changed.notify_all()

    async def Check(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        last: int | None = None
        while True:
            version = self._version
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._draining:
                return
            async with self._changed:
                # awaited before the next iteration rebinds ``version``
                await self._changed.wait_for(lambda: self._version != version)  # noqa: B023
