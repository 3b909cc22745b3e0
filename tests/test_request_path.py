"""Every stage of the request path is bounded, cancellable and fair (issue 22).

Tokenization runs before the tokens are known, so it is budgeted in characters
and runs in chunks that see the deadline and the caller's cancellation
(server/pairscore_server/preparing.py); a candidate set's prompt is tokenized
once; Tokenize stops as soon as its answer is too large; a small request is not
stuck behind a giant one; a batch whose callers all left stops at the engine's
next forward chunk. Each test failed on the code before (the tokenization ran
as one uninterruptible call, FIFO, the prompt once per candidate).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import psutil
import pytest

from pairscore.types import Pair, ScoreOptions, Truncation
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.engine import ScoreCancelled
from pairscore_server.engine.tokenization import PairTokenizer
from pairscore_server.preparing import pair_chunks, request_chars

from harness.fake_engine import FakeEngine
from harness.models import make_engine
from harness.servers import metric_samples
from harness.spy_engine import SpyEngine, word_salad


def _giant(n: int = 64, chars: int = 20_000, *, tag: str = "giant") -> pb.ScoreRequest:
    """``n`` pairs of distinct ``chars``-character prompts (well within the default limits)."""
    return pb.ScoreRequest(
        pairs=[pb.Pair(prompt=word_salad(chars, i), response=" yes", id=f"{tag}-{i}") for i in range(n)],
        options=pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT),
    )


def _small(n: int = 20) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        pairs=[pb.Pair(prompt=f"Question {i}?", response=" Yes.", id=f"small-{i}") for i in range(n)]
    )


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _dropped(text: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in metric_samples(text).items()
        if name == "pairscore_dropped_pairs_total"
    }


# --- units -------------------------------------------------------------------------------


def test_chunks_are_bounded_and_keep_a_shared_prompt_together() -> None:
    prompt = "p" * 50_000
    pairs = [Pair(prompt, f" candidate {i}", id=str(i)) for i in range(200)]
    pairs += [Pair(f"other {i} " + "q" * 5_000, " r") for i in range(20)]
    chunks = pair_chunks(pairs, 16_384)
    assert sorted(i for c in chunks for i in c) == list(range(len(pairs)))
    assert chunks[0] == list(range(200)), "one chunk holds the whole candidate set"
    for chunk in chunks[1:]:
        assert sum(len(pairs[i].prompt) + 2 for i in chunk) <= 16_384 or len(chunk) == 1
    # the request's cost counts the shared prompt once
    assert request_chars(pairs[:200]) == 50_000 + sum(len(p.response) for p in pairs[:200])


def test_a_candidate_sets_prompt_is_tokenized_once(tiny_engine, monkeypatch) -> None:
    prompt = word_salad(30_000, 1)
    pairs = [Pair(prompt, f" candidate {i}", id=str(i)) for i in range(50)]
    options = ScoreOptions(truncation=Truncation.LEFT)
    alone = [tiny_engine.prepare([p], options)[0] for p in pairs[:3]]
    seen: list[int] = []
    original = PairTokenizer._encode_first

    def counting(self: PairTokenizer, texts: Any) -> Any:
        seen.append(sum(len(t) for t in texts))
        return original(self, texts)

    monkeypatch.setattr(PairTokenizer, "_encode_first", counting)
    together = tiny_engine.prepare(pairs, options)
    assert sum(seen) <= len(prompt) + 1, f"the prompt was tokenized {sum(seen) / len(prompt):.0f} times"
    assert together[:3] == alone, "the same PreparedPairs as one pair at a time"


@pytest.mark.parametrize("truncation", [Truncation.NONE, Truncation.LEFT])
def test_a_prompt_shared_by_many_pairs_is_not_copied_into_every_pair_at_once(tiny_engine, truncation) -> None:
    # 200 pairs of one ~100k-token prompt (the OpenAI row: one prompt 500 times).
    # Each pair's x + y ids used to be built for all pairs before any was checked against
    # the context: 318 MiB traced for 200 pairs (1.6 MiB a pair), 800 MiB for 500. Now one
    # pair's at a time: measured 28 MiB, mostly the shared prompt's own tokenization.
    import tracemalloc

    prompt = "a" * 100_000
    pairs = [Pair(prompt, "" if i % 2 else f" {i}", id=str(i)) for i in range(200)]
    tracemalloc.start()
    try:
        out = tiny_engine.prepare(pairs, ScoreOptions(truncation=truncation))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if truncation is Truncation.NONE:
        assert all("but the model's" in o.message for o in out)  # each pair over the context
    else:
        assert all(o.num_tokens == tiny_engine.max_context for o in out)  # truncated to fit
    assert peak < 96 * 2**20, f"tokenizing traced {peak / 2**20:.0f} MiB"


def test_the_engine_stops_a_cancelled_batch_at_the_next_forward_chunk(gpt2_family) -> None:
    model, tokenizer = gpt2_family
    engine = make_engine(model, tokenizer, max_batch_tokens=64, share_prompts=False, share_prefixes=False)
    prepared = engine.prepare([Pair(word_salad(40, i), " yes") for i in range(24)], ScoreOptions())
    forwards = 0

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    hook = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        engine.score(prepared)
        full = forwards
        assert full >= 4, "the batch takes several forward chunks"
        forwards = 0
        with pytest.raises(ScoreCancelled):
            engine.score(prepared, cancelled=lambda: forwards >= 1)
        assert forwards == 1, f"stopped after {forwards} of {full} forward chunks"
    finally:
        hook.remove()


# --- through the server ------------------------------------------------------------------


def test_tokenization_stops_at_the_deadline_and_every_pair_is_counted(tiny_engine, start_server) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy)
    request = _giant()
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as late:
            stub.Score(request, timeout=0.8)
        left = time.monotonic()
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)
        done = spy.prepared("giant")
        assert done < len(request.pairs), "the server stopped tokenizing"
        starts = [start for first, start, _, _ in spy.calls if first.startswith("giant")]
        assert max(starts) <= left + 0.5, "no tokenization started past the caller's deadline"
        time.sleep(0.5)
        assert spy.prepared("giant") == done, "and none runs later"
    assert _dropped(st.metrics_text()) == {"deadline": len(request.pairs)}


def test_tokenization_stops_when_the_caller_leaves_and_every_pair_is_counted(
    tiny_engine, start_server
) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy)
    request = _giant()
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        call = stub.Score.future(request, timeout=60)
        _wait_for(lambda: spy.prepared("giant") > 0)
        call.cancel()
        left = time.monotonic()
        _wait_for(lambda: sum(_dropped(st.metrics_text()).values()) > 0, timeout=10)
        time.sleep(0.5)
        done = spy.prepared("giant")
        assert done < len(request.pairs), "the server stopped tokenizing"
        ends = [end for first, _, end, _ in spy.calls if first.startswith("giant")]
        assert max(ends) - left < 0.5 + max(e - s for _, s, e, _ in spy.calls), "within one chunk"
    assert _dropped(st.metrics_text()) == {"cancelled": len(request.pairs)}


def test_a_small_request_is_not_stuck_behind_a_giant_one(tiny_engine, start_server) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy)
    giant = _giant()
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        big = stub.Score.future(giant, timeout=120)
        _wait_for(lambda: spy.prepared("giant") > 0)
        started = time.monotonic()
        answer = stub.Score(_small(), timeout=30)
        took = time.monotonic() - started
        giant_done = spy.prepared("giant")
        big.cancel()
    assert len(answer.results) == 20
    assert giant_done < len(giant.pairs), "answered while the giant request was still being tokenized"
    assert took < 2.0, f"the small request took {took:.2f} s"


def test_tokenize_stops_once_its_answer_is_too_large(tiny_engine, start_server) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy, max_response_bytes=64 * 1024)
    texts = [word_salad(10_000, i) for i in range(200)]
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as big:
            stub.Tokenize(pb.TokenizeRequest(texts=texts), timeout=60)
    assert big.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_response_bytes" in (big.value.details() or "")
    tokenized = sum(n for first, _, _, n in spy.calls if first == "tokenize")
    assert tokenized < sum(len(t) for t in texts) / 4, "stopped soon after the limit"


def test_the_character_budget_refuses_before_tokenizing(tiny_engine, start_server) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy, max_request_chars=100_000)
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as big:
            stub.Score(_giant(n=8), timeout=30)
        assert big.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "max_request_chars" in (big.value.details() or "")
        # a candidate set's shared prompt counts once: 90k of prompt + 50 candidates fits
        prompt = word_salad(90_000, 7)
        sets = [
            pb.CandidateSet(
                prompt=prompt, candidates=[pb.Candidate(response=f" c{i}") for i in range(50)], id="s"
            )
        ]
        answer = stub.ScoreCandidates(
            pb.ScoreCandidatesRequest(sets=sets, options=pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT)),
            timeout=60,
        )
        assert len(answer.sets[0].results) == 50
    assert spy.prepared("giant") == 0, "nothing of the refused request was tokenized"


def test_one_large_request_grows_the_server_by_a_bounded_amount(tiny_engine, start_server) -> None:
    st = start_server(tiny_engine)
    process = psutil.Process()
    prompt = word_salad(100_000, 3)
    sets = [
        pb.CandidateSet(
            prompt=prompt, candidates=[pb.Candidate(response=f" candidate {i}") for i in range(200)], id="s"
        )
    ]
    request = pb.ScoreCandidatesRequest(sets=sets, options=pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT))
    before = process.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    with grpc.insecure_channel(st.target) as channel:
        answer = pb_grpc.ScoringServiceStub(channel).ScoreCandidates(request, timeout=120)
    took = time.monotonic() - started
    stop.set()
    sampler.join()
    assert len(answer.sets[0].results) == 200
    growth = (peak - before) / 2**20
    print(f"ScoreCandidates 100k-char prompt x 200: {took:.2f} s, RSS growth {growth:.0f} MiB")
    assert growth <= 512, f"RSS grew {growth:.0f} MiB"


def test_a_batch_whose_callers_all_left_frees_the_model_thread(start_server) -> None:
    engine = FakeEngine(max_context=64, forward_delay_s=5.0)
    st = start_server(engine)
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        doomed = stub.Score.future(_small(2), timeout=60)
        _wait_for(lambda: st.server.batcher.busy_seconds > 0)
        doomed.cancel()
        engine.forward_delay_s = 0.0
        started = time.monotonic()
        stub.Score(_small(1), timeout=30)
        took = time.monotonic() - started
    assert took < 2.5, f"the next request waited {took:.2f} s for a forward pass nobody wanted"
    assert engine.cancelled_batches, "the engine was told to stop"
