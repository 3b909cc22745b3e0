"""The asyncio client of a pairscore server: :class:`AsyncScoringClient`.

::

    from pairscore.aio import AsyncScoringClient

    async with AsyncScoringClient("localhost:50051") as client:
        results = await client.score([("The capital of France is", " Paris.")])
        async for result in client.score_iter(pairs, batch_size=64):
            ...

It mirrors :class:`~pairscore.client.ScoringClient` method for method, with
the same options, conversion and typed errors (shared through
:mod:`pairscore._base` and :mod:`pairscore.channel`). Create it inside the
event loop that uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2_grpc

from pairscore import _stream_aio
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

__all__ = ["AsyncScoringClient"]


class AsyncScoringClient:
    """asyncio client of ``pairscore.v1.ScoringService``.

    Takes the same arguments as :class:`~pairscore.client.ScoringClient`
    (target, timeout, retry, wait_for_ready, tls/secure/credentials, token,
    load_balancing, max_message_bytes, channel_options). Use ``async with``,
    or ``await close()``.
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
        self._channel = settings.aio_channel()
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

    async def close(self) -> None:
        """Close the channel; calls still running fail with CANCELLED."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def score(
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
        """Score pairs in one request; see :meth:`ScoringClient.score <pairscore.client.ScoringClient.score>`."""
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
            response = await self._stub.Score(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.outcomes(response, len(pairs))

    def score_iter(
        self,
        pairs: Iterable[PairLike] | AsyncIterable[PairLike],
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
    ) -> AsyncIterator[ScoreOutcome]:
        """Score a (sync or async) iterable of any size; ``async for`` the results in input order.

        Same behaviour as :meth:`ScoringClient.score_iter
        <pairscore.client.ScoringClient.score_iter>`: bounded in flight,
        per-item errors in place, reconnection with backoff, connection
        failures after ``timeout``, ``on_retry`` (called in the event loop).
        """
        settings = IterSettings.build(
            batch_size, max_in_flight, streams, self._core.deadline(timeout), on_retry
        )
        return _stream_aio.iterate(
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

    async def score_candidates(
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
        """Score candidate sets in one request; see :meth:`ScoringClient.score_candidates
        <pairscore.client.ScoringClient.score_candidates>`."""
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
            response = await self._stub.ScoreCandidates(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.candidate_results(response, sets)

    async def score_responses(
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
        """Score several responses to one prompt; see :meth:`ScoringClient.score_responses
        <pairscore.client.ScoringClient.score_responses>`."""
        [result] = await self.score_candidates(
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

    async def tokenize(
        self, texts: Iterable[str], *, parse_special_tokens: bool = False, timeout: float | None = None
    ) -> list[tuple[int, ...]]:
        """Each text's token ids; see :meth:`ScoringClient.tokenize <pairscore.client.ScoringClient.tokenize>`."""
        request, n = self._core.tokenize_request(texts, parse_special_tokens)
        try:
            response = await self._stub.Tokenize(request, **self._core.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.token_ids(response, n)

    async def model_info(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> ModelInfo:
        """Describe the served model and its scoring contract (``wait_for_ready``: as in the sync client)."""
        try:
            response = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), **self._core.call_kwargs(timeout, wait_for_ready)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.model_info(response)

    async def health(self, service: str = SCORING_SERVICE, *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status of ``service`` (``""``: the whole server)."""
        try:
            response = await self._health.Check(
                self._core.health_request(service), **self._core.call_kwargs(timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, secure=self._core.settings.secure) from None
        return self._core.health_status(response)
