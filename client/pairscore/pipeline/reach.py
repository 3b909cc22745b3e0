"""Reaching the server before a ``pairscore score``/``filter`` run starts.

A run first asks the server for its model (``GetModelInfo``) without
``wait_for_ready``, so that a wrong ``--target``, a server that is not
running or a TLS mismatch shows up in seconds with its cause and the flag to
fix, instead of a silent wait ended by ``DEADLINE_EXCEEDED``:

* a fresh run fails at once when no connection can be made (connection
  refused, no such host, TLS handshake failed);
* a ``--resume`` run, or a server that answers but is not ready yet (model
  still loading), is waited for, up to ``--timeout`` seconds, with a line on
  stderr every few seconds that says it is waiting and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from pairscore.errors import ConnectionFailedError, DeadlineExceededError, ScoringError, UnavailableError

#: Seconds between "waiting for the server" lines.
WAIT_REPORT_S = 5.0


def reach_server(
    client: Any,
    *,
    label: str,
    target: str,
    patience_s: float,
    wait_for_unreachable: bool,
    stream: TextIO,
    report_every: float = WAIT_REPORT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """The server's ModelInfo once it answers; raises the last error when it will not.

    ``wait_for_unreachable``: keep trying (up to ``patience_s``) also when no
    connection can be made at all, as a resumed run does; otherwise such a
    failure is raised at once.
    """
    started = clock()
    last_report = started
    pause = 0.25
    why: ScoringError | None = None
    while True:
        left = patience_s - (clock() - started)
        try:
            # The whole patience per attempt: a busy server may be slow to answer, while one
            # that cannot be reached fails in a few seconds anyway (no wait_for_ready).
            return client.model_info(timeout=max(0.1, left), wait_for_ready=False)
        except DeadlineExceededError:
            if why is not None:  # gRPC's own retries ran into the attempt's deadline
                raise why from None
            raise
        except ConnectionFailedError as exc:
            if not wait_for_unreachable:
                raise
            why = exc
            cause = exc.cause
        except UnavailableError as exc:  # the server answered but cannot serve yet
            why, cause = exc, exc.message
        now = clock()
        if now - last_report >= report_every:
            last_report = now
            stream.write(
                f"pairscore {label}: waiting for the server at {target} "
                f"({now - started:.0f}s of {patience_s:g}s, --timeout): {cause}\n"
            )
            stream.flush()
        if now - started + pause + 1.0 >= patience_s:
            assert why is not None  # set by the failed attempt above
            raise why
        sleep(pause)
        pause = min(pause * 2, 2.0)
