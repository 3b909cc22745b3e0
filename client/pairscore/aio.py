"""The asyncio client of a pairscore server: :class:`AsyncScoringClient`.

::

    from pairscore.aio import AsyncScoringClient

    async with AsyncScoringClient("localhost:50051") as client:
        results = await client.score([("The capital of France is", " Paris.")])
        async for result in client.score_iter(pairs, batch_size=64):
            ...

It mirrors :class:`~pairscore.client.ScoringClient` method for method, with
the same options, conversion and typed errors: both are thin shells over one
implementation (:mod:`pairscore._base`) and differ only in how a call is
sent. Create it inside the event loop that uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

import grpc

from pairscore import _stream_aio
from pairscore._base import DEFAULT_BATCH_SIZE, SCORING_SERVICE, ClientBase, IterSettings, Unary
from pairscore.channel import ChannelSettings
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

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Unpack

    from pairscore.inputs import OptionKeywords

__all__ = ["AsyncScoringClient"]

T = TypeVar("T")


class AsyncScoringClient(ClientBase):
    """asyncio client of ``pairscore.v1.ScoringService``.

    Takes the same arguments as :class:`~pairscore.client.ScoringClient`
    (target, timeout, retry, wait_for_ready, tls/secure/credentials, token,
    load_balancing, max_message_bytes, channel_options). Use ``async with``,
    or ``await close()``.
    """

    def _open(self, settings: ChannelSettings) -> grpc.aio.Channel:
        return settings.aio_channel()

    async def _send(self, call: Unary[T]) -> T:
        try:
            response = await self._rpcs[call.method](call.request, **call.kwargs)
        except grpc.RpcError as exc:
            raise self._core.error(exc) from None
        return call.read(response)

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
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[ScoreOutcome]:
        """Score pairs in one request; see :meth:`ScoringClient.score <pairscore.client.ScoringClient.score>`."""
        return await self._send(self._core.score(pairs, options, keywords, timeout))

    def score_iter(
        self,
        pairs: Iterable[PairLike] | AsyncIterable[PairLike],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int | None = None,
        streams: int = 1,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        on_retry: Callable[[ScoringError, float], None] | None = None,
        **keywords: Unpack[OptionKeywords],
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
        return _stream_aio.AioDriver(
            open_call=self._stub.ScoreStream,
            core=self._core,
            pairs=pairs,
            options=resolve_options(options, **keywords),
            settings=settings,
        ).results()

    async def score_candidates(
        self,
        sets: Iterable[CandidateSet],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[CandidateSetResult]:
        """Score candidate sets in one request; see :meth:`ScoringClient.score_candidates
        <pairscore.client.ScoringClient.score_candidates>`."""
        return await self._send(self._core.score_candidates(sets, options, keywords, timeout))

    async def score_responses(
        self,
        prompt: PromptLike,
        responses: Iterable[ResponseLike],
        *,
        options: ScoreOptions | None = None,
        timeout: float | None = None,
        **keywords: Unpack[OptionKeywords],
    ) -> list[ScoreOutcome]:
        """Score several responses to one prompt; see :meth:`ScoringClient.score_responses
        <pairscore.client.ScoringClient.score_responses>`."""
        return await self._send(self._core.score_responses(prompt, responses, options, keywords, timeout))

    async def tokenize(
        self, texts: Iterable[str], *, parse_special_tokens: bool = False, timeout: float | None = None
    ) -> list[tuple[int, ...]]:
        """Each text's token ids; see :meth:`ScoringClient.tokenize <pairscore.client.ScoringClient.tokenize>`."""
        return await self._send(self._core.tokenize(texts, parse_special_tokens, timeout))

    async def render_chat(
        self,
        messages: Iterable[ChatMessage | Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        timeout: float | None = None,
    ) -> str:
        """A conversation as text with the model's chat template; see
        :meth:`ScoringClient.render_chat <pairscore.client.ScoringClient.render_chat>`."""
        call = self._core.render_chat(messages, add_generation_prompt, continue_final_message, False, timeout)
        return (await self._send(call))[0]

    async def chat_template(self, *, timeout: float | None = None) -> str:
        """The Jinja source of the model's chat template."""
        return (await self._send(self._core.render_chat((), False, False, True, timeout)))[1]

    async def model_info(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> ModelInfo:
        """Describe the served model and its scoring contract (``wait_for_ready``: as in the sync client)."""
        return await self._send(self._core.model_info(timeout, wait_for_ready))

    async def health(self, service: str = SCORING_SERVICE, *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status of ``service`` (``""``: the whole server)."""
        return await self._send(self._core.health(service, timeout))
