"""The command line of ``pairscore serve``: flags, their environment variables, their help.

Every setting can be given as a command-line flag or as a ``PAIRSCORE_*``
environment variable (the flag wins), else it takes the default shown by
``pairscore serve --help``. :func:`build_config` turns them into a
:class:`~pairscore_server.config.ServerConfig`; it receives ``environ``, so
nothing is read from the environment at import time.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairscore_server.config import LOG_LEVELS, ServerConfig
from pairscore_server.engine.spec import DTYPES, ModelSpec

_DISABLED = ("off", "none", "disabled", "-1")


def _metrics_port(text: str) -> int | None:
    if text.strip().lower() in _DISABLED:
        return None
    return int(text)


def _upper(text: str) -> str:
    return text.strip().upper()


def _optional_int(text: str) -> int | None:
    """An integer, or None for off/none/disabled/-1 (and 0)."""
    if text.strip().lower() in _DISABLED or text.strip() == "0":
        return None
    return int(text)


def _optional_seconds(text: str) -> float | None:
    """Seconds, or None for off/none/disabled/-1 (and 0)."""
    if text.strip().lower() in _DISABLED:
        return None
    value = float(text)
    return None if value == 0 else value


def _path(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("empty path")
    return value


#: Environment variable with bearer tokens (comma- or whitespace-separated).
#: There is no flag for it: command lines are visible to every local user.
AUTH_TOKENS_ENV = "PAIRSCORE_AUTH_TOKENS"


@dataclass(frozen=True)
class _Setting:
    """One setting: its flag, its environment variable and how to parse it."""

    dest: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


_MODEL_SETTINGS = (
    _Setting(
        "model",
        "--model",
        "PAIRSCORE_MODEL",
        str,
        "Model to serve: a local directory with a Hugging Face model, a Hub id "
        "(e.g. HuggingFaceTB/SmolLM2-135M), or a path to a .gguf file. "
        "Default: the SmolLM2 model embedded in the package.",
        "MODEL",
    ),
    _Setting(
        "revision",
        "--revision",
        "PAIRSCORE_REVISION",
        str,
        "Hub revision (branch, tag or commit) when --model is a Hub id.",
        "REV",
    ),
    _Setting(
        "device",
        "--device",
        "PAIRSCORE_DEVICE",
        str.strip,
        "Where the model runs: auto (the first GPU if there is one, else cpu), "
        "cpu, cuda, cuda:N, or a list cuda:0,cuda:2 (one model replica on each). "
        "Default: auto.",
        "DEVICE",
    ),
    _Setting(
        "workers",
        "--workers",
        "PAIRSCORE_WORKERS",
        int,
        "Model replicas, one per GPU (cuda:0 .. cuda:N-1 with --device auto or cuda), "
        "all fed from the same queue. Default: 1.",
        "N",
    ),
    _Setting(
        "dtype",
        "--dtype",
        "PAIRSCORE_DTYPE",
        str.strip,
        f"Weight dtype: {', '.join(DTYPES)}. auto: bfloat16 on CUDA, float32 on CPU. Default: auto.",
        "DTYPE",
    ),
    _Setting(
        "prefix_token",
        "--prefix-token",
        "PAIRSCORE_PREFIX_TOKEN",
        str,
        "Token (as a string from the vocabulary) that the first prompt token is "
        "conditioned on, instead of the model family's BOS / document separator.",
        "TOKEN",
    ),
    _Setting(
        "cache_dir",
        "--cache-dir",
        "PAIRSCORE_CACHE_DIR",
        str,
        "Directory for the dequantised copy of a GGUF model (made once, then reused).",
        "DIR",
    ),
    _Setting(
        "max_batch_tokens",
        "--max-batch-tokens",
        "PAIRSCORE_MAX_BATCH_TOKENS",
        int,
        "Tokens allowed in one forward pass (a packed row's length, or longest "
        "pair x pairs of a padded batch); lower it if the model runs out of memory. "
        "Default: 2048 on CPU, 32768 on GPU.",
        "N",
    ),
    _Setting(
        "packing",
        "--packing",
        "PAIRSCORE_PACKING",
        lambda text: text.strip().lower(),
        "Forward-pass layout: on = packed rows (pairs end to end, shared prompts "
        "computed once inside the row, attention per segment), off = padded batches "
        "with a key/value cache per shared prompt, auto = on for CPU (measured "
        "faster, see README Performance), off for GPU until measured there. "
        "Models that cannot pack fall back to padded batches. Default: auto.",
        "auto|on|off",
    ),
)

_SERVER_SETTINGS = (
    _Setting(
        "host",
        "--host",
        "PAIRSCORE_HOST",
        str.strip,
        "Interface to listen on. Default: [::], every interface (IPv4 and IPv6); "
        "use 127.0.0.1 to accept local connections only.",
        "HOST",
    ),
    _Setting(
        "port",
        "--port",
        "PAIRSCORE_PORT",
        int,
        "gRPC port. Default: 50051. 0 picks a free port (it is logged).",
        "PORT",
    ),
    _Setting(
        "metrics_port",
        "--metrics-port",
        "PAIRSCORE_METRICS_PORT",
        _metrics_port,
        "Port of the Prometheus /metrics HTTP endpoint, on the same host. "
        "Default: 9090. 0 picks a free port; 'off' serves no metrics.",
        "PORT",
    ),
    _Setting(
        "health_port",
        "--health-port",
        "PAIRSCORE_HEALTH_PORT",
        _metrics_port,
        "Extra plaintext port, on the same host, that serves only grpc.health.v1 "
        "(no scoring, no auth), for probes that cannot speak TLS, such as "
        "Kubernetes' built-in gRPC probe. Default: off.",
        "PORT",
    ),
    _Setting(
        "openai_port",
        "--openai-port",
        "PAIRSCORE_OPENAI_PORT",
        _metrics_port,
        "Port of an OpenAI-compatible HTTP endpoint for scoring, on the same host: "
        "POST /v1/completions (echo + logprobs, max_tokens 0 or 1) and GET /v1/models, "
        "with the gRPC port's bearer tokens, TLS, limits and metrics (docs/openai.md). "
        "0 picks a free port (it is logged). Default: off.",
        "PORT",
    ),
    _Setting(
        "openai_host",
        "--openai-host",
        "PAIRSCORE_OPENAI_HOST",
        str.strip,
        "Interface of the OpenAI port, when it differs from --host (e.g. 127.0.0.1 to keep "
        "it local while gRPC serves every interface). [::] is dual-stack (IPv4 and IPv6). "
        "Default: --host.",
        "HOST",
    ),
    _Setting(
        "openai_header_timeout_s",
        "--openai-header-timeout",
        "PAIRSCORE_OPENAI_HEADER_TIMEOUT",
        float,
        "OpenAI port: seconds a connection has to send a complete request head, from its "
        "opening or its previous answer (also the idle keep-alive timeout); it is closed "
        "after. Default: 10.",
        "SECONDS",
    ),
    _Setting(
        "openai_body_timeout_s",
        "--openai-body-timeout",
        "PAIRSCORE_OPENAI_BODY_TIMEOUT",
        float,
        "OpenAI port: seconds a request has to send its whole body once its head has "
        "arrived; it gets 408 after. Default: 60.",
        "SECONDS",
    ),
    _Setting(
        "max_batch_pairs",
        "--max-batch-pairs",
        "PAIRSCORE_MAX_BATCH_PAIRS",
        int,
        "Most pairs, from all concurrent requests, scored in one batch. Default: 64.",
        "N",
    ),
    _Setting(
        "max_wait_ms",
        "--max-wait-ms",
        "PAIRSCORE_MAX_WAIT_MS",
        float,
        "How long the first pair of a batch may wait for more pairs to join it. "
        "Higher: fuller batches under load; lower: less latency when idle. "
        "Default: 5.",
        "MS",
    ),
    _Setting(
        "grace_period_s",
        "--grace-period",
        "PAIRSCORE_GRACE_PERIOD",
        float,
        "On SIGTERM/SIGINT, seconds that running requests get to finish before "
        "they are cancelled. Default: 10.",
        "SECONDS",
    ),
    _Setting(
        "stream_max_in_flight",
        "--stream-max-in-flight",
        "PAIRSCORE_STREAM_MAX_IN_FLIGHT",
        int,
        "Request messages of one ScoreStream call worked on at once; the server "
        "reads no further until one is answered. Default: 4.",
        "N",
    ),
    _Setting(
        "max_message_bytes",
        "--max-message-bytes",
        "PAIRSCORE_MAX_MESSAGE_BYTES",
        int,
        "Largest gRPC message the server sends or receives. Default: 67108864 (64 MiB).",
        "BYTES",
    ),
    _Setting(
        "max_response_bytes",
        "--max-response-bytes",
        "PAIRSCORE_MAX_RESPONSE_BYTES",
        int,
        "Largest answer the server will send: a request whose answer could be larger "
        "(per-token detail is the large part) is refused with INVALID_ARGUMENT before "
        "anything is scored. Default: 4194304 (4 MiB, what gRPC clients accept unless "
        "they raise their limit); at most --max-message-bytes.",
        "BYTES",
    ),
    _Setting(
        "prepare_workers",
        "--prepare-workers",
        "PAIRSCORE_PREPARE_WORKERS",
        int,
        "Threads that tokenize large requests, one chunk of each in turn; one more thread "
        "tokenizes small requests. The model always runs on one thread. Default: 1.",
        "N",
    ),
    _Setting(
        "max_pairs_per_request",
        "--max-pairs-per-request",
        "PAIRSCORE_MAX_PAIRS_PER_REQUEST",
        int,
        "Most pairs in one ScoreRequest (one ScoreStream message); more is INVALID_ARGUMENT. Default: 1024.",
        "N",
    ),
    _Setting(
        "max_text_chars",
        "--max-text-chars",
        "PAIRSCORE_MAX_TEXT_CHARS",
        int,
        "Most characters (Unicode code points) in one prompt or response, checked "
        "before tokenizing; a longer text fails its pair with an INVALID_ARGUMENT "
        "item error. Default: 100000.",
        "N",
    ),
    _Setting(
        "max_request_chars",
        "--max-request-chars",
        "PAIRSCORE_MAX_REQUEST_CHARS",
        int,
        "Most characters one request may have tokenized (all its texts; a prompt "
        "shared by several pairs counts once), checked before tokenizing; more is "
        "INVALID_ARGUMENT. Default: 16777216.",
        "N",
    ),
    _Setting(
        "max_preparing_chars",
        "--max-preparing-chars",
        "PAIRSCORE_MAX_PREPARING_CHARS",
        int,
        "Most characters being tokenized at once, all requests together; a request "
        "that does not fit now is RESOURCE_EXHAUSTED with a retry hint. Default: "
        "67108864 (at least --max-request-chars).",
        "N",
    ),
    _Setting(
        "max_item_tokens",
        "--max-item-tokens",
        "PAIRSCORE_MAX_ITEM_TOKENS",
        _optional_int,
        "Most tokens one pair may need (prefix + prompt + response); a longer pair "
        "fails with an INVALID_ARGUMENT item error. Capped at the model's context. "
        "Default: the model's context.",
        "N",
    ),
    _Setting(
        "max_queue_tokens",
        "--max-queue-tokens",
        "PAIRSCORE_MAX_QUEUE_TOKENS",
        _optional_int,
        "Admission bound: tokens that may wait for the model. A request that does "
        "not fit gets RESOURCE_EXHAUSTED at once, with a retry hint. "
        "Default: 32 x --max-batch-tokens.",
        "N",
    ),
    _Setting(
        "max_concurrent_rpcs",
        "--max-concurrent-rpcs",
        "PAIRSCORE_MAX_CONCURRENT_RPCS",
        _optional_int,
        "Most RPCs (health checks included) the server runs at once; more get "
        "RESOURCE_EXHAUSTED before their message is read; also the most connections "
        "the OpenAI port holds open (more get 503). With "
        "--max-message-bytes it bounds the memory held by requests. 'off': "
        "unbounded. Default: 512.",
        "N",
    ),
    _Setting(
        "forward_timeout_s",
        "--forward-timeout",
        "PAIRSCORE_FORWARD_TIMEOUT",
        _optional_seconds,
        "Watchdog: a forward pass running longer than this marks the model worker "
        "stuck: health turns NOT_SERVING and waiting callers get UNAVAILABLE until "
        "it answers. 'off' disables it. Default: 120.",
        "SECONDS",
    ),
    _Setting(
        "max_connection_age_s",
        "--max-connection-age",
        "PAIRSCORE_MAX_CONNECTION_AGE",
        _optional_seconds,
        "Close each client connection (with a GOAWAY) after about this long, so "
        "clients re-resolve DNS and spread onto new replicas; gRPC adds +-10%% "
        "jitter. Default: off.",
        "SECONDS",
    ),
    _Setting(
        "max_connection_age_grace_s",
        "--max-connection-age-grace",
        "PAIRSCORE_MAX_CONNECTION_AGE_GRACE",
        _optional_seconds,
        "After --max-connection-age, how long calls still running on the old "
        "connection may take before it is closed. Default: off (they may finish).",
        "SECONDS",
    ),
    _Setting(
        "tls_cert",
        "--tls-cert",
        "PAIRSCORE_TLS_CERT",
        _path,
        "PEM certificate chain of the server: the gRPC port then speaks TLS only. Needs --tls-key.",
        "FILE",
    ),
    _Setting(
        "tls_key",
        "--tls-key",
        "PAIRSCORE_TLS_KEY",
        _path,
        "PEM private key of --tls-cert.",
        "FILE",
    ),
    _Setting(
        "tls_client_ca",
        "--tls-client-ca",
        "PAIRSCORE_TLS_CLIENT_CA",
        _path,
        "PEM CA bundle: clients must present a certificate signed by it (mutual TLS).",
        "FILE",
    ),
    _Setting(
        "auth_token_file",
        "--auth-token-file",
        "PAIRSCORE_AUTH_TOKEN_FILE",
        _path,
        "File of accepted bearer tokens, one per line ('#' comments). Calls without "
        "'authorization: Bearer <token>' get UNAUTHENTICATED; health checks stay open. "
        f"Tokens may also come from {AUTH_TOKENS_ENV} (comma-separated; no flag). "
        "The file is re-read when it changes.",
        "FILE",
    ),
    _Setting(
        "log_level",
        "--log-level",
        "PAIRSCORE_LOG_LEVEL",
        _upper,
        f"Logging level: {', '.join(LOG_LEVELS)}. Default: INFO. Prompts and responses are never logged.",
        "LEVEL",
    ),
)


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
    model = parser.add_argument_group("model")
    for s in _MODEL_SETTINGS:
        model.add_argument(
            s.flag, dest=s.dest, metavar=s.metavar, default=None, help=f"{s.help} [env: {s.env}]"
        )
    server = parser.add_argument_group("server")
    for s in _SERVER_SETTINGS:
        server.add_argument(
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

    def resolve(settings: Sequence[_Setting]) -> dict[str, Any]:
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

    model_values = resolve(_MODEL_SETTINGS)
    server_values = resolve(_SERVER_SETTINGS)
    tokens = environ.get(AUTH_TOKENS_ENV, "")
    if tokens.strip():
        server_values["auth_tokens"] = tuple(t for t in re.split(r"[,\s]+", tokens) if t)
    try:
        spec = ModelSpec(**model_values)
        return ServerConfig(model=spec, **server_values)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits
