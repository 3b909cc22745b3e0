"""Preparation: pairs in, PreparedPairs (token ids, spans, truncation) out.

What runs on a server's prepare threads, before any model work: each side's
tokenization (text, ids or a conversation), the prefix mode and ``Truncation.LEFT``,
and the per-pair token limit. Thread-safe (the tokenizers library is); no torch,
no model. :class:`~pairscore_server.engine.engine.ScoringEngine` owns one and
delegates ``prepare`` to it.

Within one call, a prompt text shared by several pairs (a candidate set's prompt)
is tokenized once: the pairs are SEPARATE-mode (or sided) pairs whose prompt side
is the start of a document whatever the response, so its ids do not depend on
the response.
"""

from __future__ import annotations

from collections.abc import Sequence

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    Pair,
    PrefixMode,
    ScoreOptions,
    TokenizationMode,
    Truncation,
)
from pairscore_server.engine.chat import ChatError, ChatRenderer
from pairscore_server.engine.interface import top_k_problem
from pairscore_server.engine.prefix import Prefix
from pairscore_server.engine.prepared import PreparedPair
from pairscore_server.engine.tokenization import PairTokenizer, TokenizedPair

#: One side of a pair, tokenized: its ids and each one's span in the side's text.
Encoded = tuple[list[int], list[tuple[int, int]]]


class _Joined:
    """x and y tokenized on their own, joined into a TokenizedPair only when that pair's
    turn comes (``prepare`` turns each into a PreparedPair or an error at once): a shared
    prompt's ids are copied into one pair's x ⊕ y at a time, not into every pair's at
    once (500 pairs of one 100000-token prompt held 800 MB of copies)."""

    __slots__ = ("x", "y")

    def __init__(self, x: Encoded, y: Encoded) -> None:
        self.x, self.y = x, y

    def join(self) -> TokenizedPair:
        x, y = self.x, self.y
        return TokenizedPair(tuple(x[0] + y[0]), len(x[0]), tuple(x[1] + y[1]), False)


class Preparation:
    """Tokenizes pairs for one model: what ``Engine.prepare`` does.

    ``max_context`` is the model's context (the most tokens a pair may take),
    ``vocab_size`` bounds ids sent by callers, ``max_top_k`` the ``top_k``
    option.
    """

    def __init__(
        self,
        pair_tokenizer: PairTokenizer,
        chat: ChatRenderer,
        prefix: Prefix,
        *,
        max_context: int,
        vocab_size: int,
        max_top_k: int,
    ) -> None:
        self.pair_tokenizer = pair_tokenizer
        self.chat = chat
        self.prefix = prefix
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.max_top_k = max_top_k

    def prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, max_tokens: int | None = None
    ) -> list[PreparedPair | ItemError]:
        """Tokenize pairs (in batched tokenizer calls); a pair that cannot be scored
        becomes an ItemError.

        Each side is text, token ids or (the prompt) a conversation; see
        docs/contract.md. ``max_tokens`` (at most the model's context) is the
        most tokens one pair may take, c ⊕ x ⊕ y: with ``Truncation.LEFT`` the
        prompt is cut from the start to fit it; otherwise a longer pair is an ItemError
        (the one place the per-pair token limit is checked).
        """
        problem = top_k_problem(options.top_k, self.max_top_k)
        if problem:
            return [ItemError(ItemErrorCode.INVALID_ARGUMENT, problem, p.id) for p in pairs]
        limit = self.max_context if max_tokens is None else min(max_tokens, self.max_context)
        tokenized = self._tokenize_pairs(pairs, options)
        out: list[PreparedPair | ItemError] = []
        for i, pair in enumerate(pairs):
            tok, tokenized[i] = tokenized[i], None  # one pair's x ⊕ y alive at a time
            if isinstance(tok, _Joined):
                tok = tok.join()
            assert tok is not None  # every pair was tokenized or refused
            out.append(tok if isinstance(tok, ItemError) else self._prepared(pair, tok, options, limit))
        return out

    def _tokenize_pairs(
        self, pairs: Sequence[Pair], options: ScoreOptions
    ) -> list[TokenizedPair | _Joined | ItemError | None]:
        """Each pair's x ⊕ y ids (no prefix) with spans, or why it cannot be scored.

        Text-only pairs go through the tokenization mode; a pair with a side
        given as ids or as a conversation has each side tokenized on its own
        (text prompt: start of a document; text response: a continuation, as
        in SEPARATE mode).
        """
        out: list[TokenizedPair | _Joined | ItemError | None] = [None] * len(pairs)
        plain: list[int] = []
        sided: list[int] = []
        for i, pair in enumerate(pairs):
            problem = pair.form_problem
            if problem:
                out[i] = ItemError(ItemErrorCode.INVALID_ARGUMENT, problem, pair.id)
            elif pair.prompt_messages is None and pair.prompt_ids is None and pair.response_ids is None:
                plain.append(i)
            else:
                sided.append(i)
        if plain:
            try:
                encoded = self._encode_plain([pairs[i] for i in plain], options.tokenization)
            except ValueError as exc:  # the mode is unavailable for this tokenizer
                for i in plain:
                    out[i] = ItemError(ItemErrorCode.INVALID_ARGUMENT, str(exc), pairs[i].id)
            else:
                for i, tok in zip(plain, encoded, strict=True):
                    out[i] = tok
        if sided:
            sides = self._tokenize_sides([pairs[i] for i in sided], options)
            for i, outcome in zip(sided, sides, strict=True):
                out[i] = outcome
        return out

    def _encode_plain(self, pairs: Sequence[Pair], mode: TokenizationMode) -> list[TokenizedPair | _Joined]:
        """Text pairs in ``mode``; in SEPARATE mode each distinct prompt is tokenized once
        (the ids of ``PairTokenizer.encode_many``, which would tokenize it per pair)."""
        if mode is TokenizationMode.JOINT or len({p.prompt for p in pairs}) == len(pairs):
            return list(self.pair_tokenizer.encode_many([(p.prompt, p.response) for p in pairs], mode))
        if not self.pair_tokenizer.separate_supported:
            raise ValueError(self.pair_tokenizer.separate_problem)
        prompts = self._encode_prompts_once([p.prompt for p in pairs])
        responses = self.pair_tokenizer.encode_responses([p.response for p in pairs])
        return [_Joined(x, y) for x, y in zip(prompts, responses, strict=True)]

    def _encode_prompts_once(self, texts: Sequence[str]) -> list[Encoded]:
        """``PairTokenizer.encode_prompts`` with each distinct text tokenized once."""
        distinct = list(dict.fromkeys(texts))
        if len(distinct) == len(texts):
            return self.pair_tokenizer.encode_prompts(texts)
        encoded = dict(zip(distinct, self.pair_tokenizer.encode_prompts(distinct), strict=True))
        return [encoded[t] for t in texts]

    def _tokenize_sides(
        self, pairs: Sequence[Pair], options: ScoreOptions
    ) -> list[TokenizedPair | _Joined | ItemError]:
        """Pairs with a side given as ids or a conversation: each side on its own."""
        prompts: list[Encoded | ItemError | None] = [None] * len(pairs)
        responses: list[Encoded | ItemError | None] = [None] * len(pairs)
        text_prompts = [i for i, p in enumerate(pairs) if p.prompt_ids is None and p.prompt_messages is None]
        text_responses = [
            i for i, p in enumerate(pairs) if p.response_ids is None and p.prompt_messages is None
        ]
        for i, side in zip(
            text_prompts,
            self._encode_prompts_once([pairs[i].prompt for i in text_prompts]),
            strict=True,
        ):
            prompts[i] = side
        for i, side in zip(
            text_responses,
            self.pair_tokenizer.encode_responses([pairs[i].response for i in text_responses]),
            strict=True,
        ):
            responses[i] = side
        out: list[TokenizedPair | _Joined | ItemError] = []
        for i, pair in enumerate(pairs):
            if pair.prompt_ids is not None:
                prompts[i] = self._given_ids(pair, "prompt_ids", pair.prompt_ids)
            if pair.response_ids is not None:
                responses[i] = self._given_ids(pair, "response_ids", pair.response_ids)
            if pair.prompt_messages is not None:
                out.append(self._tokenize_chat(pair, options))
                continue
            x, y = prompts[i], responses[i]
            if isinstance(x, ItemError):
                out.append(x)
            elif isinstance(y, ItemError):
                out.append(y)
            else:
                assert x is not None and y is not None
                out.append(_Joined(x, y))
        return out

    def _given_ids(self, pair: Pair, field: str, ids: Sequence[int]) -> Encoded | ItemError:
        """Ids sent by the caller, checked against the vocabulary; no spans ((0, 0) each)."""
        vocab = self.vocab_size
        for k, tid in enumerate(ids):
            if not 0 <= tid < vocab:
                return ItemError(
                    ItemErrorCode.INVALID_ARGUMENT,
                    f"{field}[{k}] is {tid}, outside the model's vocabulary of {vocab} ids "
                    f"(0 .. {vocab - 1}); send ids of this model's tokenizer (the Tokenize RPC gives them)",
                    pair.id,
                )
        return list(ids), [(0, 0)] * len(ids)

    def _tokenize_chat(self, pair: Pair, options: ScoreOptions) -> TokenizedPair | ItemError:
        """A pair whose prompt is a conversation: rendered with the model's chat template
        (chat.py); y is the assistant's reply as the template renders it."""
        assert pair.prompt_messages is not None
        if pair.response_ids is not None:
            return ItemError(
                ItemErrorCode.INVALID_ARGUMENT,
                "a conversation's response must be text (the assistant's reply, which the chat "
                "template renders), not response_ids",
                pair.id,
            )
        try:
            chat = self.chat.render(pair.prompt_messages, pair.response, options.end_of_turn)
        except ChatError as exc:
            return ItemError(ItemErrorCode.INVALID_ARGUMENT, str(exc), pair.id)
        ids, offsets, m = chat.ids, chat.offsets, chat.prompt_tokens
        context = -1
        if chat.opens_with_control:
            # The rendering opens with a control token (<|im_start|>, BOS): it is the context,
            # not scored, and nothing goes before it (docs/contract.md, chat prompts).
            context, ids, offsets, m = ids[0], ids[1:], offsets[1:], m - 1
        return TokenizedPair(
            ids,
            m,
            offsets,
            False,
            rendered_prompt=chat.prompt,
            rendered_response=chat.response,
            context_id=context,
        )

    def _prepared(
        self, pair: Pair, tok: TokenizedPair, options: ScoreOptions, limit: int
    ) -> PreparedPair | ItemError:
        """Prefix mode and truncation applied to a tokenized pair (see PreparedPair.input_ids)."""
        ids, offsets, m, straddle = tok.ids, tok.offsets, tok.prompt_tokens, tok.straddle_index
        n = len(ids) - m
        # A conversation that opens with a control token brings its own context c (the
        # prefix mode does not apply: that token is the first prompt token, the context
        # under NONE too); anything else is conditioned on the prefix token p.
        own = tok.context_id >= 0
        context = tok.context_id if own else self.prefix.token_id
        head = "1 context (the conversation's opening token)" if own else "1 prefix"
        no_prefix = options.prefix is PrefixMode.NONE and not own

        def needed(kept: int) -> int:  # c ⊕ x ⊕ y with ``kept`` prompt tokens
            return kept + n if no_prefix and kept > 0 else 1 + kept + n

        dropped = 0
        if options.truncation is Truncation.LEFT and needed(m) > limit:
            if 1 + n > limit:
                return self._too_long(pair, 1 + n, f"{head} + {n} response", limit, truncated=True)
            dropped = m + n - limit + (0 if no_prefix else 1)
            ids, offsets, m = ids[dropped:], offsets[dropped:], m - dropped
            straddle = straddle - dropped if straddle >= 0 else -1
        if no_prefix and m > 0:
            # x_1 is the context: input_ids[0], not scored, not counted.
            input_ids, offsets, m = ids, offsets[1:], m - 1
            straddle = straddle - 1 if straddle >= 0 else -1
            parts = f"1 context (the first prompt token) + {m} prompt + {n} response"
        else:
            input_ids = (context, *ids)
            parts = f"{head} + {m} prompt + {n} response"
        if len(input_ids) > limit:
            if 1 + n > limit:  # no truncation could help: say what would
                return self._too_long(pair, 1 + n, f"{head} + {n} response", limit, truncated=True)
            return self._too_long(pair, len(input_ids), parts, limit, truncated=False)
        return PreparedPair(
            id=pair.id,
            input_ids=input_ids,
            prompt_tokens=m,
            response_tokens=n,
            offsets=offsets,
            boundary_straddled=tok.boundary_straddled,
            return_tokens=options.wants_tokens,
            straddle_index=straddle,
            unconditional=options.unconditional,
            greedy=options.greedy,
            top_k=options.top_k,
            prefix_id=self.prefix.token_id,
            prompt_tokens_dropped=dropped,
            rendered_prompt=tok.rendered_prompt if options.wants_tokens else "",
            rendered_response=tok.rendered_response if options.wants_tokens else "",
        )

    def _too_long(self, pair: Pair, total: int, parts: str, limit: int, *, truncated: bool) -> ItemError:
        """The item error of a pair longer than ``limit``: CONTEXT_LENGTH_EXCEEDED past the
        model's context, INVALID_ARGUMENT past a smaller per-pair limit of the server."""
        if limit < self.max_context:
            where = f"this server takes at most {limit} tokens per pair (max_item_tokens)"
        else:
            where = f"the model's context is {limit} tokens"
        if truncated:
            what = (
                f"the response alone needs {total} tokens ({parts}) but {where}: even the "
                "whole prompt dropped is not enough (truncation LEFT drops only prompt tokens); "
                "shorten the response"
            )
        else:
            what = (
                f"pair needs {total} tokens ({parts}) but {where}; nothing is truncated "
                "(truncation LEFT would drop tokens from the start of the prompt)"
            )
        code = (
            ItemErrorCode.INVALID_ARGUMENT
            if limit < self.max_context
            else ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
        )
        return ItemError(code, what, pair.id)
