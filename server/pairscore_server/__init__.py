"""pairscore's server: scoring engine, batcher, gRPC servicer, metrics and CLI.

Needs the ``server`` extra: ``pip install 'pairscore[server]'``. To score
in-process without a server, use :class:`~pairscore_server.scorer.Scorer`::

    from pairscore_server import Scorer

Importing this package does not import torch; ``Scorer`` loads on first access.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pairscore_server.scorer import Scorer

try:
    __version__ = version("pairscore")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["Scorer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Scorer":
        from pairscore_server.scorer import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
