"""Command-line flags that say how to reach the server, shared by every client command.

``--target`` (env ``PAIRSCORE_TARGET``), ``--timeout``, TLS (``--tls``,
``--ca-cert``, ``--client-cert``, ``--client-key``, ``--server-name``; any
of them switches TLS on), the bearer token (``--token-file`` or env
``PAIRSCORE_TOKEN``; never a flag, so that it stays out of the process
list and shell history), ``--max-message-bytes`` and ``--lb``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "PAIRSCORE_TARGET"
TOKEN_ENV = "PAIRSCORE_TOKEN"


def add_connection_args(parser: argparse.ArgumentParser, *, timeout: float = 60.0) -> None:
    """Add the connection flags to ``parser``."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=None,
        metavar="TARGET",
        help=(
            f"server address: HOST:PORT, dns:///NAME:PORT for every replica behind a name "
            f"(round_robin), or ipv4:A:P,B:Q (default: ${TARGET_ENV} or {DEFAULT_TARGET})"
        ),
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=(
            f"deadline of each call; for streams, the longest wait for an answer, or for a server that "
            f"cannot be reached to come back (default: {timeout:g})"
        ),
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument(
        "--ca-cert", metavar="PEM", help="CA bundle that signed the server's certificate (implies --tls)"
    )
    group.add_argument(
        "--client-cert", metavar="PEM", help="client certificate for mutual TLS (with --client-key)"
    )
    group.add_argument("--client-key", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument("--server-name", metavar="NAME", help="name to check the server's certificate against")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the bearer token to send (default: ${TOKEN_ENV} if set)",
    )
    group.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest gRPC message sent or received (default: 64 MiB); an answer with per-token "
        "detail for many pairs may need more, or fewer pairs per request",
    )
    group.add_argument(
        "--lb",
        choices=("round_robin", "pick_first"),
        default="round_robin",
        help="load balancing over the addresses the target resolves to (default: round_robin)",
    )


def target_of(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """The target from the flag, else the environment, else the default."""
    environ = os.environ if environ is None else environ
    return args.target or environ.get(TARGET_ENV) or DEFAULT_TARGET


def client_kwargs(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ScoringClient from parsed connection flags."""
    from pairscore.channel import TlsConfig

    environ = os.environ if environ is None else environ
    tls: TlsConfig | bool | None = None
    if args.ca_cert or args.client_cert or args.client_key or args.server_name:
        tls = TlsConfig(
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
        )
    elif args.tls:
        tls = True
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
    kwargs: dict[str, Any] = {
        "timeout": args.timeout,
        "tls": tls,
        "token": token,
        "load_balancing": args.lb,
    }
    if getattr(args, "max_message_bytes", None) is not None:
        kwargs["max_message_bytes"] = args.max_message_bytes
    return kwargs
