"""pairscore's server: scoring engine, batcher, gRPC servicer, metrics and CLI.

Needs the ``server`` extra: ``pip install 'pairscore[server]'``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pairscore")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
