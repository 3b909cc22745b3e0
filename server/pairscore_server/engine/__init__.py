"""The scoring engine: tokenization, batched forward passes and log-prob sums.

It knows nothing of gRPC; the server feeds it plain dataclasses from
:mod:`pairscore.types` and gets plain dataclasses back, through the
:class:`~pairscore_server.engine.interface.Engine` protocol.

Importing this package does not import torch: :class:`ScoringEngine` (which
does) is loaded on first access, so the interface, :class:`ModelSpec`,
:class:`EngineLimits` and the out-of-memory helpers stay cheap for code that
only wires an engine up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pairscore_server.engine.engine_limits import EngineLimits
from pairscore_server.engine.interface import (
    Engine,
    ForwardStats,
    ScoreCancelled,
    ScoredBatch,
    merge_outcomes,
    score_pairs,
)
from pairscore_server.engine.prepared import PreparedPair, TokenSpan
from pairscore_server.engine.spec import ModelSpec

if TYPE_CHECKING:
    from pairscore_server.engine.engine import ScoringEngine

__all__ = [
    "Engine",
    "EngineLimits",
    "ForwardStats",
    "ScoreCancelled",
    "ModelSpec",
    "PreparedPair",
    "ScoredBatch",
    "ScoringEngine",
    "TokenSpan",
    "merge_outcomes",
    "score_pairs",
]

_LAZY = {"ScoringEngine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pairscore_server.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
