"""A pair after tokenization: everything the forward pass and the result builder need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pairscore.types import Side


class TokenSpan(NamedTuple):
    """Where one scored token came from: its side and code-point span in that side's text.

    A NamedTuple rather than a dataclass: a request makes one per token, and
    tuples are several times cheaper to build.
    """

    side: Side
    char_start: int
    char_end: int
    straddles_boundary: bool = False


@dataclass(frozen=True)
class PreparedPair:
    """A tokenized pair, ready to be batched.

    ``input_ids`` is p ⊕ x ⊕ y (the prefix token first). Tokens
    ``1 .. prompt_tokens`` are the prompt's and the last ``response_tokens``
    are the response's. ``offsets`` holds each scored token's code-point span
    in its own side's text (not p's); ``straddle_index`` is the position
    among them of the (first) response token that began in the prompt (JOINT
    mode), else -1; later tokens with its span are its character's other
    bytes. Spans are kept as plain tuples: a request has one per token and
    :attr:`spans` builds the richer objects only when asked.
    """

    id: str
    input_ids: tuple[int, ...]
    prompt_tokens: int
    response_tokens: int
    offsets: tuple[tuple[int, int], ...]
    boundary_straddled: bool
    return_tokens: bool
    straddle_index: int = -1
    #: Data-selection options of the pair's request (docs/scores.md): score
    #: p ⊕ y as well; compute ranks; the k most likely tokens per position.
    unconditional: bool = False
    greedy: bool = False
    top_k: int = 0

    @property
    def work_tokens(self) -> int:
        """Token positions this pair costs a ``score`` call: p ⊕ x ⊕ y, plus p ⊕ y when it
        asked for its unconditional score (an upper bound: identical p ⊕ y run once).
        The batcher's queue and throughput count these."""
        extra = (
            1 + self.response_tokens
            if self.unconditional and self.response_tokens and self.prompt_tokens
            else 0
        )
        return self.num_tokens + extra

    @property
    def response_ids(self) -> tuple[int, ...]:
        """y's token ids, the ones conditional_logprob sums over."""
        return self.input_ids[len(self.input_ids) - self.response_tokens :]

    @property
    def num_tokens(self) -> int:
        """Length of p ⊕ x ⊕ y: what this pair costs in a forward pass."""
        return len(self.input_ids)

    @property
    def spans(self) -> tuple[TokenSpan, ...]:
        """Side and span of each scored token."""
        m = self.prompt_tokens
        k = self.straddle_index
        # The tokens of one straddling character (its bytes) share its span.
        straddling = self.offsets[k] if k >= 0 else None
        return tuple(
            TokenSpan(
                Side.PROMPT if i < m else Side.RESPONSE,
                s,
                e,
                k >= 0 and (i == k or (i > k and (s, e) == straddling)),
            )
            for i, (s, e) in enumerate(self.offsets)
        )
