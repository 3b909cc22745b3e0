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

    ``input_ids`` is c ⊕ x ⊕ y: c is the one token everything is conditioned
    on and is never scored; it is the prefix token p, or with
    ``PrefixMode.NONE`` the prompt's first token (then ``prompt_tokens`` is
    the prompt's length minus one), or, for a conversation whose rendering
    opens with a control token, that token in either mode (then c ⊕ x ⊕ y is
    exactly the chat template's ids). Tokens ``1 .. prompt_tokens`` are the
    prompt's scored tokens and the last ``response_tokens`` are the
    response's. ``offsets`` holds each scored token's code-point span
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
    #: The server's prefix token p, which the unconditional row p ⊕ y starts with
    #: (-1: ``input_ids[0]``, which is p unless the prefix mode is NONE).
    prefix_id: int = -1
    #: Tokens dropped from the start of the prompt (``Truncation.LEFT``).
    prompt_tokens_dropped: int = 0
    #: Chat items with per-token detail: x and y as the chat template rendered them.
    rendered_prompt: str = ""
    rendered_response: str = ""

    @property
    def alone_ids(self) -> tuple[int, ...]:
        """p ⊕ y: what the unconditional score of y runs over."""
        p = self.input_ids[0] if self.prefix_id < 0 else self.prefix_id
        return (p, *self.response_ids)

    @property
    def is_own_alone(self) -> bool:
        """Whether ``input_ids`` already is p ⊕ y (an empty prompt after p): the pair's
        conditional score is its unconditional one."""
        return self.prompt_tokens == 0 and self.input_ids[0] == self.alone_ids[0]

    @property
    def work_tokens(self) -> int:
        """Token positions this pair costs a ``score`` call: p ⊕ x ⊕ y, plus p ⊕ y when it
        asked for its unconditional score (an upper bound: identical p ⊕ y run once).
        The batcher's queue and throughput count these."""
        extra = (
            1 + self.response_tokens
            if self.unconditional and self.response_tokens and not self.is_own_alone
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
