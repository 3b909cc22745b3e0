"""A stand-in for ScoringEngine with the same interface and no model.

One character is one token (id = its code point; the prefix token is 0).
Scores are deterministic functions of the lengths, so tests can predict
them exactly: every prompt token has log-prob ``PROMPT_TOKEN_LOGPROB`` and
every response token ``RESPONSE_TOKEN_LOGPROB``.

Knobs: ``max_context`` (longer pairs become CONTEXT_LENGTH_EXCEEDED items),
``forward_delay_s`` (score() sleeps, like a slow forward pass),
``warmup_gate`` (warmup() blocks until the event is set), ``score_gate``
(score() blocks until the event is set: a stuck worker), ``oom_above_tokens``
(score() raises an out-of-memory error, like torch's, when its padded size,
longest pair x pairs, is larger), ``shares_runs`` (the batcher sizes calls as the
real engine's trie computes them, a run shared by several pairs counted once;
by default every pair costs all its tokens), and a pair whose prompt is ``FAIL_PROMPT``
makes the whole score() call raise. Every score() call is recorded in
``batches`` (the prompts it saw), ``batch_lengths`` (their token counts) and
``score_threads`` (the thread it ran on); calls that ran out of memory are
recorded in ``oom_batches`` instead.

Run as a script, it serves a FakeEngine through the real ``pairscore serve``
entry point (signals, exit codes, logging), for tests that need a separate
server process::

    python tests/fake_engine.py [--forward-delay S] [--load-delay S] [--load-error oom|crash] \
        -- SERVE FLAGS
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    PrefixPolicy,
    ScoreOptions,
    Side,
    TokenizationMode,
    TokenScore,
)
from pairscore_server.engine.call_size import CallSize
from pairscore_server.engine.interface import Cancelled, Engine, ForwardStats, ScoreCancelled, ScoredBatch
from pairscore_server.engine.prepared import PreparedPair

FAIL_PROMPT = "FAIL"
PREFIX_ID = 0
PROMPT_TOKEN_LOGPROB = -0.5
RESPONSE_TOKEN_LOGPROB = -0.25
#: The fake's forward "chunk": how often a forward delay checks for cancellation.
FORWARD_CHUNK_S = 0.01


class FakeEngineError(RuntimeError):
    """Raised by FakeEngine.score for a batch holding a FAIL_PROMPT pair."""


def cuda_oom(padded: int) -> RuntimeError:
    """The kind of error torch raises when the accelerator runs out of memory."""
    return RuntimeError(
        f"CUDA out of memory. Tried to allocate {padded * 2} MiB. GPU 0 has a total "
        "capacity of 79.11 GiB of which 12.00 MiB is free."
    )


def expected_score(pair: Pair) -> PairScore:
    """What FakeEngine returns for ``pair`` (without per-token detail)."""
    m, n = len(pair.prompt), len(pair.response)
    prompt_lp, cond_lp = PROMPT_TOKEN_LOGPROB * m, RESPONSE_TOKEN_LOGPROB * n
    return PairScore(
        joint_logprob=prompt_lp + cond_lp,
        prompt_logprob=prompt_lp,
        conditional_logprob=cond_lp,
        prompt_tokens=m,
        response_tokens=n,
        id=pair.id,
    )


class FakeEngine(Engine):
    """Implements the Engine protocol with character 'tokens' and fixed log-probs."""

    def __init__(
        self,
        *,
        max_context: int = 64,
        max_batch_tokens: int = 4096,
        forward_delay_s: float = 0.0,
        prepare_delay_s: float = 0.0,
        forward_chunk_s: float = FORWARD_CHUNK_S,
        warmup_gate: threading.Event | None = None,
        score_gate: threading.Event | None = None,
        oom_above_tokens: int | None = None,
        oom_error: Callable[[int], BaseException] = cuda_oom,
        shares_runs: bool = False,
    ) -> None:
        self.max_context = max_context
        self.shares_runs = shares_runs  # size calls as the real engine's trie computes them
        self._max_batch_tokens = max_batch_tokens
        self.forward_delay_s = forward_delay_s
        self.prepare_delay_s = prepare_delay_s  # per pair: a slow tokenizer
        self.forward_chunk_s = forward_chunk_s  # how often a forward delay checks cancellation
        self.warmup_gate = warmup_gate
        self.score_gate = score_gate
        self.oom_above_tokens = oom_above_tokens
        self.oom_error = oom_error
        self.oom_batches: list[tuple[str, ...]] = []
        self.batches: list[tuple[str, ...]] = []
        self.batch_lengths: list[tuple[int, ...]] = []
        self.score_threads: set[str] = set()
        self.cancelled_batches: list[tuple[str, ...]] = []
        self.warmups = 0
        self._lock = threading.Lock()

    @property
    def max_batch_tokens(self) -> int:
        """Token budget of one forward pass (the constructor's ``max_batch_tokens``)."""
        return self._max_batch_tokens

    @property
    def max_call_tokens(self) -> int:
        """One forward pass per call: a batcher's batch is exactly one score() call."""
        return self._max_batch_tokens

    def call_size(self) -> CallSize:
        """With ``shares_runs``, calls sized as the real engine's trie computes them (a run
        shared by several pairs counts once); else every pair costs all its tokens."""
        return CallSize() if self.shares_runs else CallSize(share_prompts=False)

    @property
    def info(self) -> ModelInfo:
        """A fixed description of the fake model."""
        return ModelInfo(
            model_name="fake-model",
            model_source="tests/fake_engine.py",
            revision="0",
            dtype="float32",
            device="cpu",
            max_context_tokens=self.max_context,
            vocab_size=0x110000,
            prefix_policy=PrefixPolicy.DOCUMENT_SEPARATOR,
            prefix_token_id=PREFIX_ID,
            prefix_token="<|endoftext|>",
            tokenizer_class="FakeTokenizer",
            server_version="0.0.0-test",
            default_tokenization=TokenizationMode.SEPARATE,
            architecture="FakeForCausalLM",
        )

    def prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, max_tokens: int | None = None
    ) -> list[PreparedPair | ItemError]:
        """One token per character; pairs over ``max_tokens`` (at most ``max_context``) become
        ItemErrors, INVALID_ARGUMENT below the context (the
        fake takes text pairs only, and neither truncates nor drops the prefix). Takes
        ``prepare_delay_s`` per pair, as a slow tokenizer would."""
        if self.prepare_delay_s:
            time.sleep(self.prepare_delay_s * len(pairs))
        out: list[PreparedPair | ItemError] = []
        for pair in pairs:
            if pair.form_problem or (pair.prompt_messages, pair.prompt_ids, pair.response_ids) != (
                None,
                None,
                None,
            ):
                out.append(
                    ItemError(
                        code=ItemErrorCode.INVALID_ARGUMENT,
                        message=pair.form_problem or "the fake engine scores text pairs only",
                        id=pair.id,
                    )
                )
                continue
            m, n = len(pair.prompt), len(pair.response)
            limit = self.max_context if max_tokens is None else min(max_tokens, self.max_context)
            if 1 + m + n > limit:
                code, where = ItemErrorCode.CONTEXT_LENGTH_EXCEEDED, f"the context is {limit}"
                if limit < self.max_context:
                    code = ItemErrorCode.INVALID_ARGUMENT
                    where = f"this server takes at most {limit} tokens per pair (max_item_tokens)"
                out.append(
                    ItemError(code=code, message=f"pair needs {1 + m + n} tokens; {where}", id=pair.id)
                )
                continue
            offsets = tuple((i, i + 1) for i in range(m)) + tuple((j, j + 1) for j in range(n))
            out.append(
                PreparedPair(
                    id=pair.id,
                    input_ids=(PREFIX_ID, *map(ord, pair.prompt), *map(ord, pair.response)),
                    prompt_tokens=m,
                    response_tokens=n,
                    offsets=offsets,
                    boundary_straddled=False,
                    return_tokens=options.return_tokens,
                )
            )
        return out

    def tokenize(self, texts: Sequence[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """One token per character (its code point), special strings or not."""
        return [tuple(map(ord, t)) for t in texts]

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's character (ids are code points)."""
        return [chr(t) for t in ids]

    @staticmethod
    def prompt_of(prepared: PreparedPair) -> str:
        """The prompt text a prepared pair was made from."""
        return "".join(map(chr, prepared.input_ids[1 : 1 + prepared.prompt_tokens]))

    def score(self, prepared: Sequence[PreparedPair], *, cancelled: Cancelled | None = None) -> ScoredBatch:
        """Sleep ``forward_delay_s``, record the batch, and score it (or raise on FAIL / OOM).

        Its stats are those of one padded batch: every pair padded to the longest.
        The delay is slept in forward "chunks" of ``forward_chunk_s``, checking
        ``cancelled`` before each (ScoreCancelled), as the real engine does between rows.
        """
        started = time.perf_counter()
        prompts = tuple(self.prompt_of(p) for p in prepared)
        padded = max((p.num_tokens for p in prepared), default=0) * len(prepared)
        if self.oom_above_tokens is not None and padded > self.oom_above_tokens:
            with self._lock:
                self.oom_batches.append(prompts)
            raise self.oom_error(padded)
        if self.score_gate is not None and not self.score_gate.wait(timeout=60):
            raise TimeoutError("the test never opened the score gate")
        with self._lock:
            self.batches.append(prompts)
            self.batch_lengths.append(tuple(p.num_tokens for p in prepared))
            self.score_threads.add(threading.current_thread().name)
        end = time.monotonic() + self.forward_delay_s
        while (left := end - time.monotonic()) > 0:
            if cancelled is not None and cancelled():
                with self._lock:
                    self.cancelled_batches.append(prompts)
                raise ScoreCancelled("every caller of this batch left")
            time.sleep(min(left, self.forward_chunk_s))
        if FAIL_PROMPT in prompts:
            raise FakeEngineError("injected failure: the batch holds a FAIL pair")
        scores = [self._score_one(p) for p in prepared]
        stats = ForwardStats(real_tokens=sum(p.num_tokens for p in prepared), padded_tokens=padded)
        return ScoredBatch(scores, stats, (time.perf_counter() - started,))

    def _score_one(self, p: PreparedPair) -> PairScore:
        m, n = p.prompt_tokens, p.response_tokens
        tokens: tuple[TokenScore, ...] = ()
        if p.return_tokens:
            tokens = tuple(
                TokenScore(
                    token_id=tid,
                    text=chr(tid),
                    logprob=PROMPT_TOKEN_LOGPROB if span.side is Side.PROMPT else RESPONSE_TOKEN_LOGPROB,
                    side=span.side,
                    char_start=span.char_start,
                    char_end=span.char_end,
                )
                for tid, span in zip(p.input_ids[1:], p.spans, strict=True)
            )
        return PairScore(
            joint_logprob=PROMPT_TOKEN_LOGPROB * m + RESPONSE_TOKEN_LOGPROB * n,
            prompt_logprob=PROMPT_TOKEN_LOGPROB * m,
            conditional_logprob=RESPONSE_TOKEN_LOGPROB * n,
            prompt_tokens=m,
            response_tokens=n,
            tokens=tokens,
            id=p.id,
        )

    def warmup(self) -> None:
        """Block on ``warmup_gate`` if one was given, then count the warmup."""
        if self.warmup_gate is not None and not self.warmup_gate.wait(timeout=30):
            raise TimeoutError("the test never opened the warmup gate")
        self.warmups += 1


def _serve_main(argv: Sequence[str]) -> int:
    """Serve a FakeEngine through ``pairscore_server.main.main`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="fake_engine.py")
    parser.add_argument("--forward-delay", type=float, default=0.0)
    parser.add_argument("--prepare-delay", type=float, default=0.0)
    parser.add_argument("--forward-chunk", type=float, default=FORWARD_CHUNK_S)
    parser.add_argument("--max-context", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--load-error", choices=("oom", "crash"))
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args(argv)

    def loader(spec: object) -> FakeEngine:
        time.sleep(args.load_delay)
        if args.load_error == "oom":
            raise cuda_oom(1 << 20)
        if args.load_error == "crash":
            raise KeyError("model.layers.0.weight")
        return FakeEngine(
            max_context=args.max_context,
            max_batch_tokens=args.max_batch_tokens,
            forward_delay_s=args.forward_delay,
            prepare_delay_s=args.prepare_delay,
            forward_chunk_s=args.forward_chunk,
        )

    from pairscore_server.main import main

    return main(args.serve_args, engine_loader=loader)


if __name__ == "__main__":
    sys.exit(_serve_main(sys.argv[1:]))
