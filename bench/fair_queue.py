"""A small request beside a large one, in the in-process test server on the tiny GPT-2-style model.

A large ``Score`` request (``LARGE`` pairs of distinct prompts of about the
tiny model's context, so its time is spent in the batching queue and the
model rather than the tokenizer) is sent; once its pairs are queued (``pairscore_queue_pairs`` > 0), a
small ``Score`` of ``SMALL`` pairs is sent, and the time until the small one is
answered is taken, beside the large one's. The figures in docs/reliability.md
(fairness) come from it; run it on a tree before and after a change::

    PYTHONPATH=client:server .venv/bin/python bench/fair_queue.py . [rounds]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] + "/tests")
import grpc

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.models import build_bpe_tokenizer, build_gpt2_model, make_engine
from harness.servers import ServerThread, metric_samples

LARGE, SMALL = 1000, 3  # within the default --max-pairs-per-request (1024)
FILLER = "The quick brown fox jumps over the lazy dog near the river bank. " * 4
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3

tok = build_bpe_tokenizer(Path(tempfile.mkdtemp()))
st = ServerThread(make_engine(build_gpt2_model(len(tok)), tok)).start()


def queued() -> float:
    samples = metric_samples(st.metrics_text())
    return sum(v for (name, _), v in samples.items() if name == "pairscore_queue_pairs")


def batches() -> float:
    samples = metric_samples(st.metrics_text())
    return sum(v for (name, _), v in samples.items() if name == "pairscore_batch_pairs_count")


small_s, large_s, small_batches, large_batches = [], [], [], []
with grpc.insecure_channel(st.target) as ch:
    stub = pb_grpc.ScoringServiceStub(ch)
    for r in range(ROUNDS):
        large = pb.ScoreRequest(
            pairs=[
                pb.Pair(prompt=f"{FILLER} Round {r}, question {i}: is it so?", response=" Yes, it is.")
                for i in range(LARGE)
            ],
            options=pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT),  # the tiny model's context is 128
        )
        small = pb.ScoreRequest(
            pairs=[pb.Pair(prompt=f"Small {r}.{i}?", response=" Yes.") for i in range(SMALL)]
        )
        b0 = batches()
        started = time.monotonic()
        fut = stub.Score.future(large, timeout=600)
        while queued() == 0:
            if fut.done():
                fut.result()  # raises what refused it
            time.sleep(0.005)
        s0, sb = time.monotonic(), batches()
        assert len(stub.Score(small, timeout=600).results) == SMALL
        small_s.append(time.monotonic() - s0)
        small_batches.append(batches() - sb)
        assert len(fut.result().results) == LARGE
        large_s.append(time.monotonic() - started)
        large_batches.append(batches() - b0)
        print(
            f"round {r}: small {small_s[-1]:.3f} s ({small_batches[-1]:.0f} batches ran meanwhile), "
            f"large {large_s[-1]:.2f} s ({large_batches[-1]:.0f} batches)",
            flush=True,
        )
print(
    f"median: small request ({SMALL} pairs) {statistics.median(small_s):.3f} s, "
    f"{statistics.median(small_batches):.0f} batches; large request ({LARGE} pairs) "
    f"{statistics.median(large_s):.2f} s, {statistics.median(large_batches):.0f} batches"
)
st.stop()
