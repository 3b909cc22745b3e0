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
the asyncio twin; both share :mod:`pairscore._base` and
:mod:`pairscore.channel`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2_grpc

from pairscore import _stream_sync
from pairscore._base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRY,
    SCORING_SERVICE,
    ClientCore,
    IterSettings,
    PairLike,
    PromptLike,
    ResponseLike,
    build_settings,
    candidate_set,
    make_options,
    resolve_options,
)
from pairscore.channel import DEFAULT_MAX_MESSAGE_BYTES, ChannelSettings, RetryPolicy, TlsConfig
from pairscore.errors import ScoringError, error_from_rpc
from pairscore.types import (
    CandidateSet,
    CandidateSetResult,
    EndOfTurn,
    ModelInfo,
    PrefixMode,
    ScoreOptions,
    ScoreOutcome,
    TokenizationMode,
    Truncation,
)
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "PairLike", "ScoringClient", "ScoringError"]


class ScoringClient:
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

    def __init__(
        self,
        target: str | ChannelSettings,
        *,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        wait_for_ready: bool = False,
        tls: TlsConfig | bool | None = None,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, object]] = (),
    ) -> None:
        settings = build_settings(
            target,
            secure=secure,
            tls=tls,
            credentials=credentials,
            token=token,
            retry=retry,
            load_balancing=load_balancing,
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        self.target = settings.target
        self._core = ClientCore(settings, timeout=timeout, wait_for_ready=wait_for_ready)
        self._channel = settings.sync_channel()
        self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds."""
        return self._core.timeout

    @property
    def settings(self) -> ChannelSettings:
        """How this client connects."""
        return self._core.settings

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
        tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        unconditional: bool = False,
        greedy: bool = False,
        top_k: int = 0,
        end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
        truncation: Truncation | str = Truncation.NONE,
        prefix: PrefixMode | str = PrefixMode.SERVER,
        timeout: float | None = None,
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
        lm-evaluation-harness) are described in docs/contract.md. A
        :class:`~pairscore.types.Pair` may give its prompt as
        ``prompt_messages`` or ``prompt_ids`` and its response as
        ``response_ids``. ``timeout`` overrides the client's default deadline. Raises a
        :class:`~pairscore.errors.ScoringError` subclass if the RPC fails.
        """
        pairs = list(pairs)
        request = self._core.request(
            pairs,
            make_options(
                tokenization,
                return_tokens,
                unconditional,
                greedy,
                top_k,
                end_of_turn=end_of_turn,
                truncation=truncation,
                prefix=prefix,
            ),
        )
        try:
            response = self._stub.Score(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.outcomes(response, len(pairs))

    def score_iter(
        self,
        pairs: Iterable[PairLike],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int | None = None,
        streams: int = 1,
        tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        unconditional: bool = False,
        greedy: bool = False,
        top_k: int = 0,
        end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
        truncation: Truncation | str = Truncation.NONE,
        prefix: PrefixMode | str = PrefixMode.SERVER,
        timeout: float | None = None,
        on_retry: Callable[[ScoringError, float], None] | None = None,
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
        """
        settings = IterSettings.build(
            batch_size, max_in_flight, streams, self._core.deadline(timeout), on_retry
        )
        return _stream_sync.iterate(
            open_call=self._stub.ScoreStream,
            core=self._core,
            pairs=pairs,
            options=make_options(
                tokenization,
                return_tokens,
                unconditional,
                greedy,
                top_k,
                end_of_turn=end_of_turn,
                truncation=truncation,
                prefix=prefix,
            ),
            settings=settings,
        )

    def score_stream(
        self,
        batches: Iterable[Iterable[PairLike]],
        *,
        tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        unconditional: bool = False,
        greedy: bool = False,
        top_k: int = 0,
        end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
        truncation: Truncation | str = Truncation.NONE,
        prefix: PrefixMode | str = PrefixMode.SERVER,
        timeout: float | None = None,
    ) -> Iterator[list[ScoreOutcome]]:
        """Send your own batches over one ScoreStream call; yields one result list per batch.

        The low-level form of :meth:`score_iter`: no reconnection, and
        ``batches`` is consumed as fast as the server reads it. ``timeout``
        is the deadline of the whole stream (default: the client's).
        """
        options = make_options(
            tokenization,
            return_tokens,
            unconditional,
            greedy,
            top_k,
            end_of_turn=end_of_turn,
            truncation=truncation,
            prefix=prefix,
        )
        sizes: list[int] = []
        failed: list[BaseException] = []

        def requests() -> Iterator[pb.ScoreRequest]:
            try:
                for batch in batches:
                    batch = list(batch)
                    request = self._core.request(batch, options)  # TypeError for a missing text
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
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        finally:
            call.cancel()  # no-op when the stream already ended
        if failed:
            raise failed[0]

    def score_candidates(
        self,
        sets: Iterable[CandidateSet],
        *,
        options: ScoreOptions | None = None,
        tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        unconditional: bool = False,
        greedy: bool = False,
        top_k: int = 0,
        end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
        truncation: Truncation | str = Truncation.NONE,
        prefix: PrefixMode | str = PrefixMode.SERVER,
        timeout: float | None = None,
    ) -> list[CandidateSetResult]:
        """Score candidate sets in one ScoreCandidates request: one CandidateSetResult per set,
        in order, each with one PairScore or ItemError per candidate, in order.

        Each set's prompt (text, ``prompt_messages`` or ``prompt_ids``) is sent
        once and computed once by the server, however many candidates it has;
        every candidate is scored exactly as the Pair (prompt, candidate) would
        be by :meth:`score` (best-of-N reranking, multiple choice, preference
        pairs). The server's ``max_pairs_per_request`` bounds the candidates
        of all sets together. ``options``: a full
        :class:`~pairscore.types.ScoreOptions` (truncation, prefix, end of
        turn...); the keyword options are as in :meth:`score` and must stay at
        their defaults when ``options`` is given. ``timeout`` overrides the
        client's default deadline. Raises a
        :class:`~pairscore.errors.ScoringError` subclass if the RPC fails (a
        request over gRPC's message size limit:
        :class:`~pairscore.errors.MessageTooLargeError`).
        """
        sets = list(sets)
        resolved = resolve_options(
            options,
            tokenization=tokenization,
            return_tokens=return_tokens,
            unconditional=unconditional,
            greedy=greedy,
            top_k=top_k,
            end_of_turn=end_of_turn,
            truncation=truncation,
            prefix=prefix,
        )
        request = self._core.candidates_request(sets, resolved)
        try:
            response = self._stub.ScoreCandidates(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.candidate_results(response, sets)

    def score_responses(
        self,
        prompt: PromptLike,
        responses: Iterable[ResponseLike],
        *,
        options: ScoreOptions | None = None,
        tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        unconditional: bool = False,
        greedy: bool = False,
        top_k: int = 0,
        end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
        truncation: Truncation | str = Truncation.NONE,
        prefix: PrefixMode | str = PrefixMode.SERVER,
        timeout: float | None = None,
    ) -> list[ScoreOutcome]:
        """Score several responses to one prompt (one CandidateSet); one PairScore or ItemError
        per response, in order.

        ``prompt``: text, a sequence of :class:`~pairscore.types.ChatMessage`
        (rendered with the model's chat template) or token ids; each
        response: text, a :class:`~pairscore.types.Candidate` or token ids.
        The other arguments are those of :meth:`score_candidates`.
        """
        [result] = self.score_candidates(
            [candidate_set(prompt, responses)],
            options=options,
            tokenization=tokenization,
            return_tokens=return_tokens,
            unconditional=unconditional,
            greedy=greedy,
            top_k=top_k,
            end_of_turn=end_of_turn,
            truncation=truncation,
            prefix=prefix,
            timeout=timeout,
        )
        return list(result.results)

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
        request, n = self._core.tokenize_request(texts, parse_special_tokens)
        try:
            response = self._stub.Tokenize(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.token_ids(response, n)

    def model_info(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> ModelInfo:
        """Describe the served model and its scoring contract.

        ``wait_for_ready`` overrides the client's setting for this call
        (``False``: fail at once, with the cause, when no server is reachable).
        """
        try:
            response = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), **self._core.call_kwargs(timeout, wait_for_ready)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.model_info(response)

    def health(self, service: str = SCORING_SERVICE, *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status of ``service``: ``"SERVING"``, ``"NOT_SERVING"``...

        ``service=""`` asks about the server as a whole.
        """
        try:
            response = self._health.Check(
                self._core.health_request(service), **self._core.call_kwargs(timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.health_status(response)
