"""The Tokenize RPC's work: limits, then the texts in chunks, with the answer's size
checked before and during the work.

A ``TokenizeResponse`` is one ``TokenIds`` entry per text, so its size is known
exactly once the ids are (:func:`answer_bytes`), and bounded from below before
any tokenization (:func:`answer_bytes_at_least`):

* every entry takes at least 2 bytes (its tag and length), even for no ids;
* a token stands for at most ``max_token_text_bytes + 1`` characters of its
  text (its decoded text shows each character it covers at least once, a
  partial one as U+FFFD, except a leading space a decoder may strip), and an id
  takes at least one byte: a text of ``c`` characters has at least
  ``ceil(c / (max_token_text_bytes + 1))`` ids, plus 2 bytes for their field.
  Not for a tokenizer that normalizes text (NFC can merge characters, a
  normalizer can remove some): there only the 2 bytes a text count.

The bound is sound, so weak (a token may be 81 characters of spaces on
SmolLM2): a call refused before work is one whose answer *must* be too large,
typically many texts against a small ``max_response_bytes``. Past that, the
texts are tokenized in chunks (preparing.py: the deadline and the caller's
cancellation checked between chunks), and after each chunk the exact size of
the answer so far plus the bound of the texts still to do is compared with the
limit: the call stops at the first chunk after which the answer cannot fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pairscore_server.errors import RequestLimitError
from pairscore_server.limits import Limits
from pairscore_server.preparing import PrepareStage, in_order, text_chunks

#: The bytes of one TokenizeResponse entry besides its ids: the entry's tag and length.
_ENTRY_BYTES = 2
#: The bytes of a non-empty TokenIds' packed field besides the ids: its tag and length.
_FIELD_BYTES = 2


def varint_bytes(value: int) -> int:
    """Bytes of ``value`` (>= 0) as a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)


def entry_bytes(ids: Sequence[int]) -> int:
    """Exact bytes of one text's entry in an encoded TokenizeResponse (ids >= 0)."""
    payload = sum(varint_bytes(i) for i in ids)
    inner = 1 + varint_bytes(payload) + payload if ids else 0
    return 1 + varint_bytes(inner) + inner


def answer_bytes(ids: Sequence[Sequence[int]]) -> int:
    """Exact bytes of the encoded TokenizeResponse holding ``ids``."""
    return sum(entry_bytes(i) for i in ids)


def text_bytes_at_least(chars: int, max_token_chars: int | None) -> int:
    """A lower bound of the bytes of the entry of a text of ``chars`` characters, when
    one token stands for at most ``max_token_chars`` of them (None: no such bound)."""
    if not max_token_chars or chars == 0:
        return _ENTRY_BYTES
    return _ENTRY_BYTES + _FIELD_BYTES + -(-chars // max_token_chars)


def answer_bytes_at_least(texts: Sequence[str], max_token_chars: int | None) -> list[int]:
    """Per text, the lower bound of :func:`text_bytes_at_least`."""
    return [text_bytes_at_least(len(t), max_token_chars) for t in texts]


def _too_large(limit: int, why: str) -> RequestLimitError:
    return RequestLimitError(
        f"the answer to this Tokenize request {why}, over this server's {limit}-byte answer "
        "limit (max_response_bytes, --max-response-bytes); send fewer texts per call"
    )


async def tokenize_texts(
    texts: Sequence[str],
    *,
    work: Callable[[list[str]], list[tuple[int, ...]]],
    stage: PrepareStage,
    limits: Limits,
    max_token_chars: int | None,
    deadline: float | None = None,
) -> list[tuple[int, ...]]:
    """Each text's ids from ``work`` (the engine's tokenize), under the request limits.

    More than ``max_pairs_per_request`` texts, a text over ``max_text_chars``, more
    than ``max_request_chars`` characters, or an answer that must be over
    ``max_response_bytes`` raise RequestLimitError (INVALID_ARGUMENT) before any
    tokenization; the server-wide character budget raises QueueFullError. Large calls
    run in chunks on the prepare stage (``deadline``: DeadlineExceededError between
    chunks), stopping with RequestLimitError at the first chunk after which the
    answer cannot fit (the module docstring)."""
    n = len(texts)
    problem = limits.too_many_pairs(n, f"{n} texts", "texts per Tokenize request", "split it")
    for i, text in enumerate(texts):
        problem = problem or limits.text_too_long(f"texts[{i}]", text, "text")
    if problem:
        raise RequestLimitError(problem)
    chars = sum(len(t) for t in texts)
    stage.check(chars, "Tokenize request")
    limit = limits.max_response_bytes
    floors = answer_bytes_at_least(texts, max_token_chars)
    # still[k]: the bound of texts k .. n-1, the ones not tokenized after k texts
    still = [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        still[k] = still[k + 1] + floors[k]
    if still[0] > limit:
        raise _too_large(
            limit,
            f"must take at least {still[0]} bytes for its {n} texts (2 bytes a text at least"
            + (f", and one a {max_token_chars} characters" if max_token_chars else "")
            + "); nothing was tokenized",
        )
    size = 0
    done_texts = 0

    def count(ids: Sequence[tuple[int, ...]]) -> None:
        nonlocal size, done_texts
        size += answer_bytes(ids)
        done_texts += len(ids)
        if size + still[done_texts] > limit:
            rest = (
                f" and at least {still[done_texts]} for the other {n - done_texts}" if done_texts < n else ""
            )
            raise _too_large(
                limit,
                f"takes more: {size} bytes for the first {done_texts} of its {n} texts{rest}; "
                "tokenization stopped there",
            )

    def run(chunk: list[int]) -> list[tuple[int, ...]]:
        return work([texts[i] for i in chunk])

    if stage.inline(n, chars):
        ids = run(list(range(n)))
        count(ids)
        return ids
    done = await stage.run(
        text_chunks(texts, stage.chunk_chars), run, chars=chars, deadline=deadline, after_chunk=count
    )
    return in_order(n, done)


def max_token_chars(*, normalizes: bool, max_token_text_bytes: int) -> int | None:
    """At most how many characters of a text one token stands for (None: no bound):
    ``max_token_text_bytes + 1`` for a tokenizer that does not normalize (module docstring)."""
    if normalizes or max_token_text_bytes <= 0:
        return None
    return max_token_text_bytes + 1
