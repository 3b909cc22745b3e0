"""The scoring service in plain Python: what the gRPC servicer calls.

It ties the engine (tokenization) to the batcher (forward passes), enforces
the request limits, and puts per-item errors back in request order. It knows
nothing of protobuf.

Which limit gives which error:

* more than ``max_pairs_per_request`` pairs: :class:`RequestLimitError`
  (INVALID_ARGUMENT for the whole request);
* a prompt or response longer than ``max_text_chars`` code points: an
  ``INVALID_ARGUMENT`` item error for that pair, before tokenizing;
* a pair needing more than ``max_item_tokens`` tokens: an
  ``INVALID_ARGUMENT`` item error, from the engine's ``prepare`` (its
  ``max_tokens``; past the model's context ``CONTEXT_LENGTH_EXCEEDED``);
* the admission queue is full: :class:`QueueFullError`
  (RESOURCE_EXHAUSTED), checked once before tokenizing (one token per pair
  is a lower bound) and again with the real token count;
* the answer could be larger than ``max_response_bytes`` (a bound from the
  token counts and top_k, before any scoring, as the caller's
  :class:`AnswerBound` counts its wire format): :class:`RequestLimitError`
  (INVALID_ARGUMENT: retrying it unchanged cannot succeed);
* ``ScoreOptions.top_k`` negative or above the engine's ``max_top_k``:
  :class:`RequestLimitError` (INVALID_ARGUMENT, naming the limit).

With ``errors_as_items=True`` (ScoreStream) the request-level errors above,
deadline expiry and batch failures become item errors for the request's
pairs instead, so that a stream goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from pairscore.convert import RenderChatArgs
from pairscore.inputs import group_by_set
from pairscore.types import (
    CandidateSet,
    CandidateSetResult,
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    ScoreOptions,
    ScoreOutcome,
)
from pairscore_server.accounting import (
    DROP_DEADLINE,
    REJECT_QUEUE_FULL,
    REJECT_REQUEST_LIMIT,
    REJECT_RESPONSE_SIZE,
    PairCounters,
    leave_reason,
)
from pairscore_server.answer_bound import AnswerBound
from pairscore_server.batcher import Batcher
from pairscore_server.engine.chat import ChatRendering, NoChatTemplateError
from pairscore_server.engine.interface import merge_outcomes, top_k_problem
from pairscore_server.errors import (
    DeadlineExceededError,
    QueueFullError,
    RequestLimitError,
    failure_for,
)
from pairscore_server.limits import Limits, resolve_limits
from pairscore_server.preparing import (
    DEFAULT_INLINE_PAIRS,
    PrepareStage,
    in_order,
    pair_chunks,
    request_chars,
)
from pairscore_server.tokenizing import max_token_chars, tokenize_texts

if TYPE_CHECKING:
    from pairscore_server.engine import Engine, PreparedPair
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)


def _as_item_error(exc: Exception) -> ItemError | None:
    """The item error that stands for ``exc`` in ScoreStream (errors.FAILURES), or None
    where it ends the stream (shutting down) or is unexpected (a bug)."""
    failure = failure_for(exc)
    if failure is None or failure.item_code is None:
        return None
    return ItemError(code=failure.item_code, message=failure.message(exc))


class ScoringService:
    """Scores pairs: check limits, tokenize, queue for batching, merge per-item errors in order.

    ``prepare_executor`` runs tokenization of large requests off the event
    loop (the engine's ``prepare`` is thread-safe); ``None`` uses the loop's
    default executor. Large requests use ``prepare_workers`` of its threads at
    most; it should have one more, for small requests (preparing.py). ``limits`` defaults to the default limits resolved
    against the engine.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        batcher: Batcher,
        metrics: Metrics | None = None,
        prepare_executor: Executor | None = None,
        inline_prepare_pairs: int = DEFAULT_INLINE_PAIRS,
        limits: Limits | None = None,
        prepare_workers: int = 1,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._metrics = metrics
        self._counters = PairCounters(metrics)
        self._engine_info: ModelInfo = engine.info
        self.limits = limits = limits or resolve_limits(
            max_context=self._engine_info.max_context_tokens,
            max_batch_tokens=engine.max_batch_tokens,
        )
        self.prepare_stage = PrepareStage(
            prepare_executor,
            max_request_chars=limits.max_request_chars,
            max_preparing_chars=limits.max_preparing_chars,
            inline_pairs=inline_prepare_pairs,
            large_workers=prepare_workers,
        )
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        """The served model's description and this server's limits (built once, then cached)."""
        if self._info is None:
            lim = self.limits
            self._info = dataclasses.replace(
                self._engine_info,
                max_pairs_per_request=lim.max_pairs_per_request,
                max_text_chars=lim.max_text_chars,
                max_item_tokens=lim.max_item_tokens,
                max_message_bytes=lim.max_message_bytes,
                max_queue_tokens=lim.max_queue_tokens,
                max_request_chars=lim.max_request_chars,
                max_preparing_chars=lim.max_preparing_chars,
                max_response_bytes=lim.max_response_bytes,
            )
        return self._info

    async def score(
        self,
        pairs: Sequence[Pair],
        options: ScoreOptions,
        *,
        answer: AnswerBound,
        deadline: float | None = None,
        errors_as_items: bool = False,
    ) -> list[ScoreOutcome]:
        """Score ``pairs``; one PairScore or ItemError per pair, in order.

        ``deadline`` is a ``time.monotonic()`` value after which the caller no
        longer waits. Items the engine or a per-item limit rejects come back
        as ItemError. Request-level failures raise RequestLimitError,
        QueueFullError, DeadlineExceededError or BatchFailedError, or with
        ``errors_as_items=True`` become item errors for the pairs not
        already rejected. BatcherClosedError (shutting down, stuck worker)
        always raises. Each pair is counted once: its own outcome in
        ``pairscore_pairs_total``, or the request's fate in
        ``pairscore_rejected_pairs_total`` / ``pairscore_dropped_pairs_total``.
        ``answer``: how large the caller's answer can be (its wire format's bound).
        """
        if not pairs:  # what the answer holds besides results (empty candidate sets) still counts
            self._check_response_size([], [], options, answer)
            return []
        n = len(pairs)
        try:
            self._check_pairs_per_request(n, f"{n} pairs", "pairs per request", "split it")
            problem = top_k_problem(options.top_k, self._engine_info.max_top_k)
            if problem:
                self._count_rejected(REJECT_REQUEST_LIMIT, n)
                raise RequestLimitError(problem)
            if deadline is not None and time.monotonic() >= deadline:
                self._count_rejected(DROP_DEADLINE, n)
                raise DeadlineExceededError("the deadline passed before scoring started")
            chars = request_chars(pairs)
            self._check_chars_budget(chars, n)
            # >= 1 token a pair; the batcher counts what it refuses
            self._batcher.check_admission(tokens=n, pairs=n, at_least=True, deadline=deadline)
        except Exception as exc:
            item = _as_item_error(exc) if errors_as_items else None
            if item is None:
                raise
            return self._finish(pairs, [item] * n, counted=False)
        started = time.monotonic()
        try:
            prepared = await self._prepare(pairs, options, chars=chars, deadline=deadline)
        except asyncio.CancelledError:  # the caller left while its pairs were tokenized
            self._counters.dropped(leave_reason(deadline, started, time.monotonic()), n)
            raise
        except DeadlineExceededError as exc:
            self._counters.dropped(DROP_DEADLINE, n)
            item = _as_item_error(exc) if errors_as_items else None
            if item is None:
                raise
            return self._finish(pairs, [item] * n, counted=False)
        try:
            self._check_response_size(pairs, prepared, options, answer)
        except RequestLimitError as exc:
            item = _as_item_error(exc) if errors_as_items else None
            if item is None:
                raise
            return self._finish(pairs, [item] * n, counted=False)
        ready = [p for p in prepared if not isinstance(p, ItemError)]
        try:
            scores = await self._batcher.submit(ready, deadline=deadline) if ready else []
        except Exception as exc:
            # The batcher counted the ready pairs; the ones prepare() answered are counted here.
            item = _as_item_error(exc) if errors_as_items else None
            if item is None:
                self._observe([p for p in prepared if isinstance(p, ItemError)])
                raise
            failed: list[ScoreOutcome] = [p if isinstance(p, ItemError) else item for p in prepared]
            return self._finish(pairs, failed, counted=[isinstance(p, ItemError) for p in prepared])
        return self._finish(pairs, merge_outcomes(prepared, scores))

    async def score_candidates(
        self,
        sets: Sequence[CandidateSet],
        options: ScoreOptions,
        *,
        answer: AnswerBound,
        deadline: float | None = None,
    ) -> list[CandidateSetResult]:
        """Score each set's candidates against its prompt; one CandidateSetResult per set, in order.

        Every candidate of the request goes to the batcher in one submission,
        so that each set's prompt lands in one engine call, where the engine's
        shared-prompt path computes it once for all its candidates. Each
        candidate is scored, limited and counted exactly as the Pair (prompt,
        candidate) of :meth:`score`; ``max_pairs_per_request`` bounds the
        candidates of all sets together. A set whose prompt cannot be used
        gives each of its candidates the item error; the other sets are
        unaffected. Request-level failures raise as in :meth:`score`. ``answer``
        counts the sets' wrappers in its ``extra_bytes``.
        """
        n = sum(len(s.candidates) for s in sets)
        self._check_pairs_per_request(
            n,
            f"{n} candidates in {len(sets)} sets",
            "candidates per request, all sets together",
            "send the sets in several requests",
        )
        pairs = [pair for s in sets for pair in s.pairs()]
        return group_by_set(sets, await self.score(pairs, options, answer=answer, deadline=deadline))

    def _check_response_size(
        self,
        pairs: Sequence[Pair],
        prepared: Sequence[PreparedPair | ItemError],
        options: ScoreOptions,
        answer: AnswerBound,
    ) -> None:
        """Refuse, before any scoring, a request whose answer could not be sent
        (answer_bound.py): the caller, not a client's receive limit, learns why."""
        problem = answer.refusal(pairs, prepared, options, limit=self.limits.max_response_bytes)
        if problem:
            self._count_rejected(REJECT_RESPONSE_SIZE, len(pairs))
            raise RequestLimitError(problem)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's text as a result's per-token detail shows it, from the tokenizer
        (no forward pass); the ids must be in the vocabulary."""
        return self._engine.token_texts(ids)

    def _check_pairs_per_request(self, n: int, has: str, per: str, fix: str) -> None:
        """``max_pairs_per_request``, for a request of ``n`` pairs (``has`` and ``per`` say
        them in the caller's words), counting a refused request's pairs."""
        problem = self.limits.too_many_pairs(n, has, per, fix)
        if problem:
            self._count_rejected(REJECT_REQUEST_LIMIT, n)
            raise RequestLimitError(problem)

    def _count_rejected(self, reason: str, pairs: int) -> None:
        self._counters.rejected(reason, pairs)

    def _check_chars_budget(self, chars: int, pairs: int) -> None:
        """The prepare stage's character budgets (preparing.py), counting refused pairs."""
        try:
            self.prepare_stage.check(chars)
        except RequestLimitError:
            self._count_rejected(REJECT_REQUEST_LIMIT, pairs)
            raise
        except QueueFullError:
            self._count_rejected(REJECT_QUEUE_FULL, pairs)
            raise

    def _observe(self, outcomes: Sequence[ScoreOutcome]) -> None:
        if self._metrics is not None and outcomes:
            self._metrics.observe_outcomes(outcomes)

    def _finish(
        self,
        pairs: Sequence[Pair],
        outcomes: Sequence[ScoreOutcome],
        *,
        counted: bool | Sequence[bool] = True,
    ) -> list[ScoreOutcome]:
        """Give each outcome its pair's id and count the outcomes decided for one pair.

        ``counted`` (one flag, or one per pair) says which outcomes go to
        ``pairscore_pairs_total``: not the item errors that stand for a
        whole-request refusal or drop, which the rejected / dropped counters
        already hold.
        """
        result: list[ScoreOutcome] = []
        for pair, outcome in zip(pairs, outcomes, strict=True):
            if outcome.id != pair.id:
                outcome = dataclasses.replace(outcome, id=pair.id)
            result.append(outcome)
        flags = [counted] * len(result) if isinstance(counted, bool) else list(counted)
        self._observe([o for o, flag in zip(result, flags, strict=True) if flag])
        return result

    # --- tokenization and per-item limits -------------------------------------------

    async def _prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, chars: int, deadline: float | None
    ) -> list[PreparedPair | ItemError]:
        """Tokenize ``pairs`` in the prepare stage: inline when small, else in chunks that
        see the deadline and the caller's cancellation (preparing.py)."""
        stage = self.prepare_stage
        if stage.inline(len(pairs), chars):
            return self._prepare_checked(pairs, options)
        done = await stage.run(
            pair_chunks(pairs, stage.chunk_chars),
            lambda chunk: self._prepare_checked([pairs[i] for i in chunk], options),
            chars=chars,
            deadline=deadline,
        )
        return in_order(len(pairs), done)

    def _prepare_checked(
        self, pairs: Sequence[Pair], options: ScoreOptions
    ) -> list[PreparedPair | ItemError]:
        """Character limits, then the engine's tokenization, which also applies the per-pair
        token limit (``max_tokens``: the one place it is checked, engine/preparation.py)."""
        out: list[PreparedPair | ItemError | None] = [self._check_chars(p) for p in pairs]
        todo = [i for i, item in enumerate(out) if item is None]
        limit = self.limits.max_item_tokens
        prepared = self._engine.prepare([pairs[i] for i in todo], options, max_tokens=limit) if todo else []
        if len(prepared) != len(todo):
            raise RuntimeError(f"engine prepared {len(prepared)} items for {len(todo)} pairs")
        for i, item in zip(todo, prepared, strict=True):
            out[i] = item
        return out  # type: ignore[return-value]

    def _check_chars(self, pair: Pair) -> ItemError | None:
        texts = [("prompt", pair.prompt), ("response", pair.response)]
        texts += [
            (f"prompt_messages[{i}].content", m.content) for i, m in enumerate(pair.prompt_messages or ())
        ]
        for side, text in texts:
            problem = self.limits.text_too_long(side, text, "prompt, response or chat message")
            if problem:
                return ItemError(ItemErrorCode.INVALID_ARGUMENT, problem, pair.id)
        return None

    # --- RenderChat -----------------------------------------------------------------

    async def render_chat(self, args: RenderChatArgs, *, deadline: float | None = None) -> tuple[str, str]:
        """(text, template) of a RenderChat request: the conversation rendered with the
        model's chat template, and the template's source when asked (else "").

        Each content over ``max_text_chars`` or an answer over ``max_response_bytes``
        raises RequestLimitError; the characters count against the prepare stage's
        budgets (QueueFullError) and a large conversation renders on its executor. The
        engine's ChatError (NoChatTemplateError: no template) says why it cannot render.
        """
        engine = self._engine
        if not isinstance(engine, ChatRendering):
            raise NoChatTemplateError(f"this server's engine ({type(engine).__name__}) renders no chat")
        template = engine.chat_template()  # NoChatTemplateError first: the cause to fix
        for i, m in enumerate(args.messages):
            problem = self.limits.text_too_long(f"messages[{i}].content", m.content, "chat message")
            if problem:
                raise RequestLimitError(problem)
        chars = sum(len(m.role) + len(m.content) for m in args.messages)
        stage = self.prepare_stage
        stage.check(chars, "RenderChat request")

        def render(_: list[int]) -> list[str]:
            return [
                engine.render_chat(
                    args.messages,
                    add_generation_prompt=args.add_generation_prompt,
                    continue_final_message=args.continue_final_message,
                )
            ]

        if stage.inline(1, chars):
            [text] = render([0])
        else:
            [(_, [text])] = await stage.run([[0]], render, chars=chars, deadline=deadline)
        sent = template if args.include_template else ""
        size = len(text.encode()) + len(sent.encode())
        if size > self.limits.max_response_bytes:
            raise RequestLimitError(
                f"the rendered conversation takes {size} bytes, over this server's "
                f"{self.limits.max_response_bytes}-byte answer limit (max_response_bytes, "
                "--max-response-bytes); send a shorter conversation"
            )
        return text, sent

    # --- Tokenize -------------------------------------------------------------------

    async def tokenize(
        self, texts: Sequence[str], *, parse_special_tokens: bool = False, deadline: float | None = None
    ) -> list[tuple[int, ...]]:
        """Each text's ids with the served tokenizer (the Tokenize RPC): the limits, the
        chunks and the answer-size checks of :func:`pairscore_server.tokenizing.tokenize_texts`."""
        info = self._engine_info
        return await tokenize_texts(
            texts,
            work=lambda chunk: self._engine.tokenize(chunk, parse_special_tokens=parse_special_tokens),
            stage=self.prepare_stage,
            limits=self.limits,
            max_token_chars=max_token_chars(
                normalizes=info.tokenizer_normalizes, max_token_text_bytes=info.max_token_text_bytes
            ),
            deadline=deadline,
        )
