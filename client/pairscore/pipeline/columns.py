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

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from pairscore.types import CHAT_ROLES, ChatMessage, ItemError, Pair, PairScore, ScoreOutcome

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


#: Values of the input-form options of ``pairscore score|filter`` (--truncation,
#: --end-of-turn, --prefix): name -> (choices, default), as ScoreOptions' enum values.
INPUT_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "truncation": (("none", "left"), "none"),
    "end_of_turn": (("included", "excluded"), "included"),
    "prefix": (("server", "none"), "server"),
}


def input_options(
    truncation: str = "none", end_of_turn: str = "included", prefix: str = "server"
) -> dict[str, str]:
    """The request options (``score_iter`` keywords) for --truncation, --end-of-turn and
    --prefix: only those not at their default (so a plain run sends what it always sent);
    ValueError naming the choices for an unknown value."""
    out = {}
    for name, value in (("truncation", truncation), ("end_of_turn", end_of_turn), ("prefix", prefix)):
        choices, default = INPUT_OPTIONS[name]
        if value not in choices:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        if value != default:
            out[name] = value
    return out


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


#: Error code of a row that could not even be sent (a missing or non-text field).
INVALID_ROW = "invalid_row"


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
    table: dict[str, list[object]] = {name: [] for name in column_names(scores)}
    for outcome in outcomes:
        for name, value in score_columns(outcome, scores).items():
            table[name].append(value)
    return table


# --- the one null rule of every batch entry point ----------------------------------------------
#
# ``pairscore score``/``filter``, :mod:`pairscore.hf` and :mod:`pairscore.ray` all
# read prompts and responses from tables, where a missing value is None (JSON null,
# Arrow null) or NaN (pandas). Such a row is never sent as text ("None", "nan", ""):
# it gets error ``invalid_row`` and nulls, the other rows are scored. The client API
# itself (:meth:`ScoringClient.score` and friends) refuses a Pair whose prompt or
# response is not a str with a TypeError before sending anything.


def text_problem(name: str, value: object) -> str | None:
    """Why ``value`` of column ``name`` cannot be sent as text, or ``None`` when it can."""
    if isinstance(value, str):
        return None
    if value is None or type(value).__name__ == "NAType":  # pandas.NA
        return f"field {name!r} is missing"
    if isinstance(value, float) and math.isnan(value):
        return f"field {name!r} is missing (NaN)"
    return f"field {name!r} is a {type(value).__name__}, not text"


def pair_problem(
    prompt: object, response: object, prompt_field: str = "prompt", response_field: str = "response"
) -> str | None:
    """Why a (prompt, response) row cannot be scored (the first missing field), or ``None``."""
    return text_problem(prompt_field, prompt) or text_problem(response_field, response)


def score_rows(
    score: Callable[[list[Pair]], Iterable[ScoreOutcome]],
    prompts: Iterable[Any],
    responses: Iterable[Any],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    scores: Sequence[str] = (),
) -> dict[str, list[object]]:
    """The score columns of a batch of rows, column-wise, under the null rule above.

    ``score`` gets the pairs of the rows that can be scored (in order) and
    returns one outcome per pair; rows with a missing prompt or response get
    error ``invalid_row`` in their place. ``scores``: the extra score groups
    (SCORE_GROUPS) whose columns to add.
    """
    problems: list[str | None] = []
    pairs: list[Pair] = []
    for prompt, response in zip(prompts, responses, strict=True):
        problem = pair_problem(prompt, response, prompt_field, response_field)
        problems.append(problem)
        if problem is None:
            pairs.append(Pair(prompt=str(prompt), response=str(response)))
    outcomes = iter(score(pairs) if pairs else ())
    table: dict[str, list[object]] = {name: [] for name in column_names(scores)}
    for problem in problems:
        columns = (
            error_columns(INVALID_ROW, problem, scores) if problem else score_columns(next(outcomes), scores)
        )
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


# --- the other input forms: conversations, token ids, candidate lists --------------------------
#
# A row's prompt is text (``prompt_field``), a conversation (``messages_field``: a list of
# {role, content} objects, rendered by the server with the model's chat template) or token
# ids (``prompt_ids_field``: a list of ints); its response is text (``response_field``) or
# ids (``response_ids_field``). With ``responses_field`` a row holds a list of responses
# (candidates) to its one prompt: ``pairscore score`` writes one output row per candidate
# (CANDIDATE_INDEX says which). In CSV/TSV a list is written as JSON text ("[1, 2, 3]").
# A value of the wrong shape gives the row error ``invalid_row`` naming the field and the
# fix; the other rows are scored.

#: Column of an output row made from one candidate of a ``responses`` list: its 0-based index.
CANDIDATE_INDEX = "candidate_index"


@dataclass(frozen=True)
class RowFields:
    """Which columns of a row hold its prompt and its response (exactly one form per side).

    ``messages_field`` / ``prompt_ids_field`` replace ``prompt_field``;
    ``response_ids_field`` / ``responses_field`` replace ``response_field``
    (``None``: not used).
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = None
    messages_field: str | None = None
    prompt_ids_field: str | None = None
    response_ids_field: str | None = None
    responses_field: str | None = None

    def __post_init__(self) -> None:
        if self.messages_field is not None and self.prompt_ids_field is not None:
            raise ValueError("give the prompt as --messages-field or as --prompt-ids-field, not both")
        if self.response_ids_field is not None and self.responses_field is not None:
            raise ValueError("give the response as --response-ids-field or as --responses-field, not both")

    @property
    def prompt_column(self) -> str:
        """The column the prompt is read from."""
        return self.messages_field or self.prompt_ids_field or self.prompt_field

    @property
    def response_column(self) -> str:
        """The column the response (or the list of responses) is read from."""
        return self.responses_field or self.response_ids_field or self.response_field

    def describe(self) -> dict[str, str]:
        """The non-default forms, for a resume fingerprint (empty for text columns)."""
        return {
            name: value
            for name, value in (
                ("messages_field", self.messages_field),
                ("prompt_ids_field", self.prompt_ids_field),
                ("response_ids_field", self.response_ids_field),
                ("responses_field", self.responses_field),
            )
            if value is not None
        }

    def missing_columns(self, row: Mapping[str, object]) -> list[str]:
        """The columns this needs that ``row`` does not have."""
        return [c for c in (self.prompt_column, self.response_column) if c not in row]

    def pairs(self, row: Mapping[str, object]) -> tuple[list[Pair], str | None]:
        """The pairs of one row (one, or one per candidate) or why it cannot be scored."""
        pair_id = "" if self.id_field is None else str(row.get(self.id_field, ""))
        prompt: dict[str, Any]
        if self.messages_field is not None:
            messages, problem = parse_messages(self.messages_field, row.get(self.messages_field))
            prompt = {"prompt_messages": messages}
        elif self.prompt_ids_field is not None:
            ids, problem = parse_ids(self.prompt_ids_field, row.get(self.prompt_ids_field))
            prompt = {"prompt_ids": ids}
        else:
            problem = text_problem(self.prompt_field, row.get(self.prompt_field))
            prompt = {"prompt": row.get(self.prompt_field)}
        if problem is not None:
            return [], problem
        if self.responses_field is not None:
            responses, problem = parse_responses(self.responses_field, row.get(self.responses_field))
            if problem is not None:
                return [], problem
            return [Pair(response=r, id=pair_id, **prompt) for r in responses], None
        if self.response_ids_field is not None:
            ids, problem = parse_ids(self.response_ids_field, row.get(self.response_ids_field))
            return ([], problem) if problem else ([Pair(response_ids=ids, id=pair_id, **prompt)], None)
        response = row.get(self.response_field)
        problem = text_problem(self.response_field, response)
        return ([], problem) if problem else ([Pair(response=response, id=pair_id, **prompt)], None)  # type: ignore[arg-type]


def _as_list(value: object) -> tuple[list[Any] | None, bool]:
    """A list from a JSON/Parquet list, a numpy array (pandas, Ray) or JSON text (CSV);
    the flag says whether the value was JSON text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                return None, True
            return (parsed, True) if isinstance(parsed, list) else (None, True)
        return None, True
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value), False
    return None, False


def _missing(name: str, value: object) -> str | None:
    if value is None or type(value).__name__ == "NAType":
        return f"field {name!r} is missing"
    if isinstance(value, float) and math.isnan(value):
        return f"field {name!r} is missing (NaN)"
    return None


def parse_messages(name: str, value: object) -> tuple[tuple[ChatMessage, ...] | None, str | None]:
    """A conversation from a column value (a list of {role, content}), or why it is not one."""
    missing = _missing(name, value)
    if missing:
        return None, missing
    items, _ = _as_list(value)
    if items is None:
        return None, (
            f"field {name!r} is a {type(value).__name__}, not a list of messages; write it as a list of "
            '{"role": ..., "content": ...} objects (in CSV/TSV as JSON text)'
        )
    if not items:
        return None, f"field {name!r} is an empty conversation; give at least one message"
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("role"), str):
            return None, f'field {name!r} message {i} is not an object with a "role" and a "content"'
        role, content = item["role"], item.get("content")
        if role not in CHAT_ROLES:
            return None, f"field {name!r} message {i} has role {role!r}; roles are {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str):
            return None, f"field {name!r} message {i} ({role}) has no text content"
        messages.append(ChatMessage(role=role, content=content))
    return tuple(messages), None


def parse_ids(name: str, value: object) -> tuple[tuple[int, ...] | None, str | None]:
    """Token ids from a column value (a list of ints), or why it is not one. Whether each id
    is in the vocabulary is the server's to say (an item error naming the id)."""
    missing = _missing(name, value)
    if missing:
        return None, missing
    items, _ = _as_list(value)
    if items is None:
        return None, (
            f"field {name!r} is a {type(value).__name__}, not a list of token ids; "
            "write it as a list of integers (in CSV/TSV as JSON text, [1, 2, 3])"
        )
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int):
            if isinstance(item, float) and item.is_integer():
                continue
            return None, f"field {name!r} item {i} is {item!r}, not a token id (a whole number)"
    return tuple(int(i) for i in items), None


def parse_responses(name: str, value: object) -> tuple[list[str], str | None]:
    """The candidate responses of a row (a non-empty list of texts), or why it is not one."""
    missing = _missing(name, value)
    if missing:
        return [], missing
    items, _ = _as_list(value)
    if items is None:
        return [], (
            f"field {name!r} is a {type(value).__name__}, not a list of responses; "
            "write it as a list of texts (in CSV/TSV as JSON text)"
        )
    if not items:
        return [], f"field {name!r} is an empty list: there is no response to score"
    for i, item in enumerate(items):
        if not isinstance(item, str):
            return [], f"field {name!r} item {i} is a {type(item).__name__}, not text"
    return items, None


def score_batch(
    score: Callable[[list[Pair]], Iterable[ScoreOutcome]],
    batch: Mapping[str, Sequence[Any]],
    fields: RowFields,
    *,
    scores: Sequence[str] = (),
) -> dict[str, list[object]]:
    """The score columns of a batch of rows (column lists), one row each, for any input form
    but candidate lists (what ``Dataset.map`` and Ray's ``map_batches`` want). Rows that
    cannot be sent get ``invalid_row`` naming the field; the others are scored."""
    if fields.responses_field is not None:
        raise ValueError(
            "a responses list gives several output rows per input row; score it with `pairscore score "
            "--responses-field` or ScoringClient.score_candidates"
        )
    names = list(batch)
    length = len(batch[names[0]]) if names else 0
    problems: list[str | None] = []
    pairs: list[Pair] = []
    for i in range(length):
        row_pairs, problem = fields.pairs({name: batch[name][i] for name in names})
        problems.append(problem)
        pairs += row_pairs
    outcomes = iter(score(pairs) if pairs else ())
    table: dict[str, list[object]] = {name: [] for name in column_names(scores)}
    for problem in problems:
        columns = (
            error_columns(INVALID_ROW, problem, scores) if problem else score_columns(next(outcomes), scores)
        )
        for name, value in columns.items():
            table[name].append(value)
    return table
