"""Counts and score quantiles of a pipeline run, small enough to save in a checkpoint.

Quantiles come from a uniform reservoir sample of at most ``RESERVOIR_SIZE``
values (Vitter's algorithm R): exact while the run has fewer values, an
estimate with a rank error of about 1/sqrt(size) (1 %) beyond.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RESERVOIR_SIZE = 10_000
SUMMARY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class Reservoir:
    """A uniform sample of at most ``size`` values of a stream."""

    def __init__(self, size: int = RESERVOIR_SIZE, *, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self.min = math.inf
        self.max = -math.inf
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        """Offer one value (NaN is ignored)."""
        if math.isnan(value):
            return
        self.seen += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if len(self.values) < self.size:
            self.values.append(value)
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.values[j] = value

    @property
    def exact(self) -> bool:
        """Whether the sample holds every value seen."""
        return self.seen <= self.size

    def quantile(self, q: float) -> float:
        """The q-quantile (linear interpolation) of the sample; NaN when empty."""
        return quantile(self.values, q)

    def to_state(self) -> dict[str, Any]:
        """A JSON-able snapshot."""
        return {"size": self.size, "seen": self.seen, "values": self.values, "min": self.min, "max": self.max}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Reservoir:
        """Rebuild from :meth:`to_state` (the random stream restarts, which keeps it uniform)."""
        r = cls(state["size"], seed=state["seen"])
        r.seen = state["seen"]
        r.values = list(state["values"])
        r.min = state["min"]
        r.max = state["max"]
        return r


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (linear interpolation); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RunStats:
    """What a run did so far; saved with each checkpoint."""

    rows: int = 0
    scored: int = 0
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    routed: Counter[str] = field(default_factory=Counter)
    metric: Reservoir = field(default_factory=Reservoir)

    @property
    def failed(self) -> int:
        """Rows that got an error instead of scores."""
        return sum(self.errors.values())

    def to_state(self) -> dict[str, Any]:
        """A JSON-able snapshot."""
        return {
            "rows": self.rows,
            "scored": self.scored,
            "tokens": self.tokens,
            "errors": dict(self.errors),
            "routed": dict(self.routed),
            "metric": self.metric.to_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunStats:
        """Rebuild from :meth:`to_state`."""
        return cls(
            rows=state["rows"],
            scored=state["scored"],
            tokens=state["tokens"],
            errors=Counter(state["errors"]),
            routed=Counter(state["routed"]),
            metric=Reservoir.from_state(state["metric"]),
        )
