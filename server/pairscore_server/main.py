"""``pairscore serve`` as a process: configuration, logging, signals, exit status.

:func:`main` builds the :class:`~pairscore_server.config.ServerConfig` from
flags and environment, sets up logging and runs :func:`serve`. On
SIGTERM/SIGINT the server stops gracefully (see
:meth:`~pairscore_server.lifecycle.RunningServer.stop`) and the process exits
0; a second signal cancels running RPCs at once and exits 1. If the model
cannot be loaded (bad path, corrupt file, unknown architecture, out of
memory) or warmed up, it logs one ``cannot load the model:`` line and exits
1. The process never waits for a stuck model thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pairscore_server.config import ServerConfig
from pairscore_server.engine.host_allocator import apply_host_allocator
from pairscore_server.engine.interface import Engine
from pairscore_server.engine.spec import ModelLoadError, ModelSpec
from pairscore_server.flags import build_config
from pairscore_server.lifecycle import RunningServer, StartupError, load_default_engine

log = logging.getLogger(__name__)

#: Exit status after a second SIGTERM/SIGINT cut the grace period short.
EXIT_FORCED = 1


async def serve(
    config: ServerConfig,
    engine: Engine | None = None,
    *,
    engine_loader: Callable[[ModelSpec], Engine] = load_default_engine,
) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully.

    Returns the exit status: 0 after a graceful stop, :data:`EXIT_FORCED`
    when a second signal cut the grace period short. Raises whatever
    loading the model raised (after closing the ports).
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    force_requested = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop_requested.is_set():
            log.info(
                "%s received: shutting down (grace %.1f s; send it again to stop at once)",
                name,
                config.grace_period_s,
            )
            stop_requested.set()
        else:
            log.warning("%s received again: cancelling running requests and exiting now", name)
            force_requested.set()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    running = RunningServer(config, engine=engine, engine_loader=engine_loader)
    stopping = asyncio.ensure_future(stop_requested.wait())
    forced = asyncio.ensure_future(force_requested.wait())
    status = 0
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
        stop_task = asyncio.ensure_future(running.stop())
        done, _ = await asyncio.wait({stop_task, forced}, return_when=asyncio.FIRST_COMPLETED)
        if stop_task not in done:
            status = EXIT_FORCED
            await running.abort()
            await stop_task
        forced.cancel()
        for signum in handled:
            loop.remove_signal_handler(signum)
    return status


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (transformers' messages span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _busy_threads(settle_s: float = 0.2) -> list[threading.Thread]:
    """Non-daemon threads still running after ``settle_s`` (a model thread stuck in a forward
    pass or a load); idle executor threads get that long to wind down."""
    main_thread = threading.main_thread()
    deadline = time.monotonic() + settle_s
    busy = []
    for thread in threading.enumerate():
        if thread is main_thread or thread.daemon:
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            busy.append(thread)
    return busy


def main(
    argv: Sequence[str] | None = None,
    *,
    engine_loader: Callable[[ModelSpec], Engine] | None = None,
) -> int:
    """``pairscore serve``: parse flags (env fallbacks), set up logging and the host
    allocator (``--host-allocator``: before any thread starts, so that the model
    thread shares the main heap), serve.

    Returns the exit code: 0 after a clean shutdown, 1 if the model failed
    to load, the server could not start, or a second signal forced the
    exit. If a model thread is still busy (stuck, or loading when the
    signal came), the process exits at once with that code instead of
    waiting for the thread. ``engine_loader`` replaces how the engine is
    built (tests serve a fake engine through the real entry point).
    """
    config = build_config(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    said = apply_host_allocator(config.model.host_allocator == "retain")
    if said:
        log.info("%s", said)
    status = 1
    try:
        status = asyncio.run(serve(config, engine_loader=engine_loader or load_default_engine))
    except ModelLoadError as exc:
        log.error("cannot load the model: %s", _one_line(exc))
    except (StartupError, OSError) as exc:  # a port is taken, a TLS file is missing, ...
        log.error("cannot start: %s", _one_line(exc))
    except Exception:
        log.exception("the server failed")
    busy = _busy_threads()
    if busy:
        log.warning(
            "not waiting for %d busy thread(s) (%s); exiting with status %d",
            len(busy),
            ", ".join(t.name for t in busy),
            status,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
