"""Issue 22's gRPC requests against the in-process test server on the tiny GPT-2-style model.

For each request (scaled down from the issue's table: a 100000-character
prompt with 20 candidates, 24 prompts of 100000 characters, 64 Tokenize texts
of 50000 characters) it prints: how it ended and when, how long the server went
on tokenizing past the caller's deadline, the process's RSS growth, and how
long a 20-pair ``Score`` sent 0.5 s later took. The figures in
docs/reliability.md come from it::

    PYTHONPATH=client:server .venv/bin/python bench/request_path.py .
"""

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] + "/tests")
import grpc
import psutil

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.models import build_bpe_tokenizer, build_gpt2_model, make_engine
from harness.servers import ServerThread
from harness.spy_engine import SpyEngine, word_salad

tok = build_bpe_tokenizer(Path(tempfile.mkdtemp()))
spy = SpyEngine(make_engine(build_gpt2_model(len(tok)), tok))
st = ServerThread(spy).start()
proc = psutil.Process()
small = pb.ScoreRequest(pairs=[pb.Pair(prompt=f"Question {i}?", response=" Yes.") for i in range(20)])
LEFT = pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT)
prompt = word_salad(100_000, 0)
rows = {
    "ScoreCandidates 100k-char prompt x 20 candidates, left, 3 s": (
        "ScoreCandidates",
        pb.ScoreCandidatesRequest(
            sets=[
                pb.CandidateSet(
                    prompt=prompt, candidates=[pb.Candidate(response=f" c{i}") for i in range(20)]
                )
            ],
            options=LEFT,
        ),
        3.0,
    ),
    "Score 24 x 100k-char prompts, left, 2 s": (
        "Score",
        pb.ScoreRequest(
            pairs=[pb.Pair(prompt=word_salad(100_000, i), response=" y") for i in range(24)], options=LEFT
        ),
        2.0,
    ),
    "Tokenize 64 x 50k-char texts, 5 s": (
        "Tokenize",
        pb.TokenizeRequest(texts=[word_salad(50_000, i) for i in range(64)]),
        5.0,
    ),
}
with grpc.insecure_channel(st.target) as ch:
    stub = pb_grpc.ScoringServiceStub(ch)
    for name, (method, req, timeout) in rows.items():
        time.sleep(1.0)
        before = proc.memory_info().rss
        peak = before
        stop = threading.Event()

        def sample(stop: threading.Event = stop) -> None:
            global peak
            while not stop.is_set():
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.01)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        start = time.monotonic()
        fut = getattr(stub, method).future(req, timeout=timeout)
        time.sleep(0.5)
        s0 = time.monotonic()
        try:
            stub.Score(small, timeout=120)
            small_s = f"{time.monotonic() - s0:.2f}"
        except grpc.RpcError as e:
            small_s = e.code().name
        try:
            fut.result()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        left = time.monotonic()
        while spy.busy:
            time.sleep(0.01)
        after = max(0.0, spy.last_end - (start + timeout))
        stop.set()
        th.join()
        print(
            f"| {name} | {code} at {left - start:.1f} s | {after:.1f} s past the deadline | {(peak - before) / 2**20:.0f} MiB | {small_s} s |",
            flush=True,
        )
st.stop()
