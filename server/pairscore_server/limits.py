"""The request limits a server enforces and reports in GetModelInfo."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Defaults of the server's limits (``pairscore serve --help`` shows them).
DEFAULT_MAX_PAIRS_PER_REQUEST = 1024
DEFAULT_MAX_TEXT_CHARS = 100_000
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: The default receive limit of gRPC clients in every language: an answer over it
#: fails a client that did not raise its own limit.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Default admission bound, in forward batches' worth of tokens.
DEFAULT_QUEUE_BATCHES = 32
#: Characters of distinct text one request may have tokenized (a shared prompt once),
#: and characters being tokenized at once server-wide (preparing.py).
DEFAULT_MAX_REQUEST_CHARS = 16 * 1024 * 1024
DEFAULT_MAX_PREPARING_CHARS = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Effective limits of one server (every value resolved, none None). The configured values
    are checked once, by :class:`~pairscore_server.config.ServerConfig`."""

    max_pairs_per_request: int
    max_text_chars: int
    max_item_tokens: int
    max_message_bytes: int
    max_queue_tokens: int
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_request_chars: int = DEFAULT_MAX_REQUEST_CHARS
    max_preparing_chars: int = DEFAULT_MAX_PREPARING_CHARS

    def too_many_pairs(self, n: int, has: str, per: str, fix: str) -> str | None:
        """Why a request of ``n`` pairs (or texts) is over ``max_pairs_per_request``, in the
        caller's words (``has``, ``per``, ``fix``); None within the limit. One wording for
        every RPC that counts its items."""
        if n <= self.max_pairs_per_request:
            return None
        return (
            f"request has {has}; this server takes at most {self.max_pairs_per_request} {per} "
            f"(max_pairs_per_request, --max-pairs-per-request); {fix}"
        )

    def text_too_long(self, what: str, text: str, per: str) -> str | None:
        """Why ``text`` (named ``what``) is over ``max_text_chars`` (``per``: which texts the
        limit counts); None within it."""
        if len(text) <= self.max_text_chars:
            return None
        return (
            f"{what} has {len(text)} characters; this server takes at most {self.max_text_chars} "
            f"characters per {per} (max_text_chars, --max-text-chars); shorten or split it"
        )


def resolve_limits(
    *,
    max_context: int,
    max_batch_tokens: int,
    max_pairs_per_request: int = DEFAULT_MAX_PAIRS_PER_REQUEST,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_item_tokens: int | None = None,
    max_queue_tokens: int | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_request_chars: int = DEFAULT_MAX_REQUEST_CHARS,
    max_preparing_chars: int = DEFAULT_MAX_PREPARING_CHARS,
) -> Limits:
    """Fill the configured limits' defaults from the model and clamp them to what makes sense.

    ``max_item_tokens`` is at most the model's context. The queue must hold
    at least one item of ``max_item_tokens``, or such items could never be
    admitted. ``max_response_bytes`` is at most ``max_message_bytes`` (what gRPC sends).
    ``max_preparing_chars`` (server-wide) is at least ``max_request_chars``.
    """
    item = max_context
    if max_item_tokens is not None:
        if max_item_tokens > max_context:
            log.warning(
                "max item tokens %d exceeds the model's context of %d tokens; using %d",
                max_item_tokens,
                max_context,
                max_context,
            )
        item = min(max_item_tokens, max_context)
    queue = max_queue_tokens or DEFAULT_QUEUE_BATCHES * max_batch_tokens
    if queue < item:
        log.warning(
            "max queue tokens %d is below the largest item (%d tokens); using %d",
            queue,
            item,
            item,
        )
        queue = item
    return Limits(
        max_pairs_per_request=max_pairs_per_request,
        max_text_chars=max_text_chars,
        max_item_tokens=item,
        max_message_bytes=max_message_bytes,
        max_queue_tokens=queue,
        max_response_bytes=min(max_response_bytes, max_message_bytes),
        max_request_chars=max_request_chars,
        max_preparing_chars=max(max_preparing_chars, max_request_chars),
    )
