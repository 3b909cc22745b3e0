"""How a client connects: target, TLS, bearer token, retries, load balancing.

Both :class:`~pairscore.client.ScoringClient` and
:class:`~pairscore.aio.AsyncScoringClient` build their channel from one
:class:`ChannelSettings`, so the two cannot drift apart.

**Retries** are gRPC's own (``retryPolicy`` in the channel's service
config): a call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED is retried
by the channel with exponential backoff and full jitter, up to
``max_attempts`` attempts in all, all within the call's deadline. A
client-streaming call can only be retried this way until its first answer
arrives; :meth:`~pairscore.client.ScoringClient.score_iter` therefore
reconnects a broken stream itself, resending only what was not answered.

**Load balancing**: the default policy is ``round_robin``. With a
``dns:///name:port`` target that resolves to several addresses (a headless
Kubernetes Service lists every ready pod), the channel opens one HTTP/2
connection per address and spreads calls over them. Behind a plain L4 (TCP)
load balancer it cannot: gRPC keeps one long-lived HTTP/2 connection and
multiplexes every call over it, and an L4 balancer only picks a backend when
a connection opens, so all calls of a client land on one pod.

**TLS and tokens**: ``TlsConfig`` gives the CA bundle, an optional client
certificate (mutual TLS) and an optional name override. A bearer token is
sent as gRPC call credentials (``authorization: Bearer …``) on a TLS
channel; on a plaintext channel gRPC refuses call credentials, so the same
header is added to each call's metadata instead (only sensible on loopback
or inside a network that encrypts for you).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pairscore.v1 import scoring_pb2 as pb

#: Largest message the client sends or receives, unless told otherwise (64 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SCORING_SERVICE = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"

#: gRPC ignores maxAttempts above this (it clamps to 5).
GRPC_MAX_ATTEMPTS = 5


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON form, e.g. ``"0.2s"``."""
    return f"{value:.9f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of failed calls: exponential backoff with full jitter.

    The n-th retry waits a random time in [0, min(initial_backoff_s *
    backoff_multiplier**(n-1), max_backoff_s)]. ``max_attempts`` counts the
    first try (gRPC caps it at 5). ``stream_reconnect_timeout_s`` bounds how
    long a broken :meth:`score_iter` stream keeps reconnecting without any
    progress before it gives up.
    """

    max_attempts: int = GRPC_MAX_ATTEMPTS
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
    stream_reconnect_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be 2..{GRPC_MAX_ATTEMPTS}, got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")
        unknown = [c for c in self.retryable_codes if c not in grpc.StatusCode.__members__]
        if unknown:
            raise ValueError(f"unknown status codes {unknown}")

    def backoff_ceiling(self, retry: int) -> float:
        """Upper bound of the wait before retry number ``retry`` (1 for the first)."""
        return min(self.initial_backoff_s * self.backoff_multiplier ** max(retry - 1, 0), self.max_backoff_s)

    def as_service_config(self) -> dict[str, object]:
        """The ``retryPolicy`` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _seconds(self.initial_backoff_s),
            "maxBackoff": _seconds(self.max_backoff_s),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_codes),
        }


def _read(value: str | bytes | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel.

    ``ca_cert``: PEM bytes or a path to the CA bundle that signed the server's
    certificate (``None``: the system roots). ``client_cert`` and
    ``client_key``: PEM bytes or paths, for mutual TLS (give both or
    neither). ``server_name``: the name to check the server's certificate
    against when it differs from the target's host (e.g. connecting by IP).
    """

    ca_cert: str | bytes | Path | None = None
    client_cert: str | bytes | Path | None = None
    client_key: str | bytes | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials (reads the files now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open a channel to a pairscore server (or a fleet).

    ``target``: ``host:port``, ``dns:///host:port`` (every address the name
    resolves to), ``ipv4:a:p,b:q`` (a fixed list), or ``unix:path``.
    ``tls``: a :class:`TlsConfig`, or ``True`` for TLS with the system roots.
    ``credentials``: ready-made channel credentials (overrides ``tls``).
    ``token``: a bearer token sent with every call. ``retry``: the
    :class:`RetryPolicy`, or ``None`` for no retries. ``load_balancing``:
    ``"round_robin"`` (default) or ``"pick_first"``. ``channel_options`` are
    passed to gRPC last, so they win.
    """

    target: str
    tls: TlsConfig | bool | None = None
    credentials: grpc.ChannelCredentials | None = None
    token: str | None = None
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    load_balancing: str = "round_robin"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    reconnect_backoff_ms: tuple[int, int] = (200, 5000)
    channel_options: Sequence[tuple[str, object]] = ()

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must not be empty")
        if self.load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing must be round_robin or pick_first, got {self.load_balancing!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be blank")

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.credentials is not None or bool(self.tls)

    def service_config(self) -> str:
        """The channel's service config as JSON: load balancing and the retry policy."""
        config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    "name": [{"service": SCORING_SERVICE}, {"service": HEALTH_SERVICE}],
                    "retryPolicy": self.retry.as_service_config(),
                }
            ]
        return json.dumps(config)

    def options(self) -> list[tuple[str, object]]:
        """gRPC channel arguments."""
        initial, maximum = self.reconnect_backoff_ms
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.service_config", self.service_config()),
            # Our service config wins over one a DNS TXT record might carry.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
            ("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.min_reconnect_backoff_ms", initial),
            ("grpc.max_reconnect_backoff_ms", maximum),
        ]
        if isinstance(self.tls, TlsConfig) and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        options.extend(self.channel_options)
        return options

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, with the token as call credentials; ``None`` for plaintext."""
        if not self.secure:
            return None
        creds = self.credentials
        if creds is None:
            creds = (
                self.tls.credentials() if isinstance(self.tls, TlsConfig) else grpc.ssl_channel_credentials()
            )
        if self.token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata sent with each call: the token header on plaintext channels only."""
        if self.token is not None and not self.secure:
            return (("authorization", f"Bearer {self.token}"),)
        return None

    def sync_channel(self) -> grpc.Channel:
        """A blocking ``grpc.Channel``."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, creds, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        """A ``grpc.aio.Channel`` (create it inside the event loop that will use it)."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, creds, options=self.options())
