"""What may be scored, and how: pairs, options, candidate sets and table rows, checked.

The input side of every entry point, importing only :mod:`pairscore.types` (no
grpc, no torch): both clients, the ``pairscore`` CLI, :mod:`pairscore.hf`,
:mod:`pairscore.ray` and the server's in-process ``pairscore_server.Scorer``.

* :func:`to_pair`, :func:`candidate_set`: a pair or a candidate set, TypeError for anything else;
* :func:`resolve_options`: one :class:`~pairscore.types.ScoreOptions` from ``options=`` or the
  keyword sugar of every scoring method (:class:`OptionKeywords`), checked once;
* :class:`RowFields`: which columns of a table row hold its prompt and response, and why a row
  cannot be scored (it then gets error :data:`INVALID_ROW`, the others are scored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict, Union

from pairscore.types import (
    CHAT_ROLES,
    Candidate,
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    EndOfTurn,
    Pair,
    PrefixMode,
    ScoreOptions,
    TokenizationMode,
    Truncation,
)

__all__ = [
    "CANDIDATE_INDEX",
    "INPUT_OPTIONS",
    "INVALID_ROW",
    "OptionKeywords",
    "PairLike",
    "PromptLike",
    "ResponseLike",
    "RowFields",
    "candidate_set",
    "check_candidate_sets",
    "group_by_set",
    "input_options",
    "pair_problem",
    "parse_ids",
    "parse_messages",
    "parse_responses",
    "resolve_options",
    "text_problem",
    "to_pair",
]

#: A pair as the client accepts it: a Pair, or a (prompt, response) tuple.
PairLike = Union[Pair, tuple[str, str]]  # noqa: UP007 - a runtime alias on Python 3.10+
#: A prompt as score_responses accepts it: text, a conversation, or token ids.
PromptLike = Union[str, Sequence[ChatMessage], Sequence[int]]  # noqa: UP007
#: A response as score_responses accepts it: text, a Candidate, or token ids.
ResponseLike = Union[str, Candidate, Sequence[int]]  # noqa: UP007


# --- options ----------------------------------------------------------------------------------


class OptionKeywords(TypedDict, total=False):
    """The keyword form of :class:`~pairscore.types.ScoreOptions` that every scoring method
    takes (``**keywords``); the enums may be given by value (``tokenization="joint"``,
    ``truncation="left"``, ``prefix="none"``, ``end_of_turn="excluded"``)."""

    tokenization: TokenizationMode | str
    return_tokens: bool
    unconditional: bool
    greedy: bool
    top_k: int
    end_of_turn: EndOfTurn | str
    truncation: Truncation | str
    prefix: PrefixMode | str


_OPTION_NAMES = tuple(f.name for f in fields(ScoreOptions))
_OPTION_SET = frozenset(_OPTION_NAMES)
_DEFAULTS = ScoreOptions()
#: The options that may be given by value: name -> the enum that reads it.
_ENUMS = {
    "tokenization": TokenizationMode,
    "end_of_turn": EndOfTurn,
    "truncation": Truncation,
    "prefix": PrefixMode,
}


def resolve_options(options: ScoreOptions | None = None, /, **keywords: Any) -> ScoreOptions:
    """The options of one scoring call: ``options``, or ScoreOptions built from the keywords.

    The one place the client checks its options: an unknown keyword raises
    TypeError, an unknown enum value or a ``top_k`` that is not a whole
    number >= 0 raises ValueError (one above the server's ``max_top_k`` is
    the server's to refuse: INVALID_ARGUMENT naming the limit), and
    ``options`` together with a keyword that is not at its default raises
    ValueError naming the keyword (give one form or the other).
    """
    if not keywords and options is None:
        return _DEFAULTS  # frozen: one shared instance
    if not keywords.keys() <= _OPTION_SET:
        unknown = [k for k in keywords if k not in _OPTION_NAMES]
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(_OPTION_NAMES)}")
    if options is not None:
        if not isinstance(options, ScoreOptions):
            raise TypeError(f"options must be a pairscore.ScoreOptions, got {type(options).__name__}")
        built = _build(keywords)
        changed = [k for k in keywords if getattr(built, k) != getattr(_DEFAULTS, k)]
        if changed:
            raise ValueError(
                "give the options either as options=ScoreOptions(...) or as keywords, not both "
                f"(got options and {', '.join(f'{k}={keywords[k]!r}' for k in changed)})"
            )
        _check_top_k(options.top_k)
        return options
    return _build(keywords)


def _build(keywords: Mapping[str, Any]) -> ScoreOptions:
    values: dict[str, Any] = {k: _ENUMS[k](v) if k in _ENUMS else v for k, v in keywords.items()}
    _check_top_k(values.get("top_k", 0))
    return ScoreOptions(**values)


def _check_top_k(top_k: object) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0, got {top_k!r}")


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


# --- pairs and candidate sets -----------------------------------------------------------------


def to_pair(item: PairLike) -> Pair:
    """Accept a Pair or a (prompt, response) tuple of str; TypeError for anything else.

    A missing prompt or response (``None``, or NaN from pandas) is refused
    here, before anything is sent: it used to go out as an empty text (a
    Pair) and be scored. The batch helpers (``pairscore score``,
    :mod:`pairscore.hf`, :mod:`pairscore.ray`) instead give such a row error
    ``invalid_row`` (:class:`RowFields`).
    """
    if isinstance(item, Pair):
        prompt, response = item.prompt, item.response
    else:
        try:
            prompt, response = item
        except (TypeError, ValueError):
            raise TypeError(
                f"a pair must be a pairscore.Pair or a (prompt, response) tuple, got {item!r}"
            ) from None
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise TypeError(
            f"prompt and response must be str, got {type(prompt).__name__} and {type(response).__name__} "
            f"({pair_problem(prompt, response)}); a missing text cannot be scored: leave the pair out, "
            "or score a table with pairscore.hf / pairscore.ray / `pairscore score`, which mark it invalid_row"
        )
    return item if isinstance(item, Pair) else Pair(prompt=prompt, response=response)


def _ids(value: Sequence[object], what: str) -> tuple[int, ...]:
    ids = tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{what} given as a sequence must hold token ids (int) only, got {value!r}")
    return ids  # type: ignore[return-value]


def candidate_set(prompt: PromptLike, responses: Iterable[ResponseLike], *, id: str = "") -> CandidateSet:
    """A CandidateSet from a prompt (text, a sequence of ChatMessage, or token ids) and
    responses (text, Candidate, or token ids); TypeError for anything else."""
    candidates: list[Candidate] = []
    for r in responses:
        if isinstance(r, Candidate):
            candidates.append(r)
        elif isinstance(r, str):
            candidates.append(Candidate(response=r))
        elif isinstance(r, Sequence):
            candidates.append(Candidate(response_ids=_ids(r, "a response")))
        else:
            raise TypeError(f"a response must be str, a pairscore.Candidate or token ids, got {r!r}")
    if isinstance(prompt, str):
        return CandidateSet(candidates=tuple(candidates), prompt=prompt, id=id)
    if isinstance(prompt, Sequence):
        items = tuple(prompt)
        if items and all(isinstance(m, ChatMessage) for m in items):
            return CandidateSet(candidates=tuple(candidates), prompt_messages=items, id=id)  # type: ignore[arg-type]
        return CandidateSet(candidates=tuple(candidates), prompt_ids=_ids(items, "a prompt"), id=id)
    raise TypeError(
        f"a prompt must be str, a sequence of pairscore.ChatMessage or token ids, got {type(prompt).__name__}"
    )


def check_candidate_sets(sets: Sequence[object]) -> None:
    """TypeError for anything in ``sets`` that is not a CandidateSet."""
    for s in sets:
        if not isinstance(s, CandidateSet):
            raise TypeError(
                f"a candidate set must be a pairscore.CandidateSet, got {type(s).__name__} "
                "(pairscore.inputs.candidate_set(prompt, responses) builds one, as the clients' "
                "score_responses does)"
            )


def group_by_set(sets: Sequence[CandidateSet], outcomes: Iterable[Any]) -> list[CandidateSetResult]:
    """The flat outcomes of every set's ``pairs()``, end to end, back into one
    :class:`~pairscore.types.CandidateSetResult` per set, in order (what ``ScoreCandidates``
    answers; the server's service and the in-process Scorer both score sets this way)."""
    flat = iter(outcomes)
    return [CandidateSetResult(results=tuple(next(flat) for _ in s.candidates), id=s.id) for s in sets]


# --- table rows: the one null rule of every batch entry point ---------------------------------
#
# ``pairscore score``/``filter``, :mod:`pairscore.hf` and :mod:`pairscore.ray` read rows from
# tables, where a missing value is None (JSON or Arrow null) or NaN (pandas). Such a row is never
# sent as text ("None", "nan", ""): it gets error ``invalid_row`` naming the field and the fix,
# the other rows are scored (the client API instead refuses it with a TypeError: to_pair). A
# row's prompt is text (``prompt_field``), a conversation (``messages_field``: a list of {role,
# content}) or token ids (``prompt_ids_field``); its response is text, ids
# (``response_ids_field``) or, with ``responses_field``, a list of candidate texts (``pairscore
# score`` writes one output row per candidate, CANDIDATE_INDEX says which). In CSV/TSV a list is
# JSON text ("[1, 2, 3]").

#: Error code of a row that could not even be sent (a missing or non-text field).
INVALID_ROW = "invalid_row"

#: Column of an output row made from one candidate of a ``responses`` list: its 0-based index.
CANDIDATE_INDEX = "candidate_index"


def _missing(name: str, value: object) -> str | None:
    if value is None or type(value).__name__ == "NAType":  # pandas.NA
        return f"field {name!r} is missing"
    if isinstance(value, float) and math.isnan(value):
        return f"field {name!r} is missing (NaN)"
    return None


def text_problem(name: str, value: object) -> str | None:
    """Why ``value`` of column ``name`` cannot be sent as text, or ``None`` when it can."""
    if isinstance(value, str):
        return None
    return _missing(name, value) or f"field {name!r} is a {type(value).__name__}, not text"


def pair_problem(
    prompt: object, response: object, prompt_field: str = "prompt", response_field: str = "response"
) -> str | None:
    """Why a (prompt, response) row cannot be scored (the first missing field), or ``None``."""
    return text_problem(prompt_field, prompt) or text_problem(response_field, response)


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

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a row is read from (the prompt's, the response's, the id's)."""
        return (
            self.prompt_column,
            self.response_column,
            *(() if self.id_field is None else (self.id_field,)),
        )

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
            text = row.get(self.prompt_field)
            problem = text_problem(self.prompt_field, text)
            prompt = {"prompt": str(text)}  # numpy.str_ (pandas, Ray) as a plain str
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
        return ([], problem) if problem else ([Pair(response=str(response), id=pair_id, **prompt)], None)

    def batch_pairs(self, batch: Mapping[str, Sequence[Any]]) -> tuple[list[Pair], list[str | None]]:
        """The pairs of a batch of rows given as column lists, and each row's problem
        (``None`` for a row whose pairs are in the list, in row order)."""
        columns = {name: batch[name] for name in self.columns if name in batch}
        length = len(next(iter(batch.values()))) if batch else 0
        pairs: list[Pair] = []
        problems: list[str | None] = []
        for i in range(length):
            row_pairs, problem = self.pairs({name: values[i] for name, values in columns.items()})
            problems.append(problem)
            pairs += row_pairs
        return pairs, problems


def _as_list(value: object) -> list[Any] | None:
    """A list from a JSON/Parquet list, a numpy array (pandas, Ray) or JSON text (CSV)."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def _list_field(name: str, value: object, what: str, how: str) -> tuple[list[Any] | None, str | None]:
    """The list a column value holds, or why there is none (missing, or not a list)."""
    missing = _missing(name, value)
    if missing:
        return None, missing
    items = _as_list(value)
    if items is None:
        return None, f"field {name!r} is a {type(value).__name__}, not a list of {what}; write it as {how}"
    return items, None


def parse_messages(name: str, value: object) -> tuple[tuple[ChatMessage, ...] | None, str | None]:
    """A conversation from a column value (a list of {role, content}), or why it is not one."""
    how = 'a list of {"role": ..., "content": ...} objects (in CSV/TSV as JSON text)'
    items, problem = _list_field(name, value, "messages", how)
    if items is None:
        return None, problem
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
    items, problem = _list_field(
        name, value, "token ids", "a list of integers (in CSV/TSV as JSON text, [1, 2, 3])"
    )
    if items is None:
        return None, problem
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int):
            if isinstance(item, float) and item.is_integer():
                continue
            return None, f"field {name!r} item {i} is {item!r}, not a token id (a whole number)"
    return tuple(int(i) for i in items), None


def parse_responses(name: str, value: object) -> tuple[list[str], str | None]:
    """The candidate responses of a row (a non-empty list of texts), or why it is not one."""
    items, problem = _list_field(name, value, "responses", "a list of texts (in CSV/TSV as JSON text)")
    if items is None:
        return [], problem
    if not items:
        return [], f"field {name!r} is an empty list: there is no response to score"
    for i, item in enumerate(items):
        if not isinstance(item, str):
            return [], f"field {name!r} item {i} is a {type(item).__name__}, not text"
    return items, None
