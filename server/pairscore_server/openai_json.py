"""JSON in and out of the OpenAI port: a depth-checked decoder and a bound of an answer's size.

:func:`decode_body` parses a request body and refuses, as a 400 with the
OpenAI error shape, what ``json.loads`` would either crash on or hand on to
be crashed on later: nesting deeper than :data:`MAX_JSON_DEPTH` (checked on
the raw text before ``json.loads`` recurses) and lone UTF-16 surrogates
(``"\\ud800"``), which no tokenizer can encode.

:func:`answer_bytes_bound` bounds the size of one choice of a
``/v1/completions`` answer from the prompt's token count, counting only what
the request asked for: per-token detail only with ``logprobs``, the
prompt's tokens only with ``echo``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from pairscore.types import Pair
from pairscore_server.engine.prepared import PreparedPair
from pairscore_server.openai_protocol import CompletionRequest, OpenAIError

#: Deepest nesting of arrays and objects a body may have. A completions body needs 2
#: (a list of token-id lists); the cap keeps the parser's recursion far from Python's limit.
MAX_JSON_DEPTH = 32

#: A JSON string literal (the unrolled form: linear, no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Everything but brackets, to be dropped once the strings are gone.
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
#: The escape of a UTF-16 surrogate: the only way a JSON text can hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

# Bounds, in bytes, of the parts of an answer as json.dumps writes them (", " and ": "
# separators): a float (repr, sign and exponent included) or an int with its separator,
# a string's quotes and separator, the fixed keys of a choice, and of the whole body.
_FLOAT_BYTES = 26
_INT_BYTES = 22
_STRING_BYTES = 4
_CHOICE_BYTES = 160
#: The answer's fixed part (its id, object, created, usage), without the model's name.
ANSWER_BYTES = 400


def _invalid_json(message: str, code: str = "invalid_json") -> OpenAIError:
    return OpenAIError(400, message, param="body", code=code)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in the JSON ``text`` (strings skipped)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _bad(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_place(body: Any) -> str:
    """Which field of ``body`` holds a lone surrogate, as well as a quick look can tell."""
    if isinstance(body, dict):
        for key, value in body.items():
            if _bad(key) or _bad(value):
                return f"'{key}'"
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if _bad(item):
                        return f"{key}[{i}]"
    return "a string of the body"


def inflate_body(raw: bytes, encoding: str, *, limit: int) -> bytes:
    """A body sent with ``Content-Encoding`` (gzip, deflate or identity), decompressed to
    at most ``limit`` bytes: :class:`OpenAIError` 413 past it (no more than ``limit`` + 1
    bytes are ever made), 415 for another encoding, 400 for a broken stream."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return raw
    if name in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif name == "deflate":
        wbits = zlib.MAX_WBITS  # zlib-wrapped, as HTTP's deflate is meant
    else:
        raise OpenAIError(
            415,
            f"Content-Encoding {encoding!r} is not supported: send the body as is, or gzip or deflate",
            param="body",
            code="unsupported_content_encoding",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise _invalid_json(f"the body is not valid {name} data: {exc}", "invalid_encoding") from exc
    if len(body) > limit:
        raise OpenAIError(
            413,
            f"the request body is over this server's {limit}-byte limit (--max-message-bytes) once "
            f"decompressed ({name}); send fewer prompts per request",
            param="body",
            code="request_entity_too_large",
        )
    if not inflater.eof:
        raise _invalid_json(
            f"the body is not valid {name} data: it ends before the stream does", "invalid_encoding"
        )
    return body


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body; :class:`OpenAIError` (400) when it is not valid
    UTF-8 JSON, is nested deeper than :data:`MAX_JSON_DEPTH`, or holds a lone surrogate."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_json(f"the body is not valid JSON: it is not UTF-8 ({exc})") from exc
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise _invalid_json(
            f"the body is not valid JSON for this endpoint: it nests arrays or objects {depth} "
            f"deep; at most {MAX_JSON_DEPTH} are accepted (a completions body needs 2)",
            "json_too_deep",
        )
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _invalid_json(f"the body is not valid JSON: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _invalid_json(
                f"the body is not valid JSON for this endpoint: {_surrogate_place(body)} holds a lone "
                "UTF-16 surrogate escape (such as \\ud800), which is no character; send text as "
                "valid UTF-8, or astral characters as a surrogate pair",
                "invalid_unicode",
            ) from exc
    return body


def answer_bytes_bound(
    request: CompletionRequest, *, max_token_text_bytes: int
) -> Callable[[Pair, PreparedPair], int]:
    """A bound of the size of one choice of the answer to ``request``, from its pair.

    It counts what the request asked for: the prompt's text and tokens with
    ``echo``; per-token entries (text, log-prob, offset and ``logprobs``
    alternatives plus the token itself) only with ``logprobs``; the greedy
    token with ``max_tokens`` 1. A text prompt's tokens decode to at most its
    UTF-8 bytes plus one U+FFFD (3 bytes) per token; an id, and each
    alternative, to at most ``max_token_text_bytes``. Text counts as UTF-8;
    :func:`encode_answer` checks the escapes of the real answer.
    """
    per_token = max_token_text_bytes
    k = request.logprobs

    def bound(pair: Pair, item: PreparedPair) -> int:
        size = _CHOICE_BYTES
        tokens = 0
        text = 0
        if request.echo:
            if pair.prompt_ids is not None:
                tokens = len(pair.prompt_ids)
                text = tokens * per_token
            else:
                tokens = item.prompt_tokens
                text = len(pair.prompt.encode()) + 3 * tokens
        if request.max_tokens > 0:
            tokens += 1
            text += per_token
        size += text  # the choice's text
        if k is not None:
            entry = _STRING_BYTES + _FLOAT_BYTES + _INT_BYTES  # token, log-prob, offset
            top = _STRING_BYTES + (k + 1) * (_STRING_BYTES + per_token + _FLOAT_BYTES)
            size += text + tokens * (entry + top)
        return size

    return bound


def encode_answer(body: Any, *, limit: int) -> bytes:
    """``body`` as UTF-8 JSON; :class:`OpenAIError` (400) when it is over ``limit`` bytes
    (:func:`answer_bytes_bound` counts text as UTF-8; this catches what escapes add)."""
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    if len(data) > limit:
        raise OpenAIError(
            400,
            f"the answer is {len(data)} bytes, over this server's {limit}-byte answer limit "
            "(--max-response-bytes); send fewer prompts per request or ask for fewer logprobs",
            param="prompt",
            code="response_too_large",
        )
    return data
