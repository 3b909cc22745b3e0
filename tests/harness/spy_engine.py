"""Large-request helpers shared by tests/test_request_path.py and bench/request_path.py:
word-salad text of a given size, and an engine wrapper that records when each
prepare / tokenize call ran (to see how long the server went on working)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

_WORDS = ("alpha", "beta", "gamma", "delta", "the", "of", "and", "score", "model", "token", "river")


def word_salad(chars: int, seed: int) -> str:
    """``chars`` characters of word salad, different for each seed."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS) + str(rng.randrange(1000))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


class SpyEngine:
    """Delegates to a real engine and records each prepare / tokenize call (when, how much)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.calls: list[tuple[str, float, float, int]] = []  # (first id, start, end, items)
        self.busy = 0  # prepare / tokenize calls running now
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def info(self) -> Any:
        return self._engine.info

    @property
    def max_batch_tokens(self) -> int:
        return int(self._engine.max_batch_tokens)

    @property
    def max_call_tokens(self) -> int:
        return int(self._engine.max_call_tokens)

    def _record(self, first: str, items: int, call: Any) -> Any:
        with self._lock:
            self.busy += 1
        started = time.monotonic()
        try:
            return call()
        finally:
            with self._lock:
                self.busy -= 1
                self.calls.append((first, started, time.monotonic(), items))

    def prepare(self, pairs: Any, options: Any, *, max_tokens: Any = None) -> Any:
        return self._record(
            pairs[0].id if pairs else "",
            len(pairs),
            lambda: self._engine.prepare(pairs, options, max_tokens=max_tokens),
        )

    def tokenize(self, texts: Any, *, parse_special_tokens: bool = False) -> Any:
        return self._record(
            "tokenize",
            sum(len(t) for t in texts),
            lambda: self._engine.tokenize(texts, parse_special_tokens=parse_special_tokens),
        )

    def score(self, prepared: Any, *, cancelled: Any = None) -> Any:
        return self._engine.score(prepared, cancelled=cancelled)

    def warmup(self) -> None:
        self._engine.warmup()

    def prepared(self, prefix: str) -> int:
        """Pairs of ids starting with ``prefix`` prepared so far."""
        with self._lock:
            return sum(n for first, _, _, n in self.calls if first.startswith(prefix))

    @property
    def last_end(self) -> float:
        """When the last recorded call ended (``time.monotonic()``; 0.0 before any)."""
        with self._lock:
            return max((end for _, _, end, _ in self.calls), default=0.0)
