"""The prepare stage: tokenization with a budget, in bounded chunks, fair between requests.

Between a request's arrival and its admission on tokens (admission.py), its
pairs are tokenized (``Engine.prepare``). That is the one stage whose cost is
not known in tokens yet, so it is budgeted in characters (a token id sent by
the caller counts as one):

* **Per request**: at most ``max_request_chars`` characters of distinct text
  (a prompt shared by several pairs counts once, as it is tokenized once); more
  is :class:`RequestLimitError` before any tokenization.
* **Server-wide**: at most ``max_preparing_chars`` characters of requests
  being tokenized at once; a request that does not fit now is
  :class:`QueueFullError` with a retry hint from the measured characters per
  second (a request alone is always taken).
* **Chunks**: a request is tokenized in chunks of about ``chunk_chars``
  characters (at least one pair; pairs sharing a prompt go in one chunk as far
  as they fit, so the prompt is tokenized once per chunk), each one call on the
  prepare executor. Between chunks the stage checks the deadline
  (:class:`DeadlineExceededError`) and the caller's cancellation (the awaiting
  task is cancelled): work stops within one chunk of the caller leaving.
* **Fair share.** A request has at most one chunk queued or running on the
  prepare executor. Chunks of large requests (more than one chunk's
  characters) take one of ``large_workers`` slots, handed out first come,
  first served, so large requests take turns, one chunk each (round-robin).
  The executor has one thread more than that, so a small request (one chunk
  or less) never waits behind a large request's chunk, only behind other
  small ones: never behind a whole giant request.

Small requests (few pairs, few characters) are tokenized inline on the event
loop, at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from pairscore.types import Pair
from pairscore_server.errors import DeadlineExceededError, QueueFullError, RequestLimitError

T = TypeVar("T")
U = TypeVar("U")

#: Characters of one chunk of tokenization: on the tiny test models and on SmolLM2 on
#: a CPU, well under 0.1 s of work (docs/reliability.md).
DEFAULT_CHUNK_CHARS = 32_768
#: Requests with at most this many pairs and characters are tokenized inline.
DEFAULT_INLINE_PAIRS = 16
DEFAULT_INLINE_CHARS = 16_384
#: Retry hint before any chunk has been timed, and its bounds, in seconds.
_DEFAULT_RETRY_S = 1.0
_MIN_RETRY_S = 0.05
_MAX_RETRY_S = 30.0


def pair_chars(pair: Pair, *, prompt: bool = True) -> int:
    """What tokenizing ``pair`` costs, in characters (an id counts as one, a message
    its role and content); without its text prompt when ``prompt`` is false."""
    size = (len(pair.prompt) if prompt else 0) + len(pair.response)
    size += len(pair.prompt_ids or ()) + len(pair.response_ids or ())
    # a message's role counts too: an empty message is not free to render and tokenize
    return size + sum(len(m.role) + len(m.content) for m in pair.prompt_messages or ())


def request_chars(pairs: Sequence[Pair]) -> int:
    """The characters a request's tokenization costs: each distinct text prompt once."""
    seen: set[str] = set()
    total = 0
    for pair in pairs:
        total += pair_chars(pair, prompt=pair.prompt not in seen)
        seen.add(pair.prompt)
    return total


def pair_chunks(pairs: Sequence[Pair], chunk_chars: int) -> list[list[int]]:
    """Pair indices in chunks of about ``chunk_chars`` characters (at least one pair each).

    Pairs with the same text prompt are adjacent (in the order of its first
    use). A pair whose prompt is already in the chunk costs only its other
    characters, and joins while those fit: a chunk is at most its first pair
    plus ``chunk_chars`` characters, and a candidate set's prompt is tokenized
    once per chunk, not once per candidate.
    """
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(i)
    chunks: list[list[int]] = []
    chunk: list[int] = []
    prompt_chars = rest = 0
    prompts: set[str] = set()
    for prompt, indices in groups.items():
        for i in indices:
            own = pair_chars(pairs[i], prompt=False)
            if prompt in prompts:
                fits = rest + own <= chunk_chars
            else:
                fits = prompt_chars + rest + len(prompt) + own <= chunk_chars
            if chunk and not fits:
                chunks.append(chunk)
                chunk, prompt_chars, rest, prompts = [], 0, 0, set()
            if prompt not in prompts:
                prompts.add(prompt)
                prompt_chars += len(prompt)
            chunk.append(i)
            rest += own
    if chunk:
        chunks.append(chunk)
    return chunks


def text_chunks(texts: Sequence[str], chunk_chars: int) -> list[list[int]]:
    """Text indices in order, in chunks of about ``chunk_chars`` characters (one text at least)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    size = 0
    for i, text in enumerate(texts):
        if chunk and size + len(text) > chunk_chars:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(i)
        size += len(text)
    if chunk:
        chunks.append(chunk)
    return chunks


class PrepareStage:
    """Runs tokenization work under the budgets above (see the module docstring)."""

    def __init__(
        self,
        executor: Executor | None,
        *,
        max_request_chars: int,
        max_preparing_chars: int,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        inline_pairs: int = DEFAULT_INLINE_PAIRS,
        inline_chars: int = DEFAULT_INLINE_CHARS,
        large_workers: int = 1,
    ) -> None:
        if min(max_request_chars, max_preparing_chars, chunk_chars, large_workers) < 1:
            raise ValueError("the prepare stage's character budgets and workers must be >= 1")
        self._large_slots = asyncio.Semaphore(large_workers)
        self._executor = executor
        self.max_request_chars = max_request_chars
        self.max_preparing_chars = max_preparing_chars
        self.chunk_chars = chunk_chars
        self._inline_pairs = inline_pairs
        self._inline_chars = inline_chars
        self.preparing_chars = 0  # characters of the requests being tokenized now
        self._chars_per_s: float | None = None

    def inline(self, items: int, chars: int) -> bool:
        """Whether a request of ``items`` pairs or texts and ``chars`` characters is small
        enough to tokenize on the event loop."""
        return items <= self._inline_pairs and chars <= self._inline_chars

    def check(self, chars: int, what: str = "request") -> None:
        """Raise if a request of ``chars`` characters cannot be tokenized now: over the
        per-request budget (RequestLimitError) or the server-wide one (QueueFullError)."""
        if chars > self.max_request_chars:
            raise RequestLimitError(
                f"{what} has {chars} characters to tokenize (a prompt shared by several "
                f"pairs counts once); this server takes at most {self.max_request_chars} "
                "per request (max_request_chars); split it"
            )
        busy = self.preparing_chars
        if busy and busy + chars > self.max_preparing_chars:
            retry = self.retry_after_s()
            raise QueueFullError(
                f"server overloaded: it is tokenizing {busy} characters (at most "
                f"{self.max_preparing_chars} at once, max_preparing_chars) and this {what} "
                f"has {chars}; retry in about {retry * 1000:.0f} ms",
                retry,
            )

    def retry_after_s(self) -> float:
        """How long the tokenization in progress takes at the measured rate (clamped)."""
        rate = self._chars_per_s
        if not rate:
            return _DEFAULT_RETRY_S
        return min(_MAX_RETRY_S, max(_MIN_RETRY_S, self.preparing_chars / rate))

    async def run(
        self,
        chunks: Sequence[Sequence[int]],
        work: Callable[[list[int]], list[U]],
        *,
        chars: int,
        deadline: float | None,
        after_chunk: Callable[[list[U]], None] | None = None,
    ) -> list[tuple[list[int], list[U]]]:
        """Run ``work`` on each chunk of indices in turn on the executor, each chunk's
        results with its indices; ``chars`` (checked by :meth:`check`) is held in the
        server-wide budget meanwhile. Raises DeadlineExceededError when ``deadline``
        (``time.monotonic()``) passes between chunks; a cancelled caller stops here too.
        ``after_chunk`` may raise to stop early (an answer grown too large)."""
        loop = asyncio.get_running_loop()
        self.preparing_chars += chars
        done: list[tuple[list[int], list[U]]] = []
        try:
            for chunk in chunks:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceededError("the deadline passed while the request was tokenized")
                started = time.perf_counter()
                indices = list(chunk)
                if chars > self.chunk_chars:  # a large request: one slot per chunk, in turn
                    async with self._large_slots:
                        results = await loop.run_in_executor(self._executor, work, indices)
                else:
                    results = await loop.run_in_executor(self._executor, work, indices)
                self._measured(chars / max(len(chunks), 1), time.perf_counter() - started)
                done.append((indices, results))
                if after_chunk is not None:
                    after_chunk(results)
        finally:
            self.preparing_chars -= chars
        return done

    def _measured(self, chars: float, seconds: float) -> None:
        if seconds > 0:
            rate = chars / seconds
            old = self._chars_per_s
            self._chars_per_s = rate if old is None else old + 0.3 * (rate - old)


def in_order(n: int, done: Sequence[tuple[list[int], list[T]]]) -> list[T]:
    """The results of chunks of indices ``0 .. n-1``, back in index order."""
    out: list[T | None] = [None] * n
    for indices, results in done:
        if len(results) != len(indices):
            raise RuntimeError(f"prepared {len(results)} items for {len(indices)}")
        for i, result in zip(indices, results, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]
