"""Plain data types shared by the client, the server and the scoring engine.

These are the only objects user code sees: the client converts protobuf
messages into them (see :mod:`pairscore.convert`), and the server's engine
produces them without knowing anything of gRPC. They are frozen dataclasses
with no dependency beyond the standard library.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class TokenizationMode(enum.Enum):
    """How a pair's prompt and response are turned into tokens.

    ``SEPARATE`` (the default) tokenizes x and y separately, y as a
    continuation (no dummy-prefix space), and concatenates the ids.
    ``JOINT`` tokenizes x + y once and splits at the character boundary; a
    token that straddles the boundary counts toward y.
    """

    SEPARATE = "separate"
    JOINT = "joint"


class PrefixPolicy(enum.Enum):
    """How the prefix token p that the first prompt token is conditioned on was chosen."""

    BOS = "bos"
    DOCUMENT_SEPARATOR = "document_separator"
    CUSTOM = "custom"


class Side(enum.Enum):
    """Which side of a pair a token belongs to."""

    PROMPT = "prompt"
    RESPONSE = "response"


class EndOfTurn(enum.Enum):
    """Chat items: whether the template's end of the assistant turn is scored with y.

    ``INCLUDED`` (the default) scores everything the template renders after
    the generation prompt (content and, e.g., ``<|im_end|>`` and a newline),
    what supervised fine-tuning trains on; ``EXCLUDED`` only the content.
    """

    INCLUDED = "included"
    EXCLUDED = "excluded"


class Truncation(enum.Enum):
    """What happens to a pair longer than the limit.

    ``NONE`` (the default): the item fails. ``LEFT``: tokens are dropped from
    the start of the prompt until the pair fits (``PairScore.prompt_tokens_dropped``).
    """

    NONE = "none"
    LEFT = "left"


class PrefixMode(enum.Enum):
    """What the first scored token is conditioned on.

    ``SERVER`` (the default): the server's prefix token p is put in front of
    x and every prompt token is scored. ``NONE``: no prefix token; the first
    prompt token is given context only (not scored, not counted), as in
    lm-evaluation-harness and vLLM; an empty prompt still gets p.
    """

    SERVER = "server"
    NONE = "none"


class ItemErrorCode(enum.Enum):
    """Why a single pair could not be scored."""

    INVALID_ARGUMENT = "invalid_argument"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


#: The roles a chat message may have.
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation: ``role`` is one of :data:`CHAT_ROLES`."""

    role: str
    content: str


@dataclass(frozen=True)
class Pair:
    """A (prompt, response) pair to score; ``id`` is echoed back unchanged.

    The prompt is text (``prompt``), a conversation rendered with the model's
    chat template (``prompt_messages``; ``response`` is then the assistant's
    reply) or token ids (``prompt_ids``); the response is text or
    ``response_ids``. At most one form per side: a pair that sets two fails
    with an item error. ``None`` means "not given"; an empty tuple of ids is
    an empty side given as ids.
    """

    prompt: str = ""
    response: str = ""
    id: str = ""
    prompt_messages: tuple[ChatMessage, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    response_ids: tuple[int, ...] | None = None

    @property
    def form_problem(self) -> str:
        """Why this pair's forms conflict ("" when they do not)."""
        given = [
            name
            for name, value in (
                ("prompt", self.prompt or None),
                ("prompt_messages", self.prompt_messages),
                ("prompt_ids", self.prompt_ids),
            )
            if value is not None
        ]
        if len(given) > 1:
            return f"the prompt is given twice ({' and '.join(given)}); send exactly one form"
        if self.response and self.response_ids is not None:
            return "the response is given twice (response and response_ids); send exactly one form"
        return ""


@dataclass(frozen=True)
class Candidate:
    """One response of a :class:`CandidateSet` (text or ``response_ids``)."""

    response: str = ""
    id: str = ""
    response_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CandidateSet:
    """One prompt (text, messages or ids, as in :class:`Pair`) and responses to score
    against it; the prompt is sent and computed once."""

    candidates: tuple[Candidate, ...]
    prompt: str = ""
    id: str = ""
    prompt_messages: tuple[ChatMessage, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None

    def pairs(self) -> list[Pair]:
        """The pairs this set stands for: (prompt, candidate), in order."""
        return [
            Pair(
                prompt=self.prompt,
                response=c.response,
                id=c.id,
                prompt_messages=self.prompt_messages,
                prompt_ids=self.prompt_ids,
                response_ids=c.response_ids,
            )
            for c in self.candidates
        ]


@dataclass(frozen=True)
class ScoreOptions:
    """Options that apply to every pair of one request."""

    tokenization: TokenizationMode = TokenizationMode.SEPARATE
    return_tokens: bool = False
    #: Also score the response after the prefix token alone: ``unconditional_logprob``,
    #: ``pmi`` and ``ifd`` (docs/scores.md).
    unconditional: bool = False
    #: ``response_is_greedy`` per pair and each token's ``rank``.
    greedy: bool = False
    #: The ``top_k`` most likely tokens at each position (implies per-token detail).
    top_k: int = 0
    #: Chat items: whether the template's end of the assistant turn is scored with y.
    end_of_turn: EndOfTurn = EndOfTurn.INCLUDED
    #: What happens to a pair longer than the limit.
    truncation: Truncation = Truncation.NONE
    #: What the first scored token is conditioned on.
    prefix: PrefixMode = PrefixMode.SERVER

    @property
    def wants_tokens(self) -> bool:
        """Whether results carry per-token detail (``return_tokens`` or ``top_k``)."""
        return self.return_tokens or self.top_k > 0


@dataclass(frozen=True)
class TokenScore:
    """One scored token: its id, text, log-probability and span in its side's text.

    ``char_start``/``char_end`` index the prompt (``side == PROMPT``) or the
    response (``side == RESPONSE``) in Unicode code points, like Python str
    slicing. Tokens holding parts of one character share its span.
    """

    token_id: int
    text: str
    logprob: float
    side: Side
    char_start: int
    char_end: int
    straddles_boundary: bool = False
    #: 1 + the number of tokens strictly more likely at this position (0: not computed).
    rank: int = 0
    #: The most likely tokens at this position, most likely first (with ``top_k``).
    top_k: tuple[TokenAlternative, ...] = ()


@dataclass(frozen=True)
class TokenAlternative:
    """One of the most likely tokens at a position."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class PairScore:
    """The scores of one pair, in nats.

    ``joint_logprob`` = log P(x ⊕ y) = ``prompt_logprob`` + ``conditional_logprob``;
    ``prompt_logprob`` = log P(x); ``conditional_logprob`` = log P(y | x).
    With ``ScoreOptions.unconditional``: ``unconditional_logprob`` = log P(y)
    over the same response tokens, ``pmi`` = conditional - unconditional and
    ``ifd`` = conditional / unconditional (NaN when the denominator is 0);
    with ``ScoreOptions.greedy``: ``response_is_greedy``. ``None`` when not
    asked for (docs/scores.md).
    """

    joint_logprob: float
    prompt_logprob: float
    conditional_logprob: float
    prompt_tokens: int
    response_tokens: int
    boundary_straddled: bool = False
    tokens: tuple[TokenScore, ...] = ()
    id: str = ""
    unconditional_logprob: float | None = None
    pmi: float | None = None
    ifd: float | None = None
    response_is_greedy: bool | None = None
    #: With ``Truncation.LEFT``: tokens dropped from the start of the prompt.
    prompt_tokens_dropped: int = 0
    #: Chat items with per-token detail: x and y as the template rendered them
    #: (the texts the token spans index).
    rendered_prompt: str = ""
    rendered_response: str = ""

    @property
    def mean_conditional_logprob(self) -> float:
        """Mean log-probability per response token (NaN when the response is empty)."""
        if self.response_tokens == 0:
            return math.nan
        return self.conditional_logprob / self.response_tokens

    @property
    def mean_prompt_logprob(self) -> float:
        """Mean log-probability per prompt token (NaN when the prompt is empty)."""
        if self.prompt_tokens == 0:
            return math.nan
        return self.prompt_logprob / self.prompt_tokens

    @property
    def conditional_perplexity(self) -> float:
        """Perplexity of the response given the prompt: exp(-mean conditional log-prob)."""
        return math.exp(-self.mean_conditional_logprob)


@dataclass(frozen=True)
class ItemError:
    """Why one pair failed; the other pairs of the request are unaffected."""

    code: ItemErrorCode
    message: str
    id: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the server is serving and the contract it scores under."""

    model_name: str
    model_source: str
    revision: str
    dtype: str
    device: str
    max_context_tokens: int
    vocab_size: int
    prefix_policy: PrefixPolicy
    prefix_token_id: int
    prefix_token: str
    tokenizer_class: str
    server_version: str
    default_tokenization: TokenizationMode = TokenizationMode.SEPARATE
    architecture: str = ""
    # The server's limits (0: not reported); see GetModelInfoResponse in the proto.
    max_pairs_per_request: int = 0
    max_text_chars: int = 0
    max_item_tokens: int = 0
    max_message_bytes: int = 0
    max_queue_tokens: int = 0
    max_top_k: int = 0
    #: Characters one request may have tokenized (a shared prompt once), the
    #: characters the server tokenizes at once, and the largest answer in bytes.
    max_request_chars: int = 0
    max_preparing_chars: int = 0
    max_response_bytes: int = 0
    # The tokenizer normalizes text (NFC, ...): ids decode to the normalized
    # text, spans index the text sent (docs/contract.md).
    tokenizer_normalizes: bool = False
    #: The tokenizer has a chat template (pairs may carry ``prompt_messages``).
    chat_template: bool = False
    #: Server-side only, never on the wire (so not compared): a bound of one token's
    #: decoded text in UTF-8 bytes, for the response-size bound of top-k alternatives.
    max_token_text_bytes: int = field(default=0, compare=False, repr=False)


def data_selection_scores(conditional: float, unconditional: float) -> tuple[float, float]:
    """(PMI, IFD) from log P(y | x) and log P(y) over the same response tokens.

    PMI = conditional - unconditional. IFD = mean NLL of y given x / mean NLL
    of y alone = conditional / unconditional (the token count cancels); NaN
    when the denominator is 0 (an empty response, or all tokens certain).
    """
    ifd = conditional / unconditional if unconditional != 0.0 else math.nan
    return conditional - unconditional, ifd


#: The outcome of scoring one pair.
ScoreOutcome = PairScore | ItemError


@dataclass(frozen=True)
class CandidateSetResult:
    """The outcomes of one CandidateSet: one per candidate, in order."""

    results: tuple[ScoreOutcome, ...]
    id: str = ""
