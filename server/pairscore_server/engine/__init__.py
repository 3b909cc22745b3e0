"""The scoring engine: tokenization, batched forward passes and log-prob sums.

It knows nothing of gRPC; the server feeds it plain dataclasses from
:mod:`pairscore.types` and gets plain dataclasses back.
"""

from pairscore_server.engine.engine import EngineLimits, ScoringEngine
from pairscore_server.engine.prepared import PreparedPair, TokenSpan

__all__ = ["EngineLimits", "PreparedPair", "ScoringEngine", "TokenSpan"]
