"""Running the server: gRPC, health, reflection, metrics, signals.

:class:`RunningServer` is the whole server inside the current event loop
(tests use it with port 0); :func:`serve` runs one until SIGTERM/SIGINT;
:func:`main` is ``pairscore serve``.

Start-up order: the gRPC port opens first with health ``NOT_SERVING`` (so
orchestrators can probe it while the model loads), then the model is loaded
and warmed up on the model thread, then health turns ``SERVING``. On
SIGTERM/SIGINT health turns ``NOT_SERVING``, the server stops taking RPCs,
running RPCs get ``grace_period_s`` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import pairscore
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.batcher import Batcher
from pairscore_server.config import ServerConfig, build_config
from pairscore_server.engine.loading import ModelLoadError
from pairscore_server.metrics import Metrics
from pairscore_server.service import ScoringService
from pairscore_server.servicer import SERVICE_NAME, ScoringServicer

if TYPE_CHECKING:
    from pairscore_server.engine import ScoringEngine
    from pairscore_server.engine.loading import ModelSpec

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Services whose health is reported: the whole server ("") and ScoringService.
HEALTH_SERVICES = ("", SERVICE_NAME)


def _load_engine(spec: ModelSpec) -> ScoringEngine:
    from pairscore_server.engine.loading import load_engine  # imports torch

    return load_engine(spec)


class RunningServer:
    """One pairscore server in the running event loop.

    ``await start()`` opens the ports and begins loading the model in the
    background; ``await wait_ready()`` waits until it serves (and raises if
    loading failed); ``await stop()`` shuts down gracefully. As an async
    context manager it does start + wait_ready on entry and stop on exit.
    Pass ``engine`` to serve an engine built elsewhere (then
    ``config.model`` is ignored), or ``engine_loader`` to replace how the
    engine is built from ``config.model``.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: ScoringEngine | None = None,
        engine_loader: Callable[[ModelSpec], ScoringEngine] = _load_engine,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self._engine = engine
        self._engine_loader = engine_loader
        self._servicer = ScoringServicer(
            metrics=self.metrics, stream_max_in_flight=config.stream_max_in_flight
        )
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="pairscore-model")
        self._prepare_executor = ThreadPoolExecutor(
            config.prepare_workers, thread_name_prefix="pairscore-prepare"
        )
        self._server: grpc.aio.Server | None = None
        self._batcher: Batcher | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._stopped = False
        self.port: int | None = None
        self.metrics_port: int | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the gRPC (and metrics) ports and start loading the model in the background."""
        if self._server is not None:
            raise RuntimeError("the server was already started")
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, _NOT_SERVING)
        pb_grpc.add_ScoringServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http_server(
                    port=self.config.metrics_port, host=self.config.metrics_host
                )
            except OSError as exc:
                raise OSError(
                    f"cannot serve metrics on {self.config.metrics_host}:"
                    f"{self.config.metrics_port}: {exc}"
                ) from exc
        try:
            self.port = server.add_insecure_port(self.config.address)
        except RuntimeError as exc:
            self.metrics.stop_http_server()
            raise OSError(f"cannot listen on {self.config.address}: {exc}") from exc
        await server.start()
        self._server = server
        log.info("gRPC listening on %s:%d", self.config.host, self.port)
        self._ready_task = asyncio.get_running_loop().create_task(
            self._become_ready(), name="pairscore-load-model"
        )

    async def wait_ready(self) -> None:
        """Wait until the model is loaded and warmed up; raises what loading raised."""
        if self._ready_task is None:
            raise RuntimeError("start() was not called")
        await asyncio.shield(self._ready_task)

    @property
    def ready(self) -> bool:
        """Whether the model is loaded, warmed up and being served."""
        task = self._ready_task
        return (
            task is not None and task.done() and not task.cancelled() and task.exception() is None
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: health NOT_SERVING, refuse new RPCs, let running ones finish.

        Running RPCs get ``grace`` seconds (default ``config.grace_period_s``)
        and are cancelled after that. Then the batcher drains and the metrics
        endpoint closes. Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()  # a load/warmup thread cannot be interrupted; drop it
        if self._server is not None:
            log.info("shutting down: finishing running requests (grace %.1f s)", grace)
            await self._server.stop(grace)
        if self._batcher is not None:
            await self._batcher.stop()
        self._model_executor.shutdown(wait=False, cancel_futures=True)
        self._prepare_executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.model_loaded.set(0)
        self.metrics.stop_http_server()
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> RunningServer:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- model loading ---------------------------------------------------------------

    async def _become_ready(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self._engine
        if engine is None:
            log.info("loading model %s", self.config.model.model or "(embedded default)")
            engine = await loop.run_in_executor(
                self._model_executor, self._engine_loader, self.config.model
            )
            self._engine = engine
        log.info("warming up the model")
        await loop.run_in_executor(self._model_executor, engine.warmup)
        batcher = Batcher(
            engine,
            self._model_executor,
            max_batch_pairs=self.config.max_batch_pairs,
            max_wait_s=self.config.max_wait_s,
            metrics=self.metrics,
        )
        batcher.start()
        self._batcher = batcher
        service = ScoringService(
            engine=engine,
            batcher=batcher,
            metrics=self.metrics,
            prepare_executor=self._prepare_executor,
        )
        info = service.model_info()
        self._servicer.set_service(service)
        self.metrics.set_model(
            version=info.server_version or pairscore.__version__,
            model=info.model_name,
            dtype=info.dtype,
            device=info.device,
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, _SERVING)
        log.info(
            "serving model %s (source %s, revision %s) on %s as %s; context %d tokens, "
            "prefix token %r (%s), batches of up to %d pairs / %d padded tokens",
            info.model_name,
            info.model_source,
            info.revision or "-",
            info.device,
            info.dtype,
            info.max_context_tokens,
            info.prefix_token,
            info.prefix_policy.value,
            self.config.max_batch_pairs,
            engine.max_batch_tokens,
        )


async def serve(config: ServerConfig, engine: ScoringEngine | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully.

    Raises whatever loading the model raised (after closing the ports).
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop_requested.is_set():
            log.warning("%s again: still shutting down", signal.Signals(signum).name)
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    running = RunningServer(config, engine=engine)
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        await running.start()
        ready = asyncio.ensure_future(running.wait_ready())
        done, _ = await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()  # raises what loading the model raised
            await stopping
        else:  # stopped while the model was loading
            ready.cancel()
    finally:
        stopping.cancel()
        await running.stop()
        for signum in handled:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``pairscore serve``: parse flags (env fallbacks), set up logging, serve.

    Returns the exit code: 0 after a clean shutdown, 1 if the model failed to load.
    """
    config = build_config(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(config))
    except ModelLoadError as exc:
        log.error("cannot load the model: %s", exc)
        return 1
    except OSError as exc:  # a port is taken, or similar
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("the server failed")
        return 1
    return 0
