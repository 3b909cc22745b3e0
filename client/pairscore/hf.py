"""Score columns for a Hugging Face ``datasets.Dataset``, through ``map(batched=True)``.

::

    from datasets import load_dataset
    from pairscore.hf import add_scores

    ds = load_dataset("json", data_files="pairs.jsonl", split="train")
    ds = add_scores(ds, "localhost:50051", prompt_field="instruction", response_field="output")
    ds = ds.filter(lambda row: row["mean_conditional_logprob"] is not None
                   and row["mean_conditional_logprob"] > -2.5)

The columns added are those of ``pairscore score`` (see
:mod:`pairscore.pipeline.columns`); a pair that fails gets nulls and an
``error`` code instead of raising, and so does a row whose prompt or
response is missing (None, or NaN from pandas): error ``invalid_row``, the
same rule as ``pairscore score``. :class:`ScoreColumns` is picklable (it
opens its gRPC channel lazily, in whichever process runs it), so
``num_proc`` works. The datasets cache fingerprints it by target, options
*and the served model* (name, source, revision, dtype, prefix token,
tokenizer, context length, default tokenization; fetched with GetModelInfo
when it is first hashed or pickled), so a second ``add_scores`` after the
server's model changed scores again instead of returning the cached
columns. Pass ``features=score_features(ds.features)`` to ``map`` when using
it directly (:func:`add_scores` does). Importing this module needs only the
base install; ``pip install 'pairscore[datasets]'`` brings datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pairscore.inputs import RowFields, input_options
from pairscore.pipeline.columns import (
    SCORE_COLUMN_TYPES,
    SELECTION_COLUMN_TYPES,
    column_names,
    normalize_scores,
    request_options,
)
from pairscore.pipeline.row_batches import score_batch
from pairscore.types import Pair


class ScoreColumns:
    """A batched ``map`` function: ``{prompt: [...], response: [...]} -> {score columns}``.

    ``target`` and ``client_options`` (e.g. ``timeout``, ``token``, ``tls``)
    build a :class:`~pairscore.client.ScoringClient` on first use; each
    call streams its batch through ``score_iter`` in messages of
    ``message_size`` pairs over ``streams`` streams. ``model_identity`` is
    the served model's description that the datasets cache fingerprint
    covers; it is fetched on first hashing/pickling, or by
    :meth:`refresh_model_identity`. ``scores``: extra score groups
    (``"unconditional"``, ``"greedy"``; docs/scores.md) whose columns to add.
    ``messages_field`` (a column of conversations, lists of {role, content}, as
    the prompt), ``prompt_ids_field`` / ``response_ids_field`` (token ids) and
    ``truncation``, ``end_of_turn``, ``prefix``: as in ``pairscore score``
    (docs/pipeline.md, "Input forms"); a malformed value gives its row
    ``invalid_row``.
    """

    def __init__(
        self,
        target: str,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        tokenization: str = "separate",
        message_size: int = 32,
        streams: int = 1,
        scores: str | Sequence[str] = (),
        messages_field: str | None = None,
        prompt_ids_field: str | None = None,
        response_ids_field: str | None = None,
        truncation: str = "none",
        end_of_turn: str = "included",
        prefix: str = "server",
        **client_options: Any,
    ) -> None:
        self.target = target
        self.fields = RowFields(
            prompt_field=prompt_field,
            response_field=response_field,
            messages_field=messages_field,
            prompt_ids_field=prompt_ids_field,
            response_ids_field=response_ids_field,
        )
        self.input_options = input_options(truncation, end_of_turn, prefix)
        self.scores = normalize_scores(scores)
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.tokenization = tokenization
        self.message_size = message_size
        self.streams = streams
        self.client_options = client_options
        self.model_identity: dict[str, object] | None = None
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # datasets hashes (dill-pickles) the map function for its cache fingerprint:
        # the served model must be part of it, or a changed model returns stale scores.
        if self.model_identity is None:
            self.refresh_model_identity()
        state = dict(self.__dict__)
        state["_client"] = None  # a gRPC channel neither pickles nor survives a fork
        return state

    def refresh_model_identity(self) -> dict[str, object]:
        """Ask the server (GetModelInfo) what it serves now; kept in ``model_identity``."""
        info = self._get_client().model_info(wait_for_ready=False)  # a wrong target fails fast
        self.model_identity = {
            "model_name": info.model_name,
            "model_source": info.model_source,
            "revision": info.revision,
            "dtype": info.dtype,
            "architecture": info.architecture,
            "tokenizer_class": info.tokenizer_class,
            "prefix_policy": info.prefix_policy.value,
            "prefix_token_id": info.prefix_token_id,
            "prefix_token": info.prefix_token,
            "max_context_tokens": info.max_context_tokens,
            "default_tokenization": info.default_tokenization.value,
        }
        return self.model_identity

    def _get_client(self) -> Any:
        if self._client is None:
            from pairscore.client import ScoringClient

            self._client = ScoringClient(self.target, wait_for_ready=True, **self.client_options)
        return self._client

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[object]]:
        """Score one batch of rows (column lists) and return the score columns.

        A row with a missing prompt or response (None, NaN) gets error
        ``invalid_row`` and nulls; the other rows are scored.
        """
        client = self._get_client()

        options = request_options(self.scores, self.tokenization, **self.input_options)

        def score(pairs: list[Pair]) -> Any:
            return client.score_iter(
                pairs, batch_size=self.message_size, streams=self.streams, options=options
            )

        return score_batch(score, batch, self.fields, scores=self.scores)

    def close(self) -> None:
        """Close the client's channel (a later call opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None


def score_features(features: Any = None, scores: str | Sequence[str] = ()) -> Any:
    """``datasets.Features``: ``features`` (a Dataset's) plus the typed score columns
    (with those of the extra score groups ``scores``).

    Pass it as ``features=`` to ``map`` so that a column that is all null in
    the first batch (``error`` when nothing failed yet) keeps its real type.
    """
    from datasets import Features, Value

    out = Features(dict(features or {}))
    types = {**SCORE_COLUMN_TYPES, **SELECTION_COLUMN_TYPES}
    for name in column_names(normalize_scores(scores)):
        out[name] = Value(types[name])
    return out


def add_scores(
    dataset: Any,
    target: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    batch_size: int = 256,
    tokenization: str = "separate",
    scores: str | Sequence[str] = (),
    client_options: dict[str, Any] | None = None,
    messages_field: str | None = None,
    prompt_ids_field: str | None = None,
    response_ids_field: str | None = None,
    truncation: str = "none",
    end_of_turn: str = "included",
    prefix: str = "server",
    **map_kwargs: Any,
) -> Any:
    """``dataset`` with the score columns added, via ``dataset.map(..., batched=True)``.

    ``batch_size`` is the map batch size (rows handed to one call);
    ``map_kwargs`` go to ``Dataset.map`` (e.g. ``num_proc``,
    ``load_from_cache_file``, ``desc``). The served model is asked for
    first (GetModelInfo): its identity is part of the cache fingerprint.
    ``scores``: extra score groups, e.g. ``"unconditional,greedy"``.
    ``messages_field``: a column of conversations (lists of {role, content})
    as the prompt, rendered with the model's chat template (the response
    column is then the assistant's reply); ``prompt_ids_field`` /
    ``response_ids_field``: columns of token ids instead of text;
    ``truncation`` (``"left"``), ``end_of_turn`` (``"excluded"``) and
    ``prefix`` (``"none"``) as in ``pairscore score`` (docs/pipeline.md).
    """
    scorer = ScoreColumns(
        target,
        prompt_field=prompt_field,
        response_field=response_field,
        tokenization=tokenization,
        scores=scores,
        messages_field=messages_field,
        prompt_ids_field=prompt_ids_field,
        response_ids_field=response_ids_field,
        truncation=truncation,
        end_of_turn=end_of_turn,
        prefix=prefix,
        **(client_options or {}),
    )
    map_kwargs.setdefault("features", score_features(dataset.features, scores))
    scorer.refresh_model_identity()  # part of the cache fingerprint: a changed model scores again
    try:
        return dataset.map(scorer, batched=True, batch_size=batch_size, **map_kwargs)
    finally:
        scorer.close()
