"""Every setting of ``pairscore serve``: its flag, its ``PAIRSCORE_*`` variable, its parser, its help.

One row a setting (:class:`Setting`), in two groups: :data:`MODEL_SETTINGS`
become the :class:`~pairscore_server.engine.spec.ModelSpec`,
:data:`SERVER_SETTINGS` the rest of the
:class:`~pairscore_server.config.ServerConfig`. :mod:`pairscore_server.flags`
turns the table into the command line and reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pairscore_server.config import LOG_LEVELS
from pairscore_server.engine.spec import DTYPES

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
class Setting:
    """One setting: its flag, its environment variable and how to parse it."""

    dest: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


#: What to load and how: they make the ModelSpec.
MODEL_SETTINGS = (
    Setting(
        "model",
        "--model",
        "PAIRSCORE_MODEL",
        str,
        "Model to serve: a local directory with a Hugging Face model, a Hub id "
        "(e.g. HuggingFaceTB/SmolLM2-135M), or a path to a .gguf file. "
        "Default: the SmolLM2 model embedded in the package.",
        "MODEL",
    ),
    Setting(
        "revision",
        "--revision",
        "PAIRSCORE_REVISION",
        str,
        "Hub revision (branch, tag or commit) when --model is a Hub id.",
        "REV",
    ),
    Setting(
        "device",
        "--device",
        "PAIRSCORE_DEVICE",
        str.strip,
        "Where the model runs: auto (the first GPU if there is one, else cpu), "
        "cpu, cuda, cuda:N, or a list cuda:0,cuda:2 (one model replica on each). "
        "Default: auto.",
        "DEVICE",
    ),
    Setting(
        "workers",
        "--workers",
        "PAIRSCORE_WORKERS",
        int,
        "Model replicas, one per GPU (cuda:0 .. cuda:N-1 with --device auto or cuda), "
        "all fed from the same queue. Default: 1.",
        "N",
    ),
    Setting(
        "dtype",
        "--dtype",
        "PAIRSCORE_DTYPE",
        str.strip,
        f"Weight dtype: {', '.join(DTYPES)}. auto: bfloat16 on CUDA, float32 on CPU. Default: auto.",
        "DTYPE",
    ),
    Setting(
        "prefix_token",
        "--prefix-token",
        "PAIRSCORE_PREFIX_TOKEN",
        str,
        "Token (as a string from the vocabulary) that the first prompt token is "
        "conditioned on, instead of the model family's BOS / document separator.",
        "TOKEN",
    ),
    Setting(
        "cache_dir",
        "--cache-dir",
        "PAIRSCORE_CACHE_DIR",
        str,
        "Directory for the dequantised copy of a GGUF model (made once, then reused).",
        "DIR",
    ),
    Setting(
        "max_batch_tokens",
        "--max-batch-tokens",
        "PAIRSCORE_MAX_BATCH_TOKENS",
        int,
        "Tokens allowed in one forward pass (a packed row's length, or longest "
        "pair x pairs of a padded batch); lower it if the model runs out of memory. "
        "Default: 2048 on CPU (6144 in bfloat16), 32768 on GPU.",
        "N",
    ),
    Setting(
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
    Setting(
        "host_allocator",
        "--host-allocator",
        "PAIRSCORE_HOST_ALLOCATOR",
        lambda text: text.strip().lower(),
        "Host memory: retain = glibc keeps freed blocks (up to 256 MiB each) for reuse "
        "and up to 512 MiB of free memory mapped, so a forward pass does not fault its "
        "buffers back in (~10 %% faster on CPU in bfloat16; the process keeps memory "
        "near its peak); system = the C library's defaults. Default: retain.",
        "retain|system",
    ),
)

#: Everything else: ports, limits, TLS and auth, logging.
SERVER_SETTINGS = (
    Setting(
        "host",
        "--host",
        "PAIRSCORE_HOST",
        str.strip,
        "Interface to listen on. Default: [::], every interface (IPv4 and IPv6); "
        "use 127.0.0.1 to accept local connections only.",
        "HOST",
    ),
    Setting(
        "port",
        "--port",
        "PAIRSCORE_PORT",
        int,
        "gRPC port. Default: 50051. 0 picks a free port (it is logged).",
        "PORT",
    ),
    Setting(
        "metrics_port",
        "--metrics-port",
        "PAIRSCORE_METRICS_PORT",
        _metrics_port,
        "Port of the Prometheus /metrics HTTP endpoint, on the same host. "
        "Default: 9090. 0 picks a free port; 'off' serves no metrics.",
        "PORT",
    ),
    Setting(
        "health_port",
        "--health-port",
        "PAIRSCORE_HEALTH_PORT",
        _metrics_port,
        "Extra plaintext port, on the same host, that serves only grpc.health.v1 "
        "(no scoring, no auth), for probes that cannot speak TLS, such as "
        "Kubernetes' built-in gRPC probe. Default: off.",
        "PORT",
    ),
    Setting(
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
    Setting(
        "openai_host",
        "--openai-host",
        "PAIRSCORE_OPENAI_HOST",
        str.strip,
        "Interface of the OpenAI port, when it differs from --host (e.g. 127.0.0.1 to keep "
        "it local while gRPC serves every interface). [::] is dual-stack (IPv4 and IPv6). "
        "Default: --host.",
        "HOST",
    ),
    Setting(
        "openai_header_timeout_s",
        "--openai-header-timeout",
        "PAIRSCORE_OPENAI_HEADER_TIMEOUT",
        float,
        "OpenAI port: seconds a connection has to send a complete request head, from its "
        "opening or its previous answer (also the idle keep-alive timeout); it is closed "
        "after. Default: 10.",
        "SECONDS",
    ),
    Setting(
        "openai_body_timeout_s",
        "--openai-body-timeout",
        "PAIRSCORE_OPENAI_BODY_TIMEOUT",
        float,
        "OpenAI port: seconds a request has to send its whole body once its head has "
        "arrived; it gets 408 after. Default: 60.",
        "SECONDS",
    ),
    Setting(
        "max_batch_pairs",
        "--max-batch-pairs",
        "PAIRSCORE_MAX_BATCH_PAIRS",
        int,
        "Most pairs, from all concurrent requests, scored in one batch. Default: 64.",
        "N",
    ),
    Setting(
        "max_wait_ms",
        "--max-wait-ms",
        "PAIRSCORE_MAX_WAIT_MS",
        float,
        "How long the first pair of a batch may wait for more pairs to join it. "
        "Higher: fuller batches under load; lower: less latency when idle. "
        "Default: 5.",
        "MS",
    ),
    Setting(
        "grace_period_s",
        "--grace-period",
        "PAIRSCORE_GRACE_PERIOD",
        float,
        "On SIGTERM/SIGINT, seconds that running requests get to finish before "
        "they are cancelled. Default: 10.",
        "SECONDS",
    ),
    Setting(
        "stream_max_in_flight",
        "--stream-max-in-flight",
        "PAIRSCORE_STREAM_MAX_IN_FLIGHT",
        int,
        "Request messages of one ScoreStream call worked on at once; the server "
        "reads no further until one is answered. Default: 4.",
        "N",
    ),
    Setting(
        "max_message_bytes",
        "--max-message-bytes",
        "PAIRSCORE_MAX_MESSAGE_BYTES",
        int,
        "Largest gRPC message the server sends or receives. Default: 67108864 (64 MiB).",
        "BYTES",
    ),
    Setting(
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
    Setting(
        "prepare_workers",
        "--prepare-workers",
        "PAIRSCORE_PREPARE_WORKERS",
        int,
        "Threads that tokenize large requests, one chunk of each in turn; one more thread "
        "tokenizes small requests. The model always runs on one thread. Default: 1.",
        "N",
    ),
    Setting(
        "max_pairs_per_request",
        "--max-pairs-per-request",
        "PAIRSCORE_MAX_PAIRS_PER_REQUEST",
        int,
        "Most pairs in one ScoreRequest (one ScoreStream message); more is INVALID_ARGUMENT. Default: 1024.",
        "N",
    ),
    Setting(
        "max_text_chars",
        "--max-text-chars",
        "PAIRSCORE_MAX_TEXT_CHARS",
        int,
        "Most characters (Unicode code points) in one prompt or response, checked "
        "before tokenizing; a longer text fails its pair with an INVALID_ARGUMENT "
        "item error. Default: 100000.",
        "N",
    ),
    Setting(
        "max_request_chars",
        "--max-request-chars",
        "PAIRSCORE_MAX_REQUEST_CHARS",
        int,
        "Most characters one request may have tokenized (all its texts; a prompt "
        "shared by several pairs counts once), checked before tokenizing; more is "
        "INVALID_ARGUMENT. Default: 16777216.",
        "N",
    ),
    Setting(
        "max_preparing_chars",
        "--max-preparing-chars",
        "PAIRSCORE_MAX_PREPARING_CHARS",
        int,
        "Most characters being tokenized at once, all requests together; a request "
        "that does not fit now is RESOURCE_EXHAUSTED with a retry hint. Default: "
        "67108864 (at least --max-request-chars).",
        "N",
    ),
    Setting(
        "max_item_tokens",
        "--max-item-tokens",
        "PAIRSCORE_MAX_ITEM_TOKENS",
        _optional_int,
        "Most tokens one pair may need (prefix + prompt + response); a longer pair "
        "fails with an INVALID_ARGUMENT item error. Capped at the model's context. "
        "Default: the model's context.",
        "N",
    ),
    Setting(
        "max_queue_tokens",
        "--max-queue-tokens",
        "PAIRSCORE_MAX_QUEUE_TOKENS",
        _optional_int,
        "Admission bound: tokens that may wait for the model. A request that does "
        "not fit gets RESOURCE_EXHAUSTED at once, with a retry hint. "
        "Default: 32 x --max-batch-tokens.",
        "N",
    ),
    Setting(
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
    Setting(
        "forward_timeout_s",
        "--forward-timeout",
        "PAIRSCORE_FORWARD_TIMEOUT",
        _optional_seconds,
        "Watchdog: a forward pass running longer than this marks the model worker "
        "stuck: health turns NOT_SERVING and waiting callers get UNAVAILABLE until "
        "it answers. 'off' disables it. Default: 120.",
        "SECONDS",
    ),
    Setting(
        "max_connection_age_s",
        "--max-connection-age",
        "PAIRSCORE_MAX_CONNECTION_AGE",
        _optional_seconds,
        "Close each client connection (with a GOAWAY) after about this long, so "
        "clients re-resolve DNS and spread onto new replicas; gRPC adds +-10%% "
        "jitter. Default: off.",
        "SECONDS",
    ),
    Setting(
        "max_connection_age_grace_s",
        "--max-connection-age-grace",
        "PAIRSCORE_MAX_CONNECTION_AGE_GRACE",
        _optional_seconds,
        "After --max-connection-age, how long calls still running on the old "
        "connection may take before it is closed. Default: off (they may finish).",
        "SECONDS",
    ),
    Setting(
        "tls_cert",
        "--tls-cert",
        "PAIRSCORE_TLS_CERT",
        _path,
        "PEM certificate chain of the server: the gRPC port then speaks TLS only. Needs --tls-key.",
        "FILE",
    ),
    Setting(
        "tls_key",
        "--tls-key",
        "PAIRSCORE_TLS_KEY",
        _path,
        "PEM private key of --tls-cert.",
        "FILE",
    ),
    Setting(
        "tls_client_ca",
        "--tls-client-ca",
        "PAIRSCORE_TLS_CLIENT_CA",
        _path,
        "PEM CA bundle: clients must present a certificate signed by it (mutual TLS).",
        "FILE",
    ),
    Setting(
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
    Setting(
        "log_level",
        "--log-level",
        "PAIRSCORE_LOG_LEVEL",
        _upper,
        f"Logging level: {', '.join(LOG_LEVELS)}. Default: INFO. Prompts and responses are never logged.",
        "LEVEL",
    ),
)
