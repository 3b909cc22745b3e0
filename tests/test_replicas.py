"""Several model replicas behind one engine interface (multi-GPU workers), exercised on CPU."""

from __future__ import annotations

from typing import Any

import pytest

from pairscore.types import Pair, PairScore, ScoreOptions
from pairscore_server.engine.loading import load_engine, resolve_devices
from pairscore_server.engine.replicas import ReplicatedEngine
from pairscore_server.engine.spec import ModelSpec

from harness.models import make_engine
from harness.scoring import assert_same_scores, mixed_pairs


@pytest.fixture(scope="module")
def replicated(gpt2_family):
    model, tokenizer = gpt2_family
    return ReplicatedEngine([make_engine(model, tokenizer), make_engine(model, tokenizer)])


def test_replicas_score_like_one_engine(replicated, tiny_engine):
    pairs = mixed_pairs(24, seed=11) + [Pair("shared prompt", f" answer {i}") for i in range(6)]
    options = ScoreOptions(return_tokens=True)
    scored = replicated.score(replicated.prepare(pairs, options))
    want = tiny_engine.score_pairs(pairs, options)
    for a, b in zip(scored.scores, want, strict=True):
        assert isinstance(a, PairScore)
        assert_same_scores(a, b)
    assert len(scored.replica_seconds) == 2
    assert all(s > 0 for s in scored.replica_seconds), "both replicas worked"
    assert scored.stats.reused_tokens > 0, "the shared prompt still ran once"


def test_split_keeps_shared_prompts_together_and_balances_tokens(replicated):
    pairs = [Pair("same prompt here", f" r{i}") for i in range(5)] + mixed_pairs(20, seed=12)
    prepared = replicated.prepare(pairs, ScoreOptions())
    parts = replicated.split(prepared)
    assert sorted(i for part in parts for i in part) == list(range(len(pairs)))
    holder = [k for k, part in enumerate(parts) if 0 in part][0]
    assert all(i in parts[holder] for i in range(5))
    loads = [sum(prepared[i].num_tokens for i in part) for part in parts]
    biggest_item = max(p.num_tokens for p in prepared)
    assert abs(loads[0] - loads[1]) <= max(biggest_item, sum(prepared[i].num_tokens for i in range(5)))


def test_interface_facts(replicated):
    assert replicated.max_call_tokens == 2 * replicated.engines[0].max_call_tokens
    assert replicated.max_batch_tokens == replicated.engines[0].max_batch_tokens
    assert replicated.info.device == "cpu,cpu"
    replicated.warmup()


def test_workers_flag_loads_replicas(gpt2_family, tmp_path):
    model, tokenizer = gpt2_family
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    engine: Any = load_engine(ModelSpec(model=str(tmp_path), device="cpu", workers=2))
    assert isinstance(engine, ReplicatedEngine) and len(engine.engines) == 2
    assert engine.engines[0].model is not engine.engines[1].model
    [res] = engine.score_pairs([Pair("a", " b")])
    assert isinstance(res, PairScore)


def test_device_lists():
    import torch

    assert [str(d) for d in resolve_devices("cpu", 3)] == ["cpu", "cpu", "cpu"]
    if not torch.cuda.is_available():
        from pairscore_server.engine.spec import ModelLoadError

        with pytest.raises(ModelLoadError):
            resolve_devices("cuda:0,cuda:1")
