"""Score pairs in-process, without a server: :class:`Scorer`.

The stable way to use pairscore's scoring engine from Python (a notebook, a
Ray or Spark worker, a training loop)::

    from pairscore import Pair
    from pairscore_server import Scorer

    scorer = Scorer()                      # the embedded SmolLM2; or Scorer("/models/m", device="cuda")
    [s] = scorer.score([Pair("The capital of France is", " Paris.")])
    print(s.conditional_logprob)

A Scorer loads the model once, as ``pairscore serve`` does (same
:class:`~pairscore_server.engine.spec.ModelSpec`, same engine), and returns
the same :class:`~pairscore.types.PairScore` and
:class:`~pairscore.types.ItemError` objects as :class:`~pairscore.client.ScoringClient`
with the same options: a server on the same model gives the same numbers.
No gRPC, no batcher, no request limits beyond the model's context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pairscore.inputs import check_candidate_sets, group_by_set, resolve_options, to_pair
from pairscore.types import CandidateSet, CandidateSetResult, ModelInfo, Pair, ScoreOptions, ScoreOutcome
from pairscore_server.engine.interface import Engine, score_pairs
from pairscore_server.engine.spec import ModelSpec

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pairscore.inputs import OptionKeywords, PairLike

__all__ = ["Scorer"]

#: Pairs tokenized at once: bounds the memory of prepared-but-unscored pairs.
PREPARE_CHUNK = 1024


class Scorer:
    """A causal LM loaded in this process, scoring (prompt, response) pairs.

    ``model``: a local transformers directory, a ``.gguf`` file, a Hub id, or
    None for the embedded SmolLM2-135M-Instruct (what ``pairscore serve
    --model`` takes). ``device``: ``auto`` (the first GPU, else CPU), ``cpu``,
    ``cuda``, ``cuda:N``. ``dtype``: ``auto`` (bfloat16 on GPU, float32 on
    CPU), ``float32``, ``bfloat16``, ``float16``, ``float64``.
    ``prefix_token``: the token the first prompt token is conditioned on
    (default: the model's BOS if its tokenizer adds one, else its document
    separator; docs/contract.md). ``cache_dir``: where a GGUF model's
    dequantised copy is kept. ``revision``: of a Hub model.
    ``max_batch_tokens``: tokens per forward pass (default by device and dtype).
    ``packing``: ``auto``, ``on``, ``off`` (packed rows vs padded batches).
    ``host_allocator``: ``retain`` (glibc keeps freed memory for reuse: faster
    CPU passes, the process stays near its peak memory; this process-wide
    setting is applied once) or ``system`` (the C library's defaults).
    Invalid values raise ValueError; a model that cannot be loaded raises
    :class:`~pairscore_server.engine.spec.ModelLoadError` saying why.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prefix_token: str | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
        max_batch_tokens: int | None = None,
        packing: str = "auto",
        host_allocator: str = "retain",
    ) -> None:
        from pairscore_server.engine.loading import load_engine

        spec = ModelSpec(
            model=model,
            device=device,
            dtype=dtype,
            prefix_token=prefix_token,
            cache_dir=cache_dir,
            revision=revision,
            max_batch_tokens=max_batch_tokens,
            packing=packing,
            host_allocator=host_allocator,
        )
        self._engine: Engine = load_engine(spec)
        self.spec = spec

    @classmethod
    def from_engine(cls, engine: Engine) -> Scorer:
        """A Scorer on an engine built elsewhere (e.g. a ``ScoringEngine`` on a model
        object already in memory)."""
        scorer = cls.__new__(cls)
        scorer._engine = engine
        scorer.spec = ModelSpec()
        return scorer

    @property
    def engine(self) -> Engine:
        """The engine underneath (the :class:`~pairscore_server.engine.interface.Engine` protocol)."""
        return self._engine

    @property
    def info(self) -> ModelInfo:
        """The loaded model and its scoring contract, as a server's GetModelInfo reports it
        (without a server's request limits)."""
        return self._engine.info

    def score(
        self,
        pairs: Iterable[PairLike],
        options: ScoreOptions | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[ScoreOutcome]:
        """Score pairs: one :class:`~pairscore.types.PairScore` or
        :class:`~pairscore.types.ItemError` per pair, in order.

        A pair is a :class:`~pairscore.types.Pair` (text, ``prompt_messages``
        or token ids) or a ``(prompt, response)`` tuple. The options are
        those of the ``Score`` RPC (docs/api.md, docs/scores.md): give a
        :class:`~pairscore.types.ScoreOptions` as ``options``, or the same
        fields as keywords (not both; :func:`pairscore.inputs.resolve_options`,
        the clients' one resolver, reads them). Any number of pairs: they are
        tokenized in chunks and run in forward passes of the engine's size.
        """
        resolved = resolve_options(options, **keywords)
        items = [to_pair(p) for p in pairs]
        out: list[ScoreOutcome] = []
        for start in range(0, len(items), PREPARE_CHUNK):
            out += self._score_chunk(items[start : start + PREPARE_CHUNK], resolved)
        return out

    def score_candidates(
        self,
        sets: Iterable[CandidateSet],
        options: ScoreOptions | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[CandidateSetResult]:
        """Score each :class:`~pairscore.types.CandidateSet`'s responses against its prompt:
        one :class:`~pairscore.types.CandidateSetResult` per set, in order, as the
        ``ScoreCandidates`` RPC answers. Options as in :meth:`score`."""
        sets = list(sets)
        check_candidate_sets(sets)
        pairs = [p for s in sets for p in s.pairs()]
        return group_by_set(sets, self.score(pairs, options, **keywords))

    def tokenize(self, texts: Iterable[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """Each text's token ids, as the ``Tokenize`` RPC gives them: by default the ids a
        ``Pair.prompt`` of that text is scored with; ``parse_special_tokens=True``:
        transformers' ``tokenizer(text, add_special_tokens=False)`` (special-token
        strings become special tokens, as in lm-evaluation-harness)."""
        return self._engine.tokenize(list(texts), parse_special_tokens=parse_special_tokens)

    def _score_chunk(self, pairs: Sequence[Pair], options: ScoreOptions) -> list[ScoreOutcome]:
        """prepare -> score -> merge (:func:`score_pairs`), in engine calls of at most
        ``max_call_tokens`` padded tokens, the size a server's batcher builds."""
        return score_pairs(self._engine, pairs, options, max_call_tokens=self._engine.max_call_tokens)
