"""Issue 22's gRPC requests against the in-process test server.

For each request it prints: how it ended and when, how long the server went
on tokenizing past the caller's deadline, the process's RSS growth, and how
long a 20-pair ``Score`` sent 0.5 s later took. The figures in
docs/reliability.md come from it.

On the tiny GPT-2-style model (the default) the requests are the issue's table
scaled down (a 100000-character prompt with 20 candidates, 24 prompts of
100000 characters, 64 Tokenize texts of 50000 characters)::

    PYTHONPATH=client:server .venv/bin/python bench/request_path.py .

``--model smollm2`` serves the embedded SmolLM2-135M-Instruct (CPU, float32)
with the issue's own sizes (200 candidates, 150 prompts; Tokenize with 320
texts of 50000 characters, the most the default --max-request-chars takes,
and the issue's 1024, which that budget refuses before any work)::

    PYTHONPATH=client:server .venv/bin/python bench/request_path.py . --model smollm2
"""

import argparse
import gzip
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1] + "/tests")
import grpc
import psutil

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.models import build_bpe_tokenizer, build_gpt2_model, make_engine
from harness.openai_http import http_call, openai_url
from harness.servers import ServerThread
from harness.spy_engine import SpyEngine, word_salad

parser = argparse.ArgumentParser()
parser.add_argument("repo")
parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
args = parser.parse_args()
if args.model == "tiny":
    tok = build_bpe_tokenizer(Path(tempfile.mkdtemp()))
    engine = make_engine(build_gpt2_model(len(tok)), tok)
    candidates, prompts, texts = 20, 24, 64
else:
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    engine = load_engine(ModelSpec(device="cpu", dtype="float32"))
    candidates, prompts, texts = 200, 150, 320
spy = SpyEngine(engine)
st = ServerThread(spy, openai_port=0).start()
proc = psutil.Process()
small = pb.ScoreRequest(pairs=[pb.Pair(prompt=f"Question {i}?", response=" Yes.") for i in range(20)])
LEFT = pb.ScoreOptions(truncation=pb.TRUNCATION_LEFT)
prompt = word_salad(100_000, 0)
rows = {
    f"ScoreCandidates 100k-char prompt x {candidates} candidates, left, 3 s": (
        "ScoreCandidates",
        pb.ScoreCandidatesRequest(
            sets=[
                pb.CandidateSet(
                    prompt=prompt, candidates=[pb.Candidate(response=f" c{i}") for i in range(candidates)]
                )
            ],
            options=LEFT,
        ),
        3.0,
    ),
    f"Score {prompts} x 100k-char prompts, left, 2 s": (
        "Score",
        pb.ScoreRequest(
            pairs=[pb.Pair(prompt=word_salad(100_000, i), response=" y") for i in range(prompts)],
            options=LEFT,
        ),
        2.0,
    ),
    f"Tokenize {texts} x 50k-char texts, 5 s": (
        "Tokenize",
        pb.TokenizeRequest(texts=[word_salad(50_000, i) for i in range(texts)]),
        5.0,
    ),
}
if args.model == "smollm2":  # the issue's own Tokenize row: over the character budget
    rows["Tokenize 1024 x 50k-char texts, 5 s"] = (
        "Tokenize",
        pb.TokenizeRequest(texts=[word_salad(50_000, i) for i in range(1024)]),
        5.0,
    )
with grpc.insecure_channel(st.target) as ch:
    stub = pb_grpc.ScoringServiceStub(ch)
    for _ in range(3):  # the small request alone, for comparison (the last of three)
        s0 = time.monotonic()
        stub.Score(small, timeout=120)
        alone = time.monotonic() - s0
    print(f"the 20-pair Score alone: {alone:.2f} s", flush=True)
    details = []
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
            details.append(f"{name}: {code}: {(e.details() or '')[:300]}")
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
    print("\n".join(details))

# The OpenAI row: a 50 MB body of 500 prompts x 100000 characters (distinct, and
# one prompt 500 times), and 5 of them gzip'd (small on the wire). How each ended, when, and the process's RSS growth.
url = f"{openai_url(st)}/completions"
body = {"model": engine.info.model_name, "echo": True, "max_tokens": 0, "logprobs": 0}
big = json.dumps({**body, "prompt": [word_salad(100_000, i) for i in range(500)]}).encode()
same = json.dumps({**body, "prompt": ["a" * 100_000] * 500}).encode()
small_gz = gzip.compress(json.dumps({**body, "prompt": ["a" * 100_000] * 5}).encode())
for name, raw, headers in (
    (f"OpenAI: {len(big) / 1e6:.0f} MB body, 500 distinct prompts x 100k chars", big, {}),
    (f"OpenAI: {len(same) / 1e6:.0f} MB body, one 100k-char prompt 500 times", same, {}),
    (f"OpenAI: {len(small_gz)} bytes gzip'd, 5 prompts x 100k chars", small_gz, {"Content-Encoding": "gzip"}),
):
    time.sleep(1.0)
    before = peak = proc.memory_info().rss
    start = time.monotonic()
    result: list[object] = []
    th = threading.Thread(
        target=lambda result=result, raw=raw, headers=headers: result.append(
            http_call(url, raw=raw, headers=headers, timeout=120)
        )
    )
    th.start()
    while th.is_alive():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.01)
    answer: Any = result[0]
    took = time.monotonic() - start
    while spy.busy:
        time.sleep(0.01)
    work = max(0.0, spy.last_end - start)
    error = answer.body.get("error", {}) if isinstance(answer.body, dict) else {}
    print(
        f"| {name} | {answer.status} {error.get('code', '')} at {took:.1f} s | tokenizer work ended "
        f"{work:.1f} s after the start | {(peak - before) / 2**20:.0f} MiB | {str(error.get('message', ''))[:160]} |",
        flush=True,
    )
st.stop()
