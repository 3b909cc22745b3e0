"""The model-worker watchdog: health follows whether the worker answers.

While a server serves, :func:`watch_worker` polls its batcher. When one
forward pass has run longer than ``forward_timeout_s``, the batcher fails
the callers waiting on the stuck worker (they get ``UNAVAILABLE`` instead of
hanging) and refuses work; health turns ``NOT_SERVING`` until the worker
answers again. A batching loop that died turns health ``NOT_SERVING`` for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pairscore_server.batcher import Batcher

log = logging.getLogger(__name__)


async def watch_worker(
    batcher: Batcher,
    *,
    forward_timeout_s: float | None,
    set_serving: Callable[[bool], Awaitable[None]],
    stopped: Callable[[], bool],
) -> None:
    """Poll ``batcher`` until cancelled; ``set_serving`` reports health, ``stopped`` tells
    whether the server is shutting down (a loop that ends then is no crash)."""
    timeout = forward_timeout_s
    interval = 0.5 if timeout is None else min(0.5, max(0.02, timeout / 5))
    crashed = False
    while True:
        await asyncio.sleep(interval)
        busy = batcher.busy_seconds
        if timeout is not None and not batcher.stalled and busy > timeout:
            log.error(
                "the model worker has been in one forward pass for %.1f s (forward timeout "
                "%.1f s): health NOT_SERVING, waiting callers get UNAVAILABLE",
                busy,
                timeout,
            )
            batcher.abandon_in_flight(
                f"the model worker is stuck: one forward pass has run for {busy:.1f} s "
                f"(forward timeout {timeout:g} s); retry later or on another replica"
            )
        if not batcher.running and not stopped() and not crashed:
            crashed = True
            log.critical("the batching loop has stopped: health NOT_SERVING")
        await set_serving(batcher.running and not batcher.stalled)
