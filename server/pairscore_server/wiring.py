"""Wiring a ready engine into a serving stack: limits, batcher and scoring service.

:func:`wire` is what a server does once its model is loaded and warmed up:
it resolves the configured limits against the engine, starts the batching
loop on the model thread's executor and builds the
:class:`~pairscore_server.service.ScoringService` the gRPC servicer calls.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass

from pairscore.types import ModelInfo
from pairscore_server.batcher import Batcher
from pairscore_server.config import ServerConfig
from pairscore_server.engine.interface import Engine
from pairscore_server.limits import Limits, resolve_limits
from pairscore_server.metrics import Metrics
from pairscore_server.service import ScoringService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """The parts that serve one engine: its limits, its (started) batcher, its service."""

    limits: Limits
    batcher: Batcher
    service: ScoringService

    @property
    def info(self) -> ModelInfo:
        """The served model and this server's limits, as GetModelInfo answers."""
        return self.service.model_info()


def wire(
    engine: Engine,
    config: ServerConfig,
    *,
    model_executor: Executor,
    prepare_executor: Executor,
    metrics: Metrics,
) -> Serving:
    """Build and start the serving stack for ``engine``; call it inside the running event loop.

    ``model_executor`` is the single thread every forward pass runs on;
    ``prepare_executor`` tokenizes requests off the event loop: ``prepare_workers``
    threads for large requests and one more for small ones.
    """
    limits = resolve_limits(
        max_context=engine.info.max_context_tokens,
        max_batch_tokens=engine.max_batch_tokens,
        max_pairs_per_request=config.max_pairs_per_request,
        max_text_chars=config.max_text_chars,
        max_item_tokens=config.max_item_tokens,
        max_queue_tokens=config.max_queue_tokens,
        max_message_bytes=config.max_message_bytes,
        max_response_bytes=config.max_response_bytes,
        max_request_chars=config.max_request_chars,
        max_preparing_chars=config.max_preparing_chars,
    )
    batcher = Batcher(
        engine,
        model_executor,
        max_batch_pairs=config.max_batch_pairs,
        max_wait_s=config.max_wait_s,
        max_queue_tokens=limits.max_queue_tokens,
        metrics=metrics,
    )
    batcher.start()
    service = ScoringService(
        engine=engine,
        batcher=batcher,
        metrics=metrics,
        prepare_executor=prepare_executor,
        limits=limits,
        prepare_workers=config.prepare_workers,
    )
    serving = Serving(limits=limits, batcher=batcher, service=service)
    _log_serving(serving, engine, config)
    return serving


def _log_serving(serving: Serving, engine: Engine, config: ServerConfig) -> None:
    info, limits = serving.info, serving.limits
    log.info(
        "serving model %s (source %s, revision %s) on %s as %s; context %d tokens, "
        "prefix token %r (%s); batches of up to %d pairs, %d tokens per forward pass",
        info.model_name,
        info.model_source,
        info.revision or "-",
        info.device,
        info.dtype,
        info.max_context_tokens,
        info.prefix_token,
        info.prefix_policy.value,
        config.max_batch_pairs,
        engine.max_batch_tokens,
    )
    log.info(
        "limits: %d pairs per request, %d characters per text, %d tokens per pair, "
        "%d bytes per message, %d queued tokens, %s concurrent RPCs; %d characters "
        "tokenized per request (%d at once)",
        limits.max_pairs_per_request,
        limits.max_text_chars,
        limits.max_item_tokens,
        limits.max_message_bytes,
        limits.max_queue_tokens,
        config.max_concurrent_rpcs or "unbounded",
        limits.max_request_chars,
        limits.max_preparing_chars,
    )
