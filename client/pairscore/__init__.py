"""pairscore: score (prompt, response) pairs with a causal language model over gRPC.

The base install is the client (no torch)::

    from pairscore import ScoringClient, Pair
    with ScoringClient("localhost:50051") as client:
        [s] = client.score([Pair("The capital of France is", " Paris.")])
        print(s.conditional_logprob)

The server lives in the ``pairscore_server`` package (``pip install 'pairscore[server]'``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pairscore.types import (
    Candidate,
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    EndOfTurn,
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    PrefixMode,
    PrefixPolicy,
    ScoreOptions,
    Side,
    TokenizationMode,
    TokenScore,
    Truncation,
)

try:
    __version__ = version("pairscore")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

_LAZY = {
    "ScoringClient": "pairscore.client",
    "AsyncScoringClient": "pairscore.aio",
    "ChannelSettings": "pairscore.channel",
    "RetryPolicy": "pairscore.channel",
    "TlsConfig": "pairscore.channel",
    "ScoringError": "pairscore.errors",
    "InvalidArgumentError": "pairscore.errors",
    "OverloadedError": "pairscore.errors",
    "UnavailableError": "pairscore.errors",
    "ConnectionFailedError": "pairscore.errors",
    "MessageTooLargeError": "pairscore.errors",
    "DeadlineExceededError": "pairscore.errors",
    "UnauthenticatedError": "pairscore.errors",
    "PermissionDeniedError": "pairscore.errors",
    "NotFoundError": "pairscore.errors",
    "InternalError": "pairscore.errors",
    "CallCancelledError": "pairscore.errors",
    "UnimplementedError": "pairscore.errors",
}


def __getattr__(name: str):
    # The client (and grpc) load on first use, so that `import pairscore.types`
    # stays light for the server's engine.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pairscore' has no attribute {name!r}")


__all__ = [
    "Candidate",
    "CandidateSet",
    "CandidateSetResult",
    "ChatMessage",
    "EndOfTurn",
    "PrefixMode",
    "Truncation",
    "AsyncScoringClient",
    "CallCancelledError",
    "ChannelSettings",
    "ConnectionFailedError",
    "MessageTooLargeError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RetryPolicy",
    "TlsConfig",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "ItemError",
    "ItemErrorCode",
    "ModelInfo",
    "Pair",
    "PairScore",
    "PrefixPolicy",
    "ScoreOptions",
    "ScoringClient",
    "ScoringError",
    "Side",
    "TokenScore",
    "TokenizationMode",
    "__version__",
]
