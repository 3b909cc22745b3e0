"""Where every pair a server receives ends: the reasons of the pair counters.

Each pair ends in exactly one of ``pairscore_pairs_total{outcome}`` (answered
with its own outcome), ``pairscore_rejected_pairs_total{reason}`` (refused
before admission) or ``pairscore_dropped_pairs_total{reason}`` (admitted, never
answered: the caller left, the deadline passed, the batch failed, shutdown).
The reasons are these constants; :class:`PairCounters` counts them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics

# Reasons of pairscore_dropped_pairs_total (and of rejected, for the ones refused at admission).
DROP_CANCELLED = "cancelled"
DROP_DEADLINE = "deadline"
DROP_SHUTDOWN = "shutdown"
DROP_WORKER = "worker_unavailable"
DROP_FAILED = "batch_failed"
# Reasons of pairscore_rejected_pairs_total only.
REJECT_QUEUE_FULL = "queue_full"
REJECT_REQUEST_LIMIT = "request_limit"
REJECT_INVALID = "invalid_request"
REJECT_RESPONSE_SIZE = "response_too_large"

#: A caller that cancels this close to its deadline counts as "deadline": the client
#: side gives up at its deadline a little before the server's own timer fires.
DEADLINE_SLACK_S = 0.05


def counts_as_deadline(remaining_s: float | None, budget_s: float | None) -> bool:
    """Whether a caller that left with ``remaining_s`` of its ``budget_s`` deadline left gave
    up because of its deadline. The client's timer fires a little before the server's
    (the deadline travels as a timeout), so the last 5 % of the budget, and at least
    :data:`DEADLINE_SLACK_S`, count as "deadline" rather than "cancelled"."""
    if remaining_s is None:
        return False
    slack = DEADLINE_SLACK_S if budget_s is None else max(DEADLINE_SLACK_S, 0.05 * budget_s)
    return remaining_s <= slack


def leave_reason(deadline: float | None, started: float, now: float) -> str:
    """The drop reason of a caller that left at ``now``: "deadline" near its deadline
    (see :func:`counts_as_deadline`), else "cancelled"."""
    if deadline is None:
        return DROP_CANCELLED
    return DROP_DEADLINE if counts_as_deadline(deadline - now, deadline - started) else DROP_CANCELLED


class PairCounters:
    """Counts refused and dropped pairs in the server's metrics (nothing without metrics)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def rejected(self, reason: str, pairs: int) -> None:
        """``pairs`` refused before admission, for ``reason``."""
        if self._metrics is not None and pairs:
            self._metrics.rejected_pairs.labels(reason=reason).inc(pairs)

    def dropped(self, reason: str, pairs: int) -> None:
        """``pairs`` admitted and never answered, for ``reason``."""
        if self._metrics is not None and pairs:
            self._metrics.dropped_pairs.labels(reason=reason).inc(pairs)
