"""The score columns the pipeline adds to each row, and the metrics one can filter on.

Added columns (after all input columns; an input column of the same name is
overwritten):

============================  ==================================================
``joint_logprob``             log P(x ⊕ y), nats
``prompt_logprob``            log P(x)
``conditional_logprob``       log P(y | x), the sum over the response's tokens
``prompt_tokens``             m
``response_tokens``           n
``mean_conditional_logprob``  log P(y | x) / n (null when n = 0)
``perplexity``                exp(-mean_conditional_logprob) (null when n = 0)
``error``                     null, or the error code of a row that failed
``error_message``             null, or why it failed
============================  ==================================================

Asked for with ``--scores`` (docs/scores.md), before ``error``:

============================  ==================================================
``unconditional_logprob``     ``unconditional``: log P(y), the response alone
``pmi``                       ``unconditional``: conditional - unconditional
``ifd``                       ``unconditional``: conditional / unconditional
                              (null when the response is empty or certain)
``response_is_greedy``        ``greedy``: every response token is the argmax
============================  ==================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from pairscore.inputs import input_options, resolve_options
from pairscore.types import ItemError, PairScore, ScoreOptions, ScoreOutcome

SCORE_COLUMNS = (
    "joint_logprob",
    "prompt_logprob",
    "conditional_logprob",
    "prompt_tokens",
    "response_tokens",
    "mean_conditional_logprob",
    "perplexity",
    "error",
    "error_message",
)

#: Columns of the Parquet schema for the score columns: name -> Arrow type name.
SCORE_COLUMN_TYPES = {
    "joint_logprob": "float64",
    "prompt_logprob": "float64",
    "conditional_logprob": "float64",
    "prompt_tokens": "int64",
    "response_tokens": "int64",
    "mean_conditional_logprob": "float64",
    "perplexity": "float64",
    "error": "string",
    "error_message": "string",
}

#: Score groups of ``--scores``: name -> the columns it adds (``conditional`` is always on).
SCORE_GROUPS: dict[str, tuple[str, ...]] = {
    "conditional": (),
    "unconditional": ("unconditional_logprob", "pmi", "ifd"),
    "greedy": ("response_is_greedy",),
}

#: Types of the columns of the score groups (Parquet schema).
SELECTION_COLUMN_TYPES = {
    "unconditional_logprob": "float64",
    "pmi": "float64",
    "ifd": "float64",
    "response_is_greedy": "bool",
}

#: Every score column a run may write: name -> Arrow type name.
ALL_COLUMN_TYPES = {**SCORE_COLUMN_TYPES, **SELECTION_COLUMN_TYPES}


def parse_scores(text: str) -> tuple[str, ...]:
    """``"conditional,unconditional,greedy"`` -> the extra groups, in a fixed order
    (``conditional`` is implied); ValueError naming the choices for an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORE_GROUPS]
    if unknown:
        raise ValueError(f"unknown score {unknown[0]!r} in --scores; choose from {', '.join(SCORE_GROUPS)}")
    return tuple(g for g in SCORE_GROUPS if g in names and g != "conditional")


def normalize_scores(scores: str | Sequence[str]) -> tuple[str, ...]:
    """The extra score groups of an API argument: ``"unconditional,greedy"`` or a sequence."""
    return parse_scores(scores if isinstance(scores, str) else ",".join(scores))


class ScoreGroupOptions(TypedDict):
    """Keyword arguments of ``score_iter`` / ``ScoreOptions`` that score groups turn on."""

    unconditional: bool
    greedy: bool


def score_options(scores: Sequence[str]) -> ScoreGroupOptions:
    """The request options (``unconditional``, ``greedy``) that the score groups ``scores`` need."""
    return {"unconditional": "unconditional" in scores, "greedy": "greedy" in scores}


def request_options(
    scores: Sequence[str],
    tokenization: str = "separate",
    truncation: str = "none",
    end_of_turn: str = "included",
    prefix: str = "server",
) -> ScoreOptions:
    """The request options of a run (``pairscore score|filter``) or a table helper
    (:mod:`pairscore.hf`, :mod:`pairscore.ray`): those the score groups ``scores`` need, the
    tokenization and the input-form options; ValueError naming the choices for an unknown value."""
    return resolve_options(
        None,
        tokenization=tokenization,
        **score_options(scores),
        **input_options(truncation, end_of_turn, prefix),
    )


def group_of(column: str) -> str:
    """The score group that writes ``column`` (``conditional`` for the default columns)."""
    for group, columns in SCORE_GROUPS.items():
        if column in columns:
            return group
    return "conditional"


def column_names(scores: Sequence[str] = ()) -> tuple[str, ...]:
    """The added columns of a run with the extra score groups ``scores``."""
    extra = tuple(c for g in SCORE_GROUPS if g in scores for c in SCORE_GROUPS[g])
    return (*SCORE_COLUMNS[:-2], *extra, *SCORE_COLUMNS[-2:])


@dataclass(frozen=True)
class Metric:
    """A score one can filter and rank on: its column and which way is better."""

    column: str
    higher_is_better: bool
    description: str


METRICS = {
    m.column: m
    for m in (
        Metric("conditional_logprob", True, "log P(response | prompt), summed over response tokens"),
        Metric("mean_conditional_logprob", True, "log P(response | prompt) per response token"),
        Metric("perplexity", False, "exp(-mean conditional log-prob); lower is better"),
        Metric("prompt_logprob", True, "log P(prompt)"),
        Metric("joint_logprob", True, "log P(prompt + response)"),
        Metric("unconditional_logprob", True, "log P(response) without the prompt (--scores unconditional)"),
        Metric("pmi", True, "conditional - unconditional log-prob, nats (--scores unconditional)"),
        Metric(
            "ifd",
            True,
            "Instruction-Following Difficulty, conditional / unconditional mean NLL; typical selection: "
            "--max ifd=1 --top-fraction Q --by ifd (--scores unconditional)",
        ),
        Metric("response_is_greedy", True, "1 when every response token is the argmax (--scores greedy)"),
    )
}

_ALIASES = {
    "conditional": "conditional_logprob",
    "cond": "conditional_logprob",
    "mean_conditional": "mean_conditional_logprob",
    "mean": "mean_conditional_logprob",
    "ppl": "perplexity",
    "prompt": "prompt_logprob",
    "joint": "joint_logprob",
    "unconditional": "unconditional_logprob",
    "greedy": "response_is_greedy",
}


def metric(name: str) -> Metric:
    """Look a metric up by column name or short alias (``mean``, ``ppl``, ``joint``...)."""
    key = _ALIASES.get(name, name)
    try:
        return METRICS[key]
    except KeyError:
        known = ", ".join([*METRICS, *_ALIASES])
        raise ValueError(f"unknown metric {name!r}; choose one of {known}") from None


def score_columns(outcome: ScoreOutcome, scores: Sequence[str] = ()) -> dict[str, object]:
    """The added columns for one outcome (all of ``column_names(scores)``, nulls where unknown)."""
    if isinstance(outcome, ItemError):
        return error_columns(outcome.code.value, outcome.message, scores)
    assert isinstance(outcome, PairScore)
    mean = outcome.mean_conditional_logprob
    finite = not math.isnan(mean)
    extra: dict[str, object] = {}
    if "unconditional" in scores:
        ifd = outcome.ifd
        extra["unconditional_logprob"] = outcome.unconditional_logprob
        extra["pmi"] = outcome.pmi
        no_prompt = outcome.prompt_tokens == 0  # no instruction: IFD is 1 by arithmetic, not a selection
        extra["ifd"] = None if ifd is None or math.isnan(ifd) or no_prompt else ifd
    if "greedy" in scores:
        extra["response_is_greedy"] = outcome.response_is_greedy
    return {
        "joint_logprob": outcome.joint_logprob,
        "prompt_logprob": outcome.prompt_logprob,
        "conditional_logprob": outcome.conditional_logprob,
        "prompt_tokens": outcome.prompt_tokens,
        "response_tokens": outcome.response_tokens,
        "mean_conditional_logprob": mean if finite else None,
        "perplexity": _perplexity(mean) if finite else None,
        **extra,
        "error": None,
        "error_message": None,
    }


def score_table(outcomes: Sequence[ScoreOutcome], scores: Sequence[str] = ()) -> dict[str, list[object]]:
    """The added columns for many outcomes, column-wise (what ``Dataset.map(batched=True)`` and
    Ray's ``map_batches`` want)."""
    return column_wise([score_columns(outcome, scores) for outcome in outcomes], scores)


def column_wise(rows: Sequence[dict[str, object]], scores: Sequence[str] = ()) -> dict[str, list[object]]:
    """The added columns of many rows (each a :func:`score_columns` or :func:`error_columns`
    dict) as one list per column."""
    table: dict[str, list[object]] = {name: [] for name in column_names(scores)}
    for columns in rows:
        for name, value in columns.items():
            table[name].append(value)
    return table


def _perplexity(mean: float) -> float | None:
    try:
        return math.exp(-mean)
    except OverflowError:
        return math.inf


def error_columns(code: str, message: str, scores: Sequence[str] = ()) -> dict[str, object]:
    """The added columns of a row that failed."""
    columns: dict[str, object] = dict.fromkeys(column_names(scores))
    columns["error"] = code
    columns["error_message"] = message
    return columns


def value_of(row: dict[str, object], column: str) -> float:
    """A metric's value in a scored row as float (NaN when null, empty or unreadable)."""
    value = row.get(column)
    if value is None or value == "":
        return math.nan
    if isinstance(value, str) and value.lower() in ("true", "false"):  # a bool column read from CSV
        return float(value.lower() == "true")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
