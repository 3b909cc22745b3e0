"""A pair after tokenization: everything the forward pass and the result builder need."""

from __future__ import annotations

from dataclasses import dataclass

from pairscore.types import Side


@dataclass(frozen=True)
class TokenSpan:
    """Where one scored token came from: its side and code-point span in that side's text."""

    side: Side
    char_start: int
    char_end: int
    straddles_boundary: bool = False


@dataclass(frozen=True)
class PreparedPair:
    """A tokenized pair, ready to be batched.

    ``input_ids`` is p ⊕ x ⊕ y (the prefix token first). Tokens
    ``1 .. prompt_tokens`` are the prompt's and the last ``response_tokens``
    are the response's; ``spans`` describes those scored tokens (not p).
    """

    id: str
    input_ids: tuple[int, ...]
    prompt_tokens: int
    response_tokens: int
    spans: tuple[TokenSpan, ...]
    boundary_straddled: bool
    return_tokens: bool

    @property
    def num_tokens(self) -> int:
        """Length of p ⊕ x ⊕ y: what this pair costs in a forward pass."""
        return len(self.input_ids)
