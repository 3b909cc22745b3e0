"""Which scored rows ``pairscore filter`` keeps: thresholds and an exact top fraction.

**Thresholds** (``--min METRIC=VALUE``, ``--max METRIC=VALUE``): a row is
kept when every bound holds (inclusive). A row whose metric is undefined
(``mean_conditional_logprob`` and ``perplexity`` of an empty response) does
not pass a bound on that metric.

**Top fraction** (``--top-fraction Q --by METRIC``): keeps exactly
k = ⌈Q · n⌉ rows, the best by the metric (higher log-probs, lower
perplexity), where n counts the scored rows that have the metric. It is
exact, not a streaming estimate: the rows are scored once into an
intermediate file, then two local passes over that file find the k-th best
value and write the outputs in input order. Ties at the cut-off are broken
by input order (earlier rows first). Thresholds, if also given, apply on
top: a row must be in the top fraction *and* pass them. With
``--top-among passing`` the top fraction is taken of the rows that pass the
thresholds instead (n counts those): the usual IFD selection, the highest
IFD among the pairs with IFD <= 1, is ``--max ifd=1 --top-among passing
--top-fraction Q --by ifd`` (docs/scores.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pairscore.pipeline.columns import Metric, metric, value_of
from pairscore.pipeline.formats import Row


@dataclass(frozen=True)
class Bound:
    """``low <= metric <= high`` (either side may be open)."""

    metric: Metric
    low: float = -math.inf
    high: float = math.inf

    def holds(self, value: float) -> bool:
        """Whether ``value`` is within the bound (NaN never is)."""
        return not math.isnan(value) and self.low <= value <= self.high


def parse_bound(text: str, *, upper: bool) -> Bound:
    """``"mean_conditional_logprob=-2.5"`` -> a Bound (``upper``: a --max, else a --min)."""
    name, sep, number = text.partition("=")
    if not sep:
        raise ValueError(f"expected METRIC=VALUE, got {text!r}")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{number!r} in {text!r} is not a number") from None
    m = metric(name.strip())
    return Bound(m, high=value) if upper else Bound(m, low=value)


class Thresholds:
    """All --min/--max bounds of a run."""

    def __init__(self, bounds: Sequence[Bound] = ()) -> None:
        self.bounds = tuple(bounds)

    def passes(self, row: Row) -> bool:
        """Whether a scored row meets every bound."""
        return all(b.holds(value_of(row, b.metric.column)) for b in self.bounds)

    def describe(self) -> list[str]:
        """Human-readable bounds, e.g. ``['mean_conditional_logprob >= -2.5']``."""
        out = []
        for b in self.bounds:
            if b.low > -math.inf:
                out.append(f"{b.metric.column} >= {b.low:g}")
            if b.high < math.inf:
                out.append(f"{b.metric.column} <= {b.high:g}")
        return out


def rank_key(value: float, m: Metric) -> float:
    """A key where larger is better (NaN stays NaN)."""
    return value if m.higher_is_better else -value


@dataclass(frozen=True)
class Cutoff:
    """Keep rows whose key is above ``key``, and the first ``ties`` rows whose key equals it."""

    key: float
    ties: int
    keep: int

    @classmethod
    def find(cls, keys: Iterable[float], fraction: float) -> Cutoff:
        """The cut-off keeping ⌈fraction · n⌉ of the non-NaN ``keys`` (larger is better)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"the top fraction must be in (0, 1], got {fraction}")
        valid = [k for k in keys if not math.isnan(k)]
        keep = min(len(valid), math.ceil(fraction * len(valid) - 1e-9))
        if keep == 0:
            return cls(math.inf, 0, 0)
        valid.sort(reverse=True)
        key = valid[keep - 1]
        above = sum(1 for k in valid[:keep] if k > key)
        return cls(key, keep - above, keep)


class TopSelector:
    """Applies a :class:`Cutoff` while rows stream by in input order."""

    def __init__(self, m: Metric, cutoff: Cutoff) -> None:
        self.metric = m
        self.cutoff = cutoff
        self._ties_left = cutoff.ties

    def keeps(self, row: Row) -> bool:
        """Whether ``row`` is among the best (call once per row, in order)."""
        key = rank_key(value_of(row, self.metric.column), self.metric)
        if math.isnan(key) or key < self.cutoff.key:
            return False
        if key > self.cutoff.key:
            return True
        if self._ties_left > 0:
            self._ties_left -= 1
            return True
        return False
