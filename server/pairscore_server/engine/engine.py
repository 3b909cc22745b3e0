"""ScoringEngine: pairs in, PairScores out. Knows nothing of gRPC."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pairscore.types import (
    ChatMessage,
    ItemError,
    ModelInfo,
    Pair,
    ScoreOptions,
    ScoreOutcome,
    TokenizationMode,
)
from pairscore_server.engine.call_size import CallSize
from pairscore_server.engine.chat import ChatRenderer
from pairscore_server.engine.engine_limits import EngineLimits
from pairscore_server.engine.interface import (
    Cancelled,
    CausalLM,
    Engine,
    ForwardStats,
    ScoreCancelled,
    ScoredBatch,
    score_pairs,
)
from pairscore_server.engine.kernels import fuse_activations, stabilize_gemm_rows
from pairscore_server.engine.logprobs import (
    HeadDetail,
    LogprobComputer,
)
from pairscore_server.engine.packed_attention import (
    disable_packed_attention,
    enable_packed_attention,
)
from pairscore_server.engine.packing import ROW_ALIGN, pack_row
from pairscore_server.engine.padding import make_batch, plan_padded_batches
from pairscore_server.engine.prefix import Prefix, resolve_prefix
from pairscore_server.engine.preparation import Preparation
from pairscore_server.engine.prepared import PreparedPair
from pairscore_server.engine.results import ResultBuilder
from pairscore_server.engine.tokenization import PairTokenizer
from pairscore_server.engine.tries import (
    RowItem,
    Trie,
    build_tries,
    plan_rows,
    row_items,
)

log = logging.getLogger(__name__)

#: Largest ScoreOptions.top_k this engine computes (ModelInfo.max_top_k), as vLLM's
#: max_logprobs: 20 alternatives per token keep a token's detail under ~1 KiB.
MAX_TOP_K = 20

#: Where a pair's unconditional log-probs come from (see ScoringEngine.score):
#: an index into the scored sequences, or EMPTY_RESPONSE (nothing to score).
EMPTY_RESPONSE = -1


@dataclass(frozen=True)
class ModelDescription:
    """Facts about where the model came from, for ModelInfo."""

    name: str
    source: str
    revision: str = ""
    server_version: str = ""


def _never() -> bool:
    return False


def _check(cancelled: Cancelled) -> None:
    """Raise ScoreCancelled when nobody waits for the call's results any more."""
    if cancelled():
        raise ScoreCancelled("every caller of this batch left; the rest was not run")


def model_context_length(model: Any, tokenizer: Any) -> int:
    """The model's context window: its config's position limit, else the tokenizer's."""
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**8:
        return value
    raise ValueError("cannot tell the model's context length from its config or tokenizer")


class ScoringEngine(Engine):
    """Scores pairs with one forward pass each, batched: the
    :class:`~pairscore_server.engine.interface.Engine` over one model.

    ``prepare`` (tokenization, cheap, thread-safe) and ``score`` (forward
    passes, blocking) are separate so that a server can batch prepared pairs
    from many requests. ``score`` must be called from one thread at a time.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        *,
        description: ModelDescription,
        prefix_token: str | None = None,
        limits: EngineLimits | None = None,
    ) -> None:
        self.model = model.eval()
        fused = fuse_activations(model)
        if fused:
            log.info("using fused kernels for %d activation modules", fused)
        # Same GEMM kernel for any number of rows, and packed rows whose
        # elementwise kernels leave no scalar tail: batch-invariant scores.
        stabilize_gemm_rows(model)
        self.row_align = ROW_ALIGN
        self.tokenizer = tokenizer
        self.description = description
        self.limits = limits = limits or EngineLimits()
        self.prefix: Prefix = resolve_prefix(tokenizer, prefix_token)
        self.pair_tokenizer = PairTokenizer(tokenizer)
        self.chat = ChatRenderer(tokenizer, self.pair_tokenizer)
        self.max_context = model_context_length(model, tokenizer)
        self._logprobs = LogprobComputer(model, chunk_bytes=limits.chunk_bytes)
        if not self._logprobs.head_is_plain():
            log.info("model logits are not a plain projection; using the full-logits path")
            self._logprobs.use_full_logits()
        self.packing = limits.packing and self._enable_packing()
        self.max_top_k = min(MAX_TOP_K, self._logprobs.vocab_size)
        self.preparation = Preparation(
            self.pair_tokenizer,
            self.chat,
            self.prefix,
            max_context=self.max_context,
            vocab_size=self._logprobs.vocab_size,
            max_top_k=self.max_top_k,
        )
        self._results = ResultBuilder(self.pair_tokenizer, self.prefix.token_id)
        self._token_text_bytes = self._max_token_text_bytes()
        if not self.pair_tokenizer.separate_supported:
            log.warning("SEPARATE tokenization unavailable: %s", self.pair_tokenizer.separate_problem)

    def _enable_packing(self) -> bool:
        if not self._logprobs.split_head:
            log.info("packing off: the model's logits are not a plain projection")
            return False
        reason = enable_packed_attention(self.model)
        if reason is None and not self._logprobs.packing_agrees():
            disable_packed_attention(self.model)
            reason = "packed rows did not reproduce padded batches on a probe"
        if reason is not None:
            log.info("packing off, using padded batches: %s", reason)
            return False
        return True

    # -- facts ---------------------------------------------------------------

    @property
    def max_batch_tokens(self) -> int:
        """Padded-token budget of one forward pass."""
        return self.limits.max_batch_tokens

    @property
    def max_call_tokens(self) -> int:
        """Size of one ``score`` call in positions computed: ``call_batches`` forward passes."""
        return self.limits.max_batch_tokens * self.limits.call_batches

    def call_size(self) -> CallSize:
        """An empty tally of a call's positions, sharing runs as :meth:`_tries` does."""
        limits = self.limits
        return CallSize(
            min_shared=limits.min_shared_tokens if limits.share_prefixes else None,
            share_prompts=limits.share_prompts and self._logprobs.split_head,
        )

    @property
    def device(self) -> torch.device:
        return self._logprobs.device

    @property
    def info(self) -> ModelInfo:
        """What is served and under which contract."""
        dtype = next(self.model.parameters()).dtype
        return ModelInfo(
            model_name=self.description.name,
            model_source=self.description.source,
            revision=self.description.revision,
            dtype=str(dtype).removeprefix("torch."),
            device=str(self.device),
            max_context_tokens=self.max_context,
            vocab_size=self._logprobs.vocab_size,
            prefix_policy=self.prefix.policy,
            prefix_token_id=self.prefix.token_id,
            prefix_token=self.prefix.token,
            tokenizer_class=type(self.tokenizer).__name__,
            server_version=self.description.server_version,
            default_tokenization=TokenizationMode.SEPARATE,
            architecture=type(self.model).__name__,
            max_top_k=self.max_top_k,
            max_token_text_bytes=self._token_text_bytes,
            tokenizer_normalizes=self.pair_tokenizer.normalizes,
            chat_template=self.chat.available,
        )

    def _max_token_text_bytes(self) -> int:
        """A bound of any one token's decoded text in UTF-8 bytes: a vocabulary
        string of c characters stands for at most c bytes (byte-level BPE) or
        one character each, and every byte may decode to U+FFFD (3 bytes)."""
        return 3 * max((len(t) for t in self.tokenizer.get_vocab()), default=1)

    # -- work ----------------------------------------------------------------

    def prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, max_tokens: int | None = None
    ) -> list[PreparedPair | ItemError]:
        """Tokenize pairs: see :meth:`Preparation.prepare <pairscore_server.engine.preparation.Preparation.prepare>`."""
        return self.preparation.prepare(pairs, options, max_tokens=max_tokens)

    def tokenize(self, texts: Sequence[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """Each text's ids (see :meth:`PairTokenizer.tokenize`)."""
        return self.pair_tokenizer.tokenize(texts, parse_special_tokens=parse_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text as a result's per-token detail shows it (no forward pass)."""
        return self.pair_tokenizer.token_texts(self.prefix.token_id, tuple(ids))

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """A conversation as text with the model's chat template (:meth:`ChatRenderer.render_text
        <pairscore_server.engine.chat.ChatRenderer.render_text>`)."""
        return self.chat.render_text(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def chat_template(self) -> str:
        """The chat template's source; NoChatTemplateError without one."""
        return self.chat.source()

    def plan_batches(self, prepared: Sequence[PreparedPair]) -> list[list[int]]:
        """Group pair indices into forward passes under the token budget, longest first."""
        return plan_padded_batches(
            [p.num_tokens for p in prepared],
            max_tokens=self.max_batch_tokens,
            min_efficiency=self.limits.min_batch_efficiency,
        )

    def plan_tries(self, prepared: Sequence[PreparedPair]) -> list[Trie]:
        """The tries (shared runs of token ids, tries.py) of ``prepared``'s p ⊕ x ⊕ y,
        as the padded layout runs them (packed rows also cut at every prompt end)."""
        return self._tries([p.input_ids for p in prepared], [1 + p.prompt_tokens for p in prepared], False)

    def plan_packed_rows(self, prepared: Sequence[PreparedPair]) -> tuple[list[RowItem], list[list[int]]]:
        """The packed layout of ``prepared``: its row items (parts of tries, see
        tries.py: row_items, plan_rows) and the item indices of each row."""
        return self._plan_rows([p.input_ids for p in prepared], [1 + p.prompt_tokens for p in prepared])

    def _tries(
        self, seqs: Sequence[tuple[int, ...]], prompt_lens: Sequence[int], cut_prompts: bool
    ) -> list[Trie]:
        limits = self.limits
        return build_tries(
            seqs,
            prompt_lens,
            share_prompts=limits.share_prompts and self._logprobs.split_head,
            min_shared=limits.min_shared_tokens if limits.share_prefixes else None,
            cut_prompts=cut_prompts,
        )

    def _plan_rows(
        self, seqs: Sequence[tuple[int, ...]], prompt_lens: Sequence[int]
    ) -> tuple[list[RowItem], list[list[int]]]:
        items = [
            item
            for trie in self._tries(seqs, prompt_lens, True)
            for item in row_items(trie, self.max_batch_tokens)
        ]
        return items, plan_rows([item.size for item in items], capacity=self.max_batch_tokens)

    @staticmethod
    def sequences(
        prepared: Sequence[PreparedPair],
    ) -> tuple[list[tuple[int, ...]], list[int], list[int | None]]:
        """What one ``score`` call runs: each pair's p ⊕ x ⊕ y, then the p ⊕ y of the
        pairs that asked for their unconditional score.

        Returns the sequences, their prompt lengths (p ⊕ x; 1 for p ⊕ y, so all
        p ⊕ y rows share the prefix as one prompt in both layouts, and among
        themselves and the pairs without a prompt any run of ``min_shared_tokens``
        ids or more) and, per
        pair, the index of the sequence holding its unconditional log-probs
        (``None``: not asked; ``EMPTY_RESPONSE``: an empty response). Identical
        p ⊕ y are scored once, and a pair with an empty prompt is its own p ⊕ y.
        """
        seqs = [p.input_ids for p in prepared]
        prompt_lens = [1 + p.prompt_tokens for p in prepared]
        known = {p.input_ids: i for i, p in reversed(list(enumerate(prepared))) if p.is_own_alone}
        sources: list[int | None] = []
        for i, p in enumerate(prepared):
            if not p.unconditional:
                sources.append(None)
            elif p.response_tokens == 0:
                sources.append(EMPTY_RESPONSE)
            elif p.is_own_alone:
                sources.append(i)  # exactly its own conditional score: PMI 0, IFD 1
            else:
                alone = p.alone_ids
                if alone not in known:
                    known[alone] = len(seqs)
                    seqs.append(alone)
                    prompt_lens.append(1)
                sources.append(known[alone])
        return seqs, prompt_lens, sources

    def score(self, prepared: Sequence[PreparedPair], *, cancelled: Cancelled | None = None) -> ScoredBatch:
        """Run the forward passes for ``prepared``: scores in the same order, the call's
        token accounting and how long it took.

        The unconditional p ⊕ y rows of the pairs that ask for them run in the
        same forward passes as the pairs (:meth:`sequences`). Ranks and top-k
        are computed for the whole call when any of its pairs asks.
        ``cancelled`` is checked before each packed row or padded batch
        (:class:`ScoreCancelled` when it says stop).
        """
        started = time.perf_counter()
        seqs, prompt_lens, sources = self.sequences(prepared)
        detail = HeadDetail(
            ranks=any(p.greedy for p in prepared), top_k=max((p.top_k for p in prepared), default=0)
        )
        run = self._logprobs_packed if self.packing else self._logprobs_padded
        lps, stats = run(seqs, prompt_lens, detail, cancelled or _never)
        scores = [
            self._results.result(p, lps[i], None if src is None else lps[src] if src >= 0 else lps[i][:0])
            for i, (p, src) in enumerate(zip(prepared, sources, strict=True))
        ]
        return ScoredBatch(scores, stats, (time.perf_counter() - started,))

    def _logprobs_packed(
        self,
        seqs: Sequence[tuple[int, ...]],
        prompt_lens: Sequence[int],
        detail: HeadDetail,
        cancelled: Cancelled,
    ) -> tuple[list[torch.Tensor], ForwardStats]:
        items, rows = self._plan_rows(seqs, prompt_lens)
        lps: list[torch.Tensor | None] = [None] * len(seqs)
        computed = positions = reused = 0
        for members in rows:
            _check(cancelled)
            row = pack_row([items[j] for j in members], device=self.device, align=self.row_align)
            for i, seq_lps in row.split(self._logprobs.packed(row, detail).cpu()):
                lps[i] = seq_lps
            computed += row.tokens - row.filler_tokens
            positions += row.tokens
            reused += row.reused_tokens
        # sequences of the prefix alone score nothing
        none = (
            torch.empty(0, detail.columns, dtype=torch.float64)
            if detail.wanted
            else torch.empty(0, dtype=torch.float32)
        )
        return [none if x is None else x for x in lps], ForwardStats(computed, positions, reused)

    def _logprobs_padded(
        self,
        seqs: Sequence[tuple[int, ...]],
        prompt_lens: Sequence[int],
        detail: HeadDetail,
        cancelled: Cancelled,
    ) -> tuple[list[torch.Tensor], ForwardStats]:
        results: list[torch.Tensor | None] = [None] * len(seqs)
        real = padded = reused = 0
        rest: list[int] = []
        copies: list[tuple[int, ...]] = []
        for trie in self._tries(seqs, prompt_lens, False):
            everyone = sum(m.length * len(m.indices) for m in trie.members)
            if len(trie.members) == 1:  # one distinct sequence: a plain padded row, run once
                [member] = trie.members
                rest.append(member.indices[0])
                copies.append(member.indices)
                reused += everyone - member.length
                continue
            _check(cancelled)
            blocks, positions = self._logprobs.trie(
                trie,
                max_batch_tokens=self.max_batch_tokens,
                min_efficiency=self.limits.min_batch_efficiency,
                detail=detail,
            )
            computed = sum(len(node.tokens) for node in trie.nodes)
            real += computed
            padded += positions
            reused += everyone - computed
            cpu = [b.cpu() for b in blocks]
            for member in trie.members:
                lps = torch.cat([cpu[i] for i in member.path])
                for i in member.indices:
                    results[i] = lps
        for sub in plan_padded_batches(
            [len(seqs[i]) for i in rest],
            max_tokens=self.max_batch_tokens,
            min_efficiency=self.limits.min_batch_efficiency,
        ):
            _check(cancelled)
            indices = [rest[j] for j in sub]
            batch = make_batch([seqs[i] for i in indices], pad_id=self.prefix.token_id, device=self.device)
            real += sum(batch.lengths)
            padded += batch.padded_tokens
            for i, lps in zip(indices, self._logprobs(batch, detail), strict=True):
                results[i] = lps.cpu()
        for same in copies:  # identical sequences: the first one's log-probs
            for i in same[1:]:
                results[i] = results[same[0]]
        return results, ForwardStats(real, padded, reused)  # type: ignore[return-value]

    def score_pairs(self, pairs: Sequence[Pair], options: ScoreOptions | None = None) -> list[ScoreOutcome]:
        """prepare + score in one call, for in-process use (see :func:`interface.score_pairs`)."""
        return score_pairs(self, pairs, options)

    def warmup(self) -> None:
        """One short forward pass, so the first request does not pay for lazy init."""
        self.score_pairs([Pair("Hello", " world")])
