"""Results: a pair's log-probs (or detail matrix, see logprobs.py) in, its PairScore out.

The last step of a ``score`` call: sums (joint, prompt, conditional,
unconditional, PMI, IFD), the greedy check, and with ``return_tokens`` the
per-token detail with token texts (top-k alternatives' texts decoded once per
id and kept).
"""

from __future__ import annotations

import torch

from pairscore.types import PairScore, TokenAlternative, TokenScore, data_selection_scores
from pairscore_server.engine.prepared import PreparedPair
from pairscore_server.engine.tokenization import PairTokenizer


class ResultBuilder:
    """Builds PairScores for one model's tokenizer and prefix token (``prefix_id``)."""

    def __init__(self, pair_tokenizer: PairTokenizer, prefix_id: int) -> None:
        self.pair_tokenizer = pair_tokenizer
        self.prefix_id = prefix_id
        self._alternative_texts: dict[int, str] = {}

    def result(self, pair: PreparedPair, lps: torch.Tensor, alone: torch.Tensor | None = None) -> PairScore:
        """A pair's scores from its log-probs (or detail matrix, see logprobs.py) and, with
        ``unconditional``, the log-probs of its p ⊕ y (``alone``)."""
        detail = lps if lps.dim() == 2 else None
        if detail is not None:
            lps = detail[:, 0]
        m = pair.prompt_tokens
        sums = lps.double()
        prompt_lp = float(sums[:m].sum())
        cond_lp = float(sums[m:].sum())
        uncond_lp = pmi = ifd = None
        if alone is not None:
            alone_lps = alone[:, 0] if alone.dim() == 2 else alone
            uncond_lp = float(alone_lps.double().sum())
            pmi, ifd = data_selection_scores(cond_lp, uncond_lp)
        greedy = None
        if pair.greedy and detail is not None:
            greedy = bool((detail[m:, 1] == 1).all())
        tokens: tuple[TokenScore, ...] = ()
        if pair.return_tokens:
            ids = pair.input_ids[1:]
            texts = self.pair_tokenizer.token_texts(self.prefix_id, ids)
            ranks = [0] * len(ids)
            alternatives: list[tuple[TokenAlternative, ...]] = [()] * len(ids)
            if detail is not None and pair.greedy:
                ranks = [int(r) for r in detail[:, 1].tolist()]
            if detail is not None and pair.top_k:
                alternatives = self._alternatives(detail, pair.top_k)
            tokens = tuple(
                TokenScore(
                    token_id=tid,
                    text=text,
                    logprob=float(lp),
                    side=span.side,
                    char_start=span.char_start,
                    char_end=span.char_end,
                    straddles_boundary=span.straddles_boundary,
                    rank=rank,
                    top_k=alts,
                )
                for tid, text, lp, span, rank, alts in zip(
                    ids, texts, lps.tolist(), pair.spans, ranks, alternatives, strict=True
                )
            )
        return PairScore(
            joint_logprob=prompt_lp + cond_lp,
            prompt_logprob=prompt_lp,
            conditional_logprob=cond_lp,
            prompt_tokens=m,
            response_tokens=pair.response_tokens,
            boundary_straddled=pair.boundary_straddled,
            tokens=tokens,
            id=pair.id,
            unconditional_logprob=uncond_lp,
            pmi=pmi,
            ifd=ifd,
            response_is_greedy=greedy,
            prompt_tokens_dropped=pair.prompt_tokens_dropped,
            rendered_prompt=pair.rendered_prompt,
            rendered_response=pair.rendered_response,
        )

    def _alternatives(self, detail: torch.Tensor, k: int) -> list[tuple[TokenAlternative, ...]]:
        """The top ``k`` of each row of a detail matrix (whose top-k may be wider)."""
        width = (detail.shape[1] - 2) // 2
        ids = detail[:, 2 : 2 + k].long().tolist()
        values = detail[:, 2 + width : 2 + width + k].tolist()
        texts = self._texts_of({t for row in ids for t in row})
        return [
            tuple(TokenAlternative(t, texts[t], v) for t, v in zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids, values, strict=True)
        ]

    def _texts_of(self, ids: set[int]) -> dict[int, str]:
        """Token texts, as TokenScore.text, decoded once per id and kept."""
        missing = tuple(sorted(ids - self._alternative_texts.keys()))
        if missing:
            texts = self.pair_tokenizer.token_texts(self.prefix_id, missing)
            self._alternative_texts.update(zip(missing, texts, strict=True))
        return self._alternative_texts
