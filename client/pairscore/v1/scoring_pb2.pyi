from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKENIZATION_MODE_UNSPECIFIED: _ClassVar[TokenizationMode]
    TOKENIZATION_MODE_SEPARATE: _ClassVar[TokenizationMode]
    TOKENIZATION_MODE_JOINT: _ClassVar[TokenizationMode]

class PrefixPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFIX_POLICY_UNSPECIFIED: _ClassVar[PrefixPolicy]
    PREFIX_POLICY_BOS: _ClassVar[PrefixPolicy]
    PREFIX_POLICY_DOCUMENT_SEPARATOR: _ClassVar[PrefixPolicy]
    PREFIX_POLICY_CUSTOM: _ClassVar[PrefixPolicy]

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    SIDE_PROMPT: _ClassVar[Side]
    SIDE_RESPONSE: _ClassVar[Side]

class EndOfTurn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_OF_TURN_UNSPECIFIED: _ClassVar[EndOfTurn]
    END_OF_TURN_INCLUDED: _ClassVar[EndOfTurn]
    END_OF_TURN_EXCLUDED: _ClassVar[EndOfTurn]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_NONE: _ClassVar[Truncation]
    TRUNCATION_LEFT: _ClassVar[Truncation]

class PrefixMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFIX_MODE_UNSPECIFIED: _ClassVar[PrefixMode]
    PREFIX_MODE_SERVER: _ClassVar[PrefixMode]
    PREFIX_MODE_NONE: _ClassVar[PrefixMode]

class ItemErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_ERROR_CODE_UNSPECIFIED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_DEADLINE_EXCEEDED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INTERNAL: _ClassVar[ItemErrorCode]
TOKENIZATION_MODE_UNSPECIFIED: TokenizationMode
TOKENIZATION_MODE_SEPARATE: TokenizationMode
TOKENIZATION_MODE_JOINT: TokenizationMode
PREFIX_POLICY_UNSPECIFIED: PrefixPolicy
PREFIX_POLICY_BOS: PrefixPolicy
PREFIX_POLICY_DOCUMENT_SEPARATOR: PrefixPolicy
PREFIX_POLICY_CUSTOM: PrefixPolicy
SIDE_UNSPECIFIED: Side
SIDE_PROMPT: Side
SIDE_RESPONSE: Side
END_OF_TURN_UNSPECIFIED: EndOfTurn
END_OF_TURN_INCLUDED: EndOfTurn
END_OF_TURN_EXCLUDED: EndOfTurn
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_NONE: Truncation
TRUNCATION_LEFT: Truncation
PREFIX_MODE_UNSPECIFIED: PrefixMode
PREFIX_MODE_SERVER: PrefixMode
PREFIX_MODE_NONE: PrefixMode
ITEM_ERROR_CODE_UNSPECIFIED: ItemErrorCode
ITEM_ERROR_CODE_INVALID_ARGUMENT: ItemErrorCode
ITEM_ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: ItemErrorCode
ITEM_ERROR_CODE_RESOURCE_EXHAUSTED: ItemErrorCode
ITEM_ERROR_CODE_DEADLINE_EXCEEDED: ItemErrorCode
ITEM_ERROR_CODE_INTERNAL: ItemErrorCode

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Pair(_message.Message):
    __slots__ = ("id", "prompt", "response", "prompt_messages", "prompt_ids", "response_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    response: str
    prompt_messages: Conversation
    prompt_ids: TokenIds
    response_ids: TokenIds
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., prompt_messages: _Optional[_Union[Conversation, _Mapping]] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., response_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("tokenization", "return_tokens", "unconditional", "greedy", "top_k", "end_of_turn", "truncation", "prefix")
    TOKENIZATION_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNCONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    END_OF_TURN_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    tokenization: TokenizationMode
    return_tokens: bool
    unconditional: bool
    greedy: bool
    top_k: int
    end_of_turn: EndOfTurn
    truncation: Truncation
    prefix: PrefixMode
    def __init__(self, tokenization: _Optional[_Union[TokenizationMode, str]] = ..., return_tokens: _Optional[bool] = ..., unconditional: _Optional[bool] = ..., greedy: _Optional[bool] = ..., top_k: _Optional[int] = ..., end_of_turn: _Optional[_Union[EndOfTurn, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., prefix: _Optional[_Union[PrefixMode, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("pairs", "options")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    options: ScoreOptions
    def __init__(self, pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "side", "char_start", "char_end", "straddles_boundary", "rank", "top_k")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    STRADDLES_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    side: Side
    char_start: int
    char_end: int
    straddles_boundary: bool
    rank: int
    top_k: _containers.RepeatedCompositeFieldContainer[TokenAlternative]
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., side: _Optional[_Union[Side, str]] = ..., char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., straddles_boundary: _Optional[bool] = ..., rank: _Optional[int] = ..., top_k: _Optional[_Iterable[_Union[TokenAlternative, _Mapping]]] = ...) -> None: ...

class TokenAlternative(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class PairScores(_message.Message):
    __slots__ = ("joint_logprob", "prompt_logprob", "conditional_logprob", "prompt_tokens", "response_tokens", "boundary_straddled", "tokens", "unconditional_logprob", "pmi", "ifd", "response_is_greedy", "prompt_tokens_dropped", "rendered_prompt", "rendered_response")
    JOINT_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_STRADDLED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNCONDITIONAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PMI_FIELD_NUMBER: _ClassVar[int]
    IFD_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    RENDERED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RENDERED_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    joint_logprob: float
    prompt_logprob: float
    conditional_logprob: float
    prompt_tokens: int
    response_tokens: int
    boundary_straddled: bool
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    unconditional_logprob: float
    pmi: float
    ifd: float
    response_is_greedy: bool
    prompt_tokens_dropped: int
    rendered_prompt: str
    rendered_response: str
    def __init__(self, joint_logprob: _Optional[float] = ..., prompt_logprob: _Optional[float] = ..., conditional_logprob: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., response_tokens: _Optional[int] = ..., boundary_straddled: _Optional[bool] = ..., tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., unconditional_logprob: _Optional[float] = ..., pmi: _Optional[float] = ..., ifd: _Optional[float] = ..., response_is_greedy: _Optional[bool] = ..., prompt_tokens_dropped: _Optional[int] = ..., rendered_prompt: _Optional[str] = ..., rendered_response: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ItemErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ItemErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "index", "scores", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    scores: PairScores
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., scores: _Optional[_Union[PairScores, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_source", "revision", "dtype", "device", "max_context_tokens", "vocab_size", "prefix_policy", "prefix_token_id", "prefix_token", "tokenizer_class", "server_version", "default_tokenization", "architecture", "max_pairs_per_request", "max_text_chars", "max_item_tokens", "max_message_bytes", "max_queue_tokens", "tokenizer_normalizes", "max_top_k", "chat_template", "max_request_chars", "max_preparing_chars", "max_response_bytes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_POLICY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CLASS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKENIZATION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_NORMALIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_PREPARING_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    default_tokenization: TokenizationMode
    architecture: str
    max_pairs_per_request: int
    max_text_chars: int
    max_item_tokens: int
    max_message_bytes: int
    max_queue_tokens: int
    tokenizer_normalizes: bool
    max_top_k: int
    chat_template: bool
    max_request_chars: int
    max_preparing_chars: int
    max_response_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., model_source: _Optional[str] = ..., revision: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., prefix_policy: _Optional[_Union[PrefixPolicy, str]] = ..., prefix_token_id: _Optional[int] = ..., prefix_token: _Optional[str] = ..., tokenizer_class: _Optional[str] = ..., server_version: _Optional[str] = ..., default_tokenization: _Optional[_Union[TokenizationMode, str]] = ..., architecture: _Optional[str] = ..., max_pairs_per_request: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_item_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_queue_tokens: _Optional[int] = ..., tokenizer_normalizes: _Optional[bool] = ..., max_top_k: _Optional[int] = ..., chat_template: _Optional[bool] = ..., max_request_chars: _Optional[int] = ..., max_preparing_chars: _Optional[int] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "response", "response_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: str
    response_ids: TokenIds
    def __init__(self, id: _Optional[str] = ..., response: _Optional[str] = ..., response_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class CandidateSet(_message.Message):
    __slots__ = ("id", "prompt", "prompt_messages", "prompt_ids", "candidates")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    prompt_messages: Conversation
    prompt_ids: TokenIds
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_messages: _Optional[_Union[Conversation, _Mapping]] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class ScoreCandidatesRequest(_message.Message):
    __slots__ = ("sets", "options")
    SETS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    sets: _containers.RepeatedCompositeFieldContainer[CandidateSet]
    options: ScoreOptions
    def __init__(self, sets: _Optional[_Iterable[_Union[CandidateSet, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class CandidateSetResult(_message.Message):
    __slots__ = ("id", "index", "results")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class ScoreCandidatesResponse(_message.Message):
    __slots__ = ("sets",)
    SETS_FIELD_NUMBER: _ClassVar[int]
    sets: _containers.RepeatedCompositeFieldContainer[CandidateSetResult]
    def __init__(self, sets: _Optional[_Iterable[_Union[CandidateSetResult, _Mapping]]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("texts", "parse_special_tokens")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    PARSE_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    parse_special_tokens: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., parse_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class RenderChatRequest(_message.Message):
    __slots__ = ("messages", "add_generation_prompt", "continue_final_message", "include_template")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FINAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    continue_final_message: bool
    include_template: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., continue_final_message: _Optional[bool] = ..., include_template: _Optional[bool] = ...) -> None: ...

class RenderChatResponse(_message.Message):
    __slots__ = ("text", "template")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    text: str
    template: str
    def __init__(self, text: _Optional[str] = ..., template: _Optional[str] = ...) -> None: ...
