"""Server configuration: one frozen dataclass that validates itself.

:func:`pairscore_server.flags.build_config` builds it in ``main()`` from
command-line flags with ``PAIRSCORE_*`` environment fallbacks; nothing is
read from the environment at import time. The model's own settings are a
:class:`~pairscore_server.engine.spec.ModelSpec`, which validates itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pairscore_server.engine.spec import ModelSpec
from pairscore_server.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PAIRS_PER_REQUEST,
    DEFAULT_MAX_PREPARING_CHARS,
    DEFAULT_MAX_REQUEST_CHARS,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ServerConfig:
    """Everything one pairscore server needs to run.

    ``host``/``port``: where gRPC listens (``"[::]"``: every interface, IPv4
    and IPv6; port 0 picks a free port). ``metrics_port``: port of the
    Prometheus ``/metrics`` HTTP endpoint on the same host, 0 for a free
    port, ``None`` to switch metrics serving off. ``health_port``: an extra
    plaintext port serving only health checks (``None``: off). ``openai_port``: the
    OpenAI-compatible HTTP port for scoring (``/v1/completions``, ``/v1/models``; same
    host, auth, TLS and limits as gRPC; ``None``: off), on ``openai_host`` when set
    (``None``: ``host``); ``openai_header_timeout_s`` and
    ``openai_body_timeout_s`` bound how long its clients may take to send a request's
    head and body, and ``max_concurrent_rpcs`` caps its open connections. ``max_batch_pairs`` and
    ``max_wait_ms`` bound how many pairs one forward pass holds and how long
    the first of them waits for company. ``grace_period_s``: on SIGTERM,
    how long in-flight RPCs get to finish. ``stream_max_in_flight``: request
    messages of one ScoreStream worked on at once. ``prepare_workers``:
    threads that tokenize large requests (the model itself always runs on
    exactly one thread).

    Limits (see ``--help``): ``max_pairs_per_request``, ``max_text_chars``
    (code points per prompt or response, checked before tokenizing),
    ``max_item_tokens`` (``None``: the model's context), ``max_queue_tokens``
    (admission bound; ``None``: 32 forward batches' worth),
    ``max_concurrent_rpcs`` (``None``: unbounded), ``forward_timeout_s``
    (``None``: no watchdog). ``max_connection_age_s`` and
    ``max_connection_age_grace_s`` (``None``: off) make clients reconnect
    periodically. ``tls_cert``/``tls_key``/``tls_client_ca`` are PEM file
    paths; ``auth_token_file`` and ``auth_tokens`` (from the environment
    only, never shown in ``repr``) switch bearer-token auth on.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    host: str = "[::]"
    port: int = 50051
    metrics_port: int | None = 9090
    health_port: int | None = None
    openai_port: int | None = None
    openai_host: str | None = None
    openai_header_timeout_s: float = 10.0
    openai_body_timeout_s: float = 60.0
    max_batch_pairs: int = 64
    max_wait_ms: float = 5.0
    grace_period_s: float = 10.0
    log_level: str = "INFO"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    stream_max_in_flight: int = 4
    prepare_workers: int = 1
    max_pairs_per_request: int = DEFAULT_MAX_PAIRS_PER_REQUEST
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_request_chars: int = DEFAULT_MAX_REQUEST_CHARS
    max_preparing_chars: int = DEFAULT_MAX_PREPARING_CHARS
    max_item_tokens: int | None = None
    max_queue_tokens: int | None = None
    max_concurrent_rpcs: int | None = 512
    forward_timeout_s: float | None = 120.0
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"port must be 0..65535, got {self.port}")
        if self.metrics_port is not None:
            _check(
                0 <= self.metrics_port <= 65535,
                f"metrics port must be 0..65535 or off, got {self.metrics_port}",
            )
        if self.health_port is not None:
            _check(
                0 <= self.health_port <= 65535,
                f"health port must be 0..65535 or off, got {self.health_port}",
            )
        if self.openai_port is not None:
            _check(
                0 <= self.openai_port <= 65535,
                f"OpenAI port must be 0..65535 or off, got {self.openai_port}",
            )
        for name in ("openai_header_timeout_s", "openai_body_timeout_s"):
            value = getattr(self, name)
            _check(value > 0, f"{name.removesuffix('_s').replace('_', ' ')} must be > 0 s, got {value}")
        _check(self.max_batch_pairs >= 1, f"max batch pairs must be >= 1, got {self.max_batch_pairs}")
        _check(self.max_wait_ms >= 0, f"max wait must be >= 0 ms, got {self.max_wait_ms}")
        _check(self.grace_period_s >= 0, f"grace period must be >= 0 s, got {self.grace_period_s}")
        _check(
            self.log_level in LOG_LEVELS,
            f"log level must be one of {LOG_LEVELS}, got {self.log_level!r}",
        )
        _check(
            self.max_message_bytes >= 1024,
            f"max message bytes must be >= 1024, got {self.max_message_bytes}",
        )
        _check(
            self.max_response_bytes >= 1024,
            f"max response bytes must be >= 1024, got {self.max_response_bytes}",
        )
        _check(
            self.stream_max_in_flight >= 1,
            f"stream max in flight must be >= 1, got {self.stream_max_in_flight}",
        )
        _check(self.prepare_workers >= 1, f"prepare workers must be >= 1, got {self.prepare_workers}")
        _check(
            self.max_pairs_per_request >= 1,
            f"max pairs per request must be >= 1, got {self.max_pairs_per_request}",
        )
        _check(self.max_text_chars >= 1, f"max text chars must be >= 1, got {self.max_text_chars}")
        for chars in ("max_request_chars", "max_preparing_chars"):
            value = getattr(self, chars)
            _check(value >= 1, f"{chars.replace('_', ' ')} must be >= 1, got {value}")
        for name in ("max_item_tokens", "max_queue_tokens", "max_concurrent_rpcs"):
            value = getattr(self, name)
            _check(
                value is None or value >= 1,
                f"{name.replace('_', ' ')} must be >= 1 or off, got {value}",
            )
        for name in ("forward_timeout_s", "max_connection_age_s", "max_connection_age_grace_s"):
            value = getattr(self, name)
            _check(
                value is None or value > 0,
                f"{name.removesuffix('_s').replace('_', ' ')} must be > 0 s or off, got {value}",
            )
        _check(
            (self.tls_cert is None) == (self.tls_key is None),
            "TLS needs both --tls-cert and --tls-key",
        )
        _check(
            self.tls_client_ca is None or self.tls_cert is not None,
            "--tls-client-ca (client certificate verification) needs --tls-cert and --tls-key",
        )
        _check(
            all(token and not any(c.isspace() for c in token) for token in self.auth_tokens),
            "auth tokens must be non-empty and contain no whitespace",
        )

    @property
    def address(self) -> str:
        """The gRPC listen address, ``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def metrics_host(self) -> str:
        """``host`` without IPv6 brackets, as the HTTP server wants it."""
        return self.host.strip("[]")

    @property
    def max_wait_s(self) -> float:
        """``max_wait_ms`` in seconds."""
        return self.max_wait_ms / 1000.0

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert is not None

    @property
    def auth_enabled(self) -> bool:
        """Whether calls (other than health checks) need a bearer token."""
        return bool(self.auth_tokens) or self.auth_token_file is not None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
