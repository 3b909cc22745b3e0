"""The OpenAI completions protocol for scoring: JSON bodies <-> pairscore's plain types.

Pure functions, no HTTP and no protobuf: :func:`parse_completion_request`
turns a ``POST /v1/completions`` body into :class:`CompletionRequest` (or
raises :class:`OpenAIError` naming the field and the limit), :func:`to_pairs`
into the :class:`~pairscore.types.Pair` list and
:class:`~pairscore.types.ScoreOptions` the scoring service takes, and
:func:`completion_response` shapes the service's outcomes the way vLLM
answers ``echo`` + ``logprobs`` (``choices[].logprobs.{tokens,
token_logprobs, top_logprobs, text_offset}``). docs/openai.md is the
user-facing description.

Only scoring is served: ``max_tokens`` 0 (score the prompt) or 1 (also
return the model's greedy next token). The one generated token comes from
scoring the prompt followed by :data:`PROBE_RESPONSE` with ``top_k`` >= 1:
the top-1 alternative at the probe's first position is the argmax given the
whole prompt; the probe itself is dropped from the answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    ScoreOutcome,
    Side,
    TokenScore,
)
from pairscore_server.engine.interface import top_k_problem

#: Most tokens this endpoint generates per prompt: it scores, it does not generate text.
MAX_GENERATED_TOKENS = 1

#: Response text scored after the prompt when ``max_tokens`` is 1: only the log-probs at
#: its first position (the next-token distribution given the whole prompt) are used.
PROBE_RESPONSE = "\n"

#: HTTP status of an item error (the OpenAI protocol has no per-item errors: one
#: failed prompt fails the request).
ITEM_ERROR_STATUS = {
    ItemErrorCode.INVALID_ARGUMENT: 400,
    ItemErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ItemErrorCode.RESOURCE_EXHAUSTED: 429,
    ItemErrorCode.DEADLINE_EXCEEDED: 504,
    ItemErrorCode.INTERNAL: 500,
}

#: gRPC status name -> HTTP status, for errors.FAILURES rows and the metrics' code label.
GRPC_TO_HTTP = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """A request the endpoint answers with an HTTP error and an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API answers errors."""
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(
                    self.status, "server_error" if self.status >= 500 else "invalid_request_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


def _invalid(message: str, param: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


#: A prompt: text, or token ids.
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body: what to score and what to return."""

    prompts: tuple[Prompt, ...]
    echo: bool
    max_tokens: int
    #: top-k alternatives per position (the request's ``logprobs``); None: no logprobs.
    logprobs: int | None
    model: str | None = None

    @property
    def top_k(self) -> int:
        """The alternatives scored per position (``ScoreOptions.top_k``): ``logprobs``, and
        at least 1 with ``max_tokens`` 1 (the greedy token is the probe position's top-1)."""
        top_k = self.logprobs or 0
        return max(top_k, 1) if self.max_tokens > 0 else top_k

    @property
    def token_ids(self) -> bool:
        """Whether the prompts are token ids (scored as given: the first id is context only)."""
        return isinstance(self.prompts[0], tuple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_prompts(value: Any) -> tuple[Prompt, ...]:
    """``prompt`` as a string, a list of strings, a list of ids or a list of lists of ids."""
    if value is None:
        raise _invalid("'prompt' is required: a string, a list of strings or token ids", "prompt", "missing")
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _invalid(
            f"'prompt' must be a string, a list of strings, a list of token ids or a list of "
            f"lists of token ids; got {type(value).__name__}",
            "prompt",
            "invalid_type",
        )
    if not value:
        raise _invalid("'prompt' is an empty list: send at least one prompt", "prompt")
    if all(_is_int(v) for v in value):
        return (_ids(value, "prompt"),)
    prompts: list[Prompt] = []
    kinds = {isinstance(item, str) for item in value}
    if len(kinds) > 1:
        raise _invalid(
            "'prompt' mixes strings and token-id lists: send one kind per request "
            "(text and ids are scored with different first tokens, docs/openai.md)",
            "prompt",
            "invalid_type",
        )
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and all(_is_int(v) for v in item):
            prompts.append(_ids(item, f"prompt[{i}]"))
        else:
            raise _invalid(
                f"prompt[{i}] must be a string or a list of token ids (integers); got {type(item).__name__}",
                "prompt",
                "invalid_type",
            )
    return tuple(prompts)


def _ids(values: list[int], where: str) -> tuple[int, ...]:
    """A prompt's token ids; whether each is in the vocabulary is the engine's one rule (an item
    error naming the prompt, the position and the range)."""
    if not values:
        raise _invalid(f"{where} is an empty list of token ids: send at least one token", "prompt")
    return tuple(values)


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise _invalid(f"'{name}' must be an integer; got {type(value).__name__}", name, "invalid_type")
    return int(value)


def parse_completion_request(body: Any, *, max_top_k: int) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; :class:`OpenAIError` (400) names what is wrong.

    ``max_top_k`` is the server's largest ``logprobs``, checked by top_k's one rule
    (``engine.interface.top_k_problem``), in a 400 naming the field. What generates more
    than one token (``max_tokens`` > 1, ``n`` > 1, ``best_of`` > 1,
    ``stream``), samples (``temperature`` > 0 with ``max_tokens`` 1) or
    changes the text (``suffix``, ``logit_bias``) is refused; other sampling
    fields (``top_p``, ``stop``, ``seed``, penalties, ``user``) do not
    change a greedy first token or a score and are ignored.
    """
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object; got {type(body).__name__}", "body", "invalid_type")
    prompts = parse_prompts(body.get("prompt"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid(f"'model' must be a string; got {type(model).__name__}", "model", "invalid_type")
    max_tokens = _optional_int(body, "max_tokens")
    if max_tokens is None:
        raise _invalid(
            "'max_tokens' is required here (the OpenAI default, 16, would generate): this endpoint "
            f"scores prompts; send max_tokens 0 (score the prompt, with echo) or {MAX_GENERATED_TOKENS} "
            "(also the greedy next token)",
            "max_tokens",
            "missing",
        )
    if not 0 <= max_tokens <= MAX_GENERATED_TOKENS:
        raise _invalid(
            f"max_tokens is {max_tokens}; this endpoint scores and generates at most "
            f"{MAX_GENERATED_TOKENS} token (max_tokens 0: score the prompt with echo; "
            f"{MAX_GENERATED_TOKENS}: also the greedy next token)",
            "max_tokens",
        )
    for name in ("n", "best_of"):
        value = _optional_int(body, name)
        if value is not None and value != 1:
            raise _invalid(
                f"{name} is {value}; this endpoint returns exactly 1 choice per prompt ({name} 1)", name
            )
    stream = body.get("stream", False)
    if stream not in (None, False):
        raise _invalid("stream is not supported: the answer comes in one JSON body (stream false)", "stream")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise _invalid(f"'echo' must be a boolean; got {type(echo).__name__}", "echo", "invalid_type")
    if not echo and max_tokens == 0:
        raise _invalid(
            "echo is false and max_tokens is 0: there is nothing to return; send echo true to score "
            "the prompt, or max_tokens 1 for the greedy next token",
            "echo",
        )
    logprobs = _optional_int(body, "logprobs")
    if logprobs is not None and (problem := top_k_problem(logprobs, max_top_k)):
        raise _invalid(f"logprobs is {logprobs} (alternatives per token, top_k): {problem}", "logprobs")
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise _invalid(
                f"'temperature' must be a number; got {type(temperature).__name__}",
                "temperature",
                "invalid_type",
            )
        if temperature != 0 and max_tokens > 0:
            raise _invalid(
                f"temperature is {temperature}; the generated token is always the greedy one: send "
                "temperature 0 (or leave it out)",
                "temperature",
            )
    if body.get("suffix") not in (None, ""):
        raise _invalid("suffix is not supported: nothing is inserted after the completion", "suffix")
    if body.get("logit_bias") not in (None, {}):
        raise _invalid("logit_bias is not supported: the scores are the model's own", "logit_bias")
    request = CompletionRequest(
        prompts=prompts, echo=echo, max_tokens=max_tokens, logprobs=logprobs, model=model
    )
    if problem := top_k_problem(request.top_k, max_top_k):  # max_tokens 1 asks for the top-1
        message = f"max_tokens is {max_tokens}: the greedy next token is the top-1 alternative, and {problem}"
        raise _invalid(f"{message}; send max_tokens 0", "max_tokens")
    return request


def to_pairs(request: CompletionRequest) -> tuple[list[Pair], ScoreOptions]:
    """The pairs and options that the scoring service scores for ``request``.

    Each prompt is a pair's prompt (text or ``prompt_ids``); with
    ``max_tokens`` 1 its response is :data:`PROBE_RESPONSE` and top-k is at
    least 1, so that the greedy next token is the probe position's top-1.
    Text is scored after the server's prefix token; ids as given, the first
    one context only (``PrefixMode.NONE``, as vLLM and lm-eval do).
    """
    probe = PROBE_RESPONSE if request.max_tokens > 0 else ""
    pairs = [
        Pair(prompt=p, response=probe, id=str(i))
        if isinstance(p, str)
        else Pair(prompt_ids=p, response=probe, id=str(i))
        for i, p in enumerate(request.prompts)
    ]
    prefix = PrefixMode.NONE if request.token_ids else PrefixMode.SERVER
    return pairs, ScoreOptions(return_tokens=True, top_k=request.top_k, prefix=prefix)


def first_token_ids(request: CompletionRequest) -> list[int]:
    """For an echo of id prompts: the distinct first ids, whose texts the answer shows
    (the first id is context only in the scoring, so its detail does not come back)."""
    if not (request.echo and request.token_ids):
        return []
    return sorted({p[0] for p in request.prompts if isinstance(p, tuple)})


def item_error(index: int, error: ItemError) -> OpenAIError:
    """The request's error for a failed prompt (one failed prompt fails the request)."""
    status = ITEM_ERROR_STATUS.get(error.code, 500)
    return OpenAIError(status, f"prompt {index}: {error.message}", param="prompt", code=error.code.value)


def check_outcomes(outcomes: Sequence[ScoreOutcome]) -> None:
    """Raise the first failed prompt's error (one failed prompt fails the request)."""
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, ItemError):
            raise item_error(i, outcome)


def _top_logprobs(token: TokenScore | None, alternatives: Sequence[Any], k: int) -> dict[str, float]:
    """vLLM's top_logprobs entry: the k most likely tokens and the scored token itself."""
    top = {alt.text: alt.logprob for alt in alternatives[:k]}
    if token is not None:
        top.setdefault(token.text, token.logprob)
    return top


def _choice(
    index: int, request: CompletionRequest, prompt: Prompt, score: PairScore, first_texts: dict[int, str]
) -> dict[str, Any]:
    prompt_tokens = [t for t in score.tokens if t.side is Side.PROMPT]
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    text = ""
    k = request.logprobs or 0
    if request.echo:
        tokens = [t.text for t in prompt_tokens]
        token_logprobs = [t.logprob for t in prompt_tokens]
        top_logprobs = [_top_logprobs(t, t.top_k, k) for t in prompt_tokens]
        if isinstance(prompt, str):
            text = prompt
            offsets = [t.char_start for t in prompt_tokens]
        else:
            # token ids: the first is context only (null, as vLLM); the text is the
            # tokens' texts end to end
            tokens.insert(0, first_texts[prompt[0]])
            token_logprobs.insert(0, None)
            top_logprobs.insert(0, None)
            for token in tokens:
                offsets.append(len(text))
                text += token
    if request.max_tokens > 0:
        probe = next(t for t in score.tokens if t.side is Side.RESPONSE)
        greedy = probe.top_k[0]
        offsets.append(len(text))
        text += greedy.text
        tokens.append(greedy.text)
        token_logprobs.append(greedy.logprob)
        top = {alt.text: alt.logprob for alt in probe.top_k[:k]}
        top.setdefault(greedy.text, greedy.logprob)
        top_logprobs.append(top)
    logprobs = None
    if request.logprobs is not None:
        logprobs = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length"}


def completion_response(
    request: CompletionRequest,
    outcomes: Sequence[ScoreOutcome],
    *,
    model: str,
    created: int | None = None,
    first_texts: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The ``text_completion`` body for ``outcomes`` (one per prompt, all scored).

    ``first_texts``: the first tokens' texts of an echo of id prompts (see
    :func:`first_token_ids`). ``usage.prompt_tokens`` counts the prompts' tokens
    (for ids, all of them, the first included; for text, the scored ones).
    """
    choices = []
    prompt_tokens = 0
    for i, (prompt, outcome) in enumerate(zip(request.prompts, outcomes, strict=True)):
        if isinstance(outcome, ItemError):
            raise item_error(i, outcome)
        choices.append(_choice(i, request, prompt, outcome, first_texts or {}))
        prompt_tokens += len(prompt) if isinstance(prompt, tuple) else outcome.prompt_tokens
    completion_tokens = request.max_tokens * len(choices)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_response(info: ModelInfo, *, created: int) -> dict[str, Any]:
    """The ``GET /v1/models`` body: the one served model."""
    return {
        "object": "list",
        "data": [
            {
                "id": info.model_name,
                "object": "model",
                "created": created,
                "owned_by": "pairscore",
                "root": info.model_source,
                "max_model_len": info.max_context_tokens,
            }
        ],
    }
