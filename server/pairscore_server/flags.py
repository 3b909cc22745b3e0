"""The command line of ``pairscore serve``: its parser, and the configuration it reads.

Every setting can be given as a command-line flag or as a ``PAIRSCORE_*``
environment variable (the flag wins), else it takes the default shown by
``pairscore serve --help``. The settings themselves are the table in
:mod:`pairscore_server.flag_table`; :func:`build_config` turns them into a
:class:`~pairscore_server.config.ServerConfig`; it receives ``environ``, so
nothing is read from the environment at import time.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pairscore_server.config import ServerConfig
from pairscore_server.engine.spec import ModelSpec
from pairscore_server.flag_table import AUTH_TOKENS_ENV, MODEL_SETTINGS, SERVER_SETTINGS, Setting


def make_parser(prog: str = "pairscore serve") -> argparse.ArgumentParser:
    """The argument parser of ``pairscore serve`` (every flag defaults to unset)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve a causal language model over gRPC (pairscore.v1.ScoringService): "
            "for each (prompt, response) pair it returns log P(prompt), "
            "log P(response | prompt) and their sum, from one forward pass. "
            "Health checks (grpc.health.v1) and server reflection are served on the "
            "same port; Prometheus metrics on --metrics-port."
        ),
        epilog=(
            "Every flag can also be set with the environment variable shown in its "
            "help, e.g. PAIRSCORE_PORT=50052; a flag on the command line wins. "
            "Example: pairscore serve --model HuggingFaceTB/SmolLM2-135M --port 50051"
        ),
    )
    for title, settings in (("model", MODEL_SETTINGS), ("server", SERVER_SETTINGS)):
        group = parser.add_argument_group(title)
        for s in settings:
            group.add_argument(
                s.flag, dest=s.dest, metavar=s.metavar, default=None, help=f"{s.help} [env: {s.env}]"
            )
    return parser


def build_config(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    prog: str = "pairscore serve",
) -> ServerConfig:
    """Build the server configuration from command-line flags, then ``environ``, then defaults.

    An invalid value exits with status 2 and a message naming the flag or
    variable, like any argparse error.
    """
    parser = make_parser(prog)
    args = parser.parse_args(list(argv) if argv is not None else [])

    def resolve(settings: Sequence[Setting]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for s in settings:
            raw, source = getattr(args, s.dest), s.flag
            if raw is None:
                raw, source = environ.get(s.env), s.env
            if raw is None or (source == s.env and raw == ""):
                continue
            try:
                values[s.dest] = s.parse(raw)
            except ValueError:
                parser.error(f"{source}: invalid value {raw!r}")
        return values

    model_values = resolve(MODEL_SETTINGS)
    server_values = resolve(SERVER_SETTINGS)
    tokens = environ.get(AUTH_TOKENS_ENV, "")
    if tokens.strip():
        server_values["auth_tokens"] = tuple(t for t in re.split(r"[,\s]+", tokens) if t)
    try:
        spec = ModelSpec(**model_values)
        return ServerConfig(model=spec, **server_values)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits
