"""The answer-size rule: a request whose answer could not be sent is refused before scoring.

Per-token detail makes an answer large; a gRPC client refuses one over its
receive limit (4 MiB unless raised) after the server did all the work. So the
service adds up, before any scoring, a bound of the answer from the pairs'
token counts and refuses a request whose bound is over ``max_response_bytes``.
How large each part of an answer can be is the wire format's business: the port
that encodes the answer hands the service an :class:`AnswerBound` (the gRPC
port: :mod:`pairscore_server.response_size`; the OpenAI port: its JSON bound in
:mod:`pairscore_server.openai_json`), so the service knows no wire format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pairscore.types import ItemError, Pair, ScoreOptions

if TYPE_CHECKING:
    from pairscore_server.engine import PreparedPair


@dataclass(frozen=True)
class AnswerBound:
    """How large the answer to one scoring request can be, as its port counts its wire format."""

    #: A scored pair's share of the answer, at most, from the pair and its tokenization.
    scored: Callable[[Pair, PreparedPair], int]
    #: The share of a pair that preparation answered with an item error.
    refused: Callable[[Pair, ItemError], int]
    #: What the answer holds besides its results (the set wrappers of ScoreCandidates...).
    extra_bytes: int = 0
    #: How a caller asks for less per-token detail, said in the refusal ("" where it did not).
    less_detail: str = ""

    def refusal(
        self,
        pairs: Sequence[Pair],
        prepared: Sequence[PreparedPair | ItemError],
        options: ScoreOptions,
        *,
        limit: int,
    ) -> str | None:
        """Why the answer to ``pairs`` (prepared as ``prepared``) cannot be sent: its bound
        is over ``limit`` bytes (``max_response_bytes``); None when it fits."""
        size = self.extra_bytes
        for pair, item in zip(pairs, prepared, strict=True):
            size += self.refused(pair, item) if isinstance(item, ItemError) else self.scored(pair, item)
        if size <= limit:
            return None
        fix = "send fewer pairs per request"
        if self.less_detail:
            fix += f" or {self.less_detail}"
        if options.top_k:
            fix += f" or ask for fewer top-k alternatives (top_k={options.top_k})"
        return (
            f"the answer to this request could take up to {size} bytes, over this server's "
            f"{limit}-byte answer limit (max_response_bytes, the default receive limit of "
            f"gRPC clients); {fix}; nothing was scored"
        )
