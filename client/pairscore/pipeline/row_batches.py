"""A batch of table rows in, its score columns out: what :mod:`pairscore.hf` and
:mod:`pairscore.ray` map over a dataset.

:func:`score_batch` gives the score columns of one batch of rows (column lists, any
input form but candidate lists), :func:`score_rows` the same for two columns
of text. A row that cannot be sent gets error ``invalid_row`` naming the
field (:class:`~pairscore.inputs.RowFields`); the others are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pairscore.inputs import INVALID_ROW, RowFields
from pairscore.pipeline.columns import column_wise, error_columns, score_columns
from pairscore.types import Pair, ScoreOutcome


def score_batch(
    score: Callable[[list[Pair]], Iterable[ScoreOutcome]],
    batch: Mapping[str, Sequence[Any]],
    fields: RowFields,
    *,
    scores: Sequence[str] = (),
) -> dict[str, list[object]]:
    """The score columns of a batch of rows (column lists), one row each, for any input form
    but candidate lists (what ``Dataset.map`` and Ray's ``map_batches`` want).

    ``score`` gets the pairs of the rows that can be scored (in order) and
    returns one outcome per pair; a row that cannot be sent (a missing or
    malformed field, :class:`~pairscore.inputs.RowFields`) gets error
    ``invalid_row`` naming the field, the others are scored. ``scores``: the
    extra score groups (SCORE_GROUPS) whose columns to add.
    """
    if fields.responses_field is not None:
        raise ValueError(
            "a responses list gives several output rows per input row; score it with `pairscore score "
            "--responses-field` or ScoringClient.score_candidates"
        )
    pairs, problems = fields.batch_pairs(batch)
    outcomes = iter(score(pairs) if pairs else ())
    rows = [
        error_columns(INVALID_ROW, problem, scores) if problem else score_columns(next(outcomes), scores)
        for problem in problems
    ]
    return column_wise(rows, scores)


def score_rows(
    score: Callable[[list[Pair]], Iterable[ScoreOutcome]],
    prompts: Iterable[Any],
    responses: Iterable[Any],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    scores: Sequence[str] = (),
) -> dict[str, list[object]]:
    """:func:`score_batch` of text prompts and responses given as two columns."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    fields = RowFields(prompt_field=prompt_field, response_field=response_field)
    return score_batch(score, {prompt_field: prompts, response_field: responses}, fields, scores=scores)
