"""The synchronous client of a pairscore server (or a fleet of them).

::

    from pairscore import ScoringClient
    with ScoringClient("localhost:50051") as client:
        for result in client.score([("The capital of France is", " Paris.")]):
            print(result.conditional_logprob)

        for result in client.score_iter(pairs_from_a_huge_file(), batch_size=64):
            ...  # in input order, with flat memory

It needs only grpcio and protobuf (no torch). RPC failures raise a
:class:`~pairscore.errors.ScoringError` subclass; a pair that could not be
scored comes back as an :class:`~pairscore.types.ItemError` in its place,
the other pairs unaffected. :class:`~pairscore.aio.AsyncScoringClient` is
the asyncio twin: both are thin shells over one implementation
(:mod:`pairscore._base`), and differ only in how a call is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

import grpc

from pairscore import _stream_sync
from pairscore._base import DEFAULT_BATCH_SIZE, SCORING_SERVICE, ClientBase, IterSettings, Unary
from pairscore.channel import DEFAULT_MAX_MESSAGE_BYTES, ChannelSettings
from pairscore.errors import ScoringError
from pairscore.inputs import PairLike, PromptLike, ResponseLike, resolve_options
from pairscore.types import (
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    ModelInfo,
    ScoreOptions,
    ScoreOutcome,
)
from pairscore.v1 import scoring_pb2 as pb

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Unpack

    from pairscore.inputs import OptionKeywords

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "PairLike", "ScoringClient", "ScoringError"]

T = TypeVar("T")


class ScoringClient(ClientBase):
    """Synchronous client of ``pairscore.v1.ScoringService``; thread-safe.

    ``target``: ``host:port``, ``dns:///host:port`` for every replica behind
    a name (round_robin load balancing), ``ipv4:a:p,b:q``, or a ready
    :class:`~pairscore.channel.ChannelSettings`. ``timeout``: the default
    deadline of each call in seconds (``None``: none); every method takes
    its own ``timeout`` too. ``retry``: gRPC retries of UNAVAILABLE and
    RESOURCE_EXHAUSTED with exponential backoff and jitter (``None`` to
    switch them off). ``wait_for_ready``: calls wait (within their
    deadline) for a server to become reachable instead of failing at once.
    ``tls``: a :class:`~pairscore.channel.TlsConfig` or ``True`` (system
    roots); ``secure=True`` is the same as ``tls=True``; ``credentials``:
    ready-made channel credentials. ``token``: a bearer token sent with
    every call. ``load_balancing``: ``"round_robin"`` or ``"pick_first"``.
    Use it as a context manager, or call :meth:`close`.
    """

    def _open(self, settings: ChannelSettings) -> grpc.Channel:
        return settings.sync_channel()

    def _send(self, call: Unary[T]) -> T:
        try:
            response = self._rpcs[call.method](call.request, **call.kwargs)
        except grpc.RpcError as exc:
            raise self._core.error(exc) from None
        return call.read(response)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls still running fail with CANCELLED."""
        self._channel.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- RPCs --------------------------------------------------------------------------

    def score(
        self,
        pairs: Iterable[PairLike],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[ScoreOutcome]:
        """Score pairs in one request; one PairScore or ItemError per pair, in order.

        ``tokenization``: ``SEPARATE`` (default) or ``JOINT``;
        ``return_tokens``: add per-token detail; ``unconditional``: add
        ``unconditional_logprob``, ``pmi`` and ``ifd``; ``greedy``: add
        ``response_is_greedy`` and each token's ``rank``; ``top_k``: the k
        most likely tokens at each position (at most the server's
        ``ModelInfo.max_top_k``; implies per-token detail). See
        docs/scores.md. ``end_of_turn`` (chat prompts), ``truncation``
        (``"left"``: drop prompt tokens from the start until the pair fits)
        and ``prefix`` (``"none"``: the first prompt token is context only, as
        lm-evaluation-harness) are described in docs/contract.md. ``options``:
        all of them as one :class:`~pairscore.types.ScoreOptions` instead (a
        keyword not at its default beside it raises ValueError naming it). A
        :class:`~pairscore.types.Pair` may give its prompt as
        ``prompt_messages`` or ``prompt_ids`` and its response as
        ``response_ids``. ``timeout`` overrides the client's default
        deadline. Raises a :class:`~pairscore.errors.ScoringError` subclass
        if the RPC fails.
        """
        return self._send(self._core.score(pairs, options, keywords, timeout))

    def score_iter(
        self,
        pairs: Iterable[PairLike],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int | None = None,
        streams: int = 1,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        on_retry: Callable[[ScoringError, float], None] | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> Iterator[ScoreOutcome]:
        """Score an iterable of any size; yields one PairScore or ItemError per pair, in input order.

        Pairs are read lazily and sent as ScoreStream messages of
        ``batch_size`` pairs over ``streams`` concurrent streams (with
        several replicas behind the target, round_robin spreads the streams
        over them). At most ``max_in_flight`` pairs (default: 8 batches per
        stream) are read but not yet handed to you, so memory stays flat
        however large the input. A pair that fails comes back as an
        ItemError and the iteration goes on. A stream that breaks with a
        retryable status (server restart, overload) is reopened with
        backoff and its unanswered pairs are sent again, so every input
        pair is answered exactly once. ``timeout`` (default: the client's)
        is the progress deadline: a stream that gets no answer for that
        long is cancelled and reopened; a server that cannot be reached
        at all (connection refused, unknown host, TLS handshake failure)
        fails with :class:`~pairscore.errors.ConnectionFailedError` once
        ``timeout`` passed without an answer. ``on_retry(error, delay_s)``
        is called (from a worker thread) each time a broken stream is
        about to be reopened, e.g. to say "waiting for the server". A
        message over the size limit raises
        :class:`~pairscore.errors.MessageTooLargeError` at once. Raises a
        :class:`~pairscore.errors.ScoringError` when a stream fails for
        good; leaving the loop early cancels the streams. A pair whose
        prompt or response is not a str (None, NaN) raises TypeError.
        ``options`` and the option keywords: as in :meth:`score`.
        """
        settings = IterSettings.build(
            batch_size, max_in_flight, streams, self._core.deadline(timeout), on_retry
        )
        return _stream_sync.SyncDriver(
            open_call=self._stub.ScoreStream,
            core=self._core,
            pairs=pairs,
            options=resolve_options(options, **keywords),
            settings=settings,
        ).results()

    def score_stream(
        self,
        batches: Iterable[Iterable[PairLike]],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> Iterator[list[ScoreOutcome]]:
        """Send your own batches over one ScoreStream call; yields one result list per batch.

        The low-level form of :meth:`score_iter`: no reconnection, and
        ``batches`` is consumed as fast as the server reads it. ``timeout``
        is the deadline of the whole stream (default: the client's);
        ``options`` and the option keywords: as in :meth:`score`.
        """
        resolved = resolve_options(options, **keywords)
        sizes: list[int] = []
        failed: list[BaseException] = []

        def requests() -> Iterator[pb.ScoreRequest]:
            try:
                for batch in batches:
                    batch = list(batch)
                    request = self._core.request(batch, resolved)  # TypeError for a missing text
                    sizes.append(len(batch))
                    yield request
            except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
                failed.append(exc)  # gRPC would only report "Exception iterating requests!"

        call = self._stub.ScoreStream(requests(), **self._core.call_kwargs(timeout))
        try:
            for i, response in enumerate(call):
                yield self._core.outcomes(response, sizes[i])
        except grpc.RpcError as exc:
            if failed:
                raise failed[0] from None
            raise self._core.error(exc) from None
        finally:
            call.cancel()  # no-op when the stream already ended
        if failed:
            raise failed[0]

    def score_candidates(
        self,
        sets: Iterable[CandidateSet],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[CandidateSetResult]:
        """Score candidate sets in one ScoreCandidates request: one CandidateSetResult per set,
        in order, each with one PairScore or ItemError per candidate, in order.

        Each set's prompt (text, ``prompt_messages`` or ``prompt_ids``) is sent
        once and computed once by the server, however many candidates it has;
        every candidate is scored exactly as the Pair (prompt, candidate) would
        be by :meth:`score` (best-of-N reranking, multiple choice, preference
        pairs). The server's ``max_pairs_per_request`` bounds the candidates
        of all sets together. ``options`` and the option keywords: as in
        :meth:`score`. ``timeout`` overrides the
        client's default deadline. Raises a
        :class:`~pairscore.errors.ScoringError` subclass if the RPC fails (a
        request over gRPC's message size limit:
        :class:`~pairscore.errors.MessageTooLargeError`).
        """
        return self._send(self._core.score_candidates(sets, options, keywords, timeout))

    def score_responses(
        self,
        prompt: PromptLike,
        responses: Iterable[ResponseLike],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[ScoreOutcome]:
        """Score several responses to one prompt (one CandidateSet); one PairScore or ItemError
        per response, in order.

        ``prompt``: text, a sequence of :class:`~pairscore.types.ChatMessage`
        (rendered with the model's chat template) or token ids; each
        response: text, a :class:`~pairscore.types.Candidate` or token ids.
        The other arguments are those of :meth:`score_candidates`.
        """
        return self._send(self._core.score_responses(prompt, responses, options, keywords, timeout))

    def tokenize(
        self, texts: Iterable[str], *, parse_special_tokens: bool = False, timeout: float | None = None
    ) -> list[tuple[int, ...]]:
        """Each text's token ids, with the server's tokenizer (the Tokenize RPC).

        ``parse_special_tokens=False``: exactly the ids a ``Pair.prompt`` of
        that text is scored with (start of a document, special-token strings
        as plain text), ready to send back as ``prompt_ids``. ``True``:
        special-token strings become special tokens, as transformers'
        ``tokenizer(text, add_special_tokens=False)`` (what lm-evaluation-harness
        uses). More texts than the server's ``max_pairs_per_request``, or a
        text over ``max_text_chars``, fail the call (INVALID_ARGUMENT).
        """
        return self._send(self._core.tokenize(texts, parse_special_tokens, timeout))

    def render_chat(
        self,
        messages: Iterable[ChatMessage | Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        timeout: float | None = None,
    ) -> str:
        """A conversation as text with the model's chat template (the RenderChat RPC): what
        transformers' ``tokenizer.apply_chat_template(messages, tokenize=False,
        add_generation_prompt=..., continue_final_message=...)`` gives on the server.

        ``messages``: :class:`~pairscore.types.ChatMessage` or ``{"role", "content"}``
        dicts. Tokenize the text with ``tokenize(..., parse_special_tokens=True)`` to get
        the template's control tokens as special tokens. A model without a chat template
        raises :class:`~pairscore.errors.ScoringError` with code FAILED_PRECONDITION; a
        conversation the template refuses :class:`~pairscore.errors.InvalidArgumentError`.
        """
        call = self._core.render_chat(messages, add_generation_prompt, continue_final_message, False, timeout)
        return self._send(call)[0]

    def chat_template(self, *, timeout: float | None = None) -> str:
        """The Jinja source of the model's chat template (errors as :meth:`render_chat`)."""
        return self._send(self._core.render_chat((), False, False, True, timeout))[1]

    def model_info(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> ModelInfo:
        """Describe the served model and its scoring contract.

        ``wait_for_ready`` overrides the client's setting for this call
        (``False``: fail at once, with the cause, when no server is reachable).
        """
        return self._send(self._core.model_info(timeout, wait_for_ready))

    def health(self, service: str = SCORING_SERVICE, *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status of ``service``: ``"SERVING"``, ``"NOT_SERVING"``...

        ``service=""`` asks about the server as a whole.
        """
        return self._send(self._core.health(service, timeout))
