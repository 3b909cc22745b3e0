#!/usr/bin/env bash
# The GPU check of pairscore, as one device call on a lent GPU machine (docs/gpu-check.md).
#
#   bash bench/gpu_prepare.sh                 # here, first: fills .gpu-carry/ (wheels, tokenizer)
#   bash bench/gpu_check.sh                   # there: carry [".gpu-carry"], timeout_s 540
#   bash bench/gpu_check.sh --device cpu      # the CPU rehearsal on tiny shapes (make gpu-rehearsal)
#
# The lent machine reaches no registry and no hub. This installs the carried
# pure-python wheels with pip --no-index --no-deps --target (and the carried
# grpcio/protobuf only where the machine's own are older than the stubs need),
# builds its models on the device from configs with random weights (SmolLM2-135M's
# shape and a 1B Llama shape, with the carried SmolLM2 tokenizer), runs the GPU
# tests and the benchmark, and writes every figure to $OUT (7 files, read back
# by the device tool): summary.md (paste into docs), env.txt, steps.tsv,
# tests.log, bench.log, bench-small.json, bench-large.json.
#
# Every step has its own `timeout`; the limits add up to 450 s, so one hang
# cannot eat the lease. Exit status: 0 when every step passed and every method
# ran (lmeval may be skipped with a message when lm-eval was not carried).
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
carry=.gpu-carry
out=${OUT:-./gpu-check-out}
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --carry) carry=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--device cuda|cpu] [--carry DIR] [--out DIR]" >&2; exit 2 ;;
    esac
done
py=${PYTHON:-python3}
[ -d "$carry" ] && carry=$(cd "$carry" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
: > "$out/steps.tsv"; : > "$out/bench.log"; : > "$out/env.txt"; : > "$out/tests.log"
rm -f "$out/bench-small.json" "$out/bench-large.json" "$out/summary.md"

if [ "$device" = cpu ]; then
    # The rehearsal: the same steps on shapes a 2-core machine runs in a minute or two.
    small=llama-tiny-random; large=llama-tiny-random; dtype=float32; peak=0
    small_args=(--pairs 8 --shared 2x4); large_args=(--pairs 8 --shared off)
    # Each workload's methods in one child process (--one-child): the same parent and
    # child code as the GPU's one child per method, one Python, torch and transformers
    # start-up per workload instead of per method.
    bench_args=(--gemm-seconds 0.2 --child-timeout 150 --one-child)
    # bench-large is bench-small's model again here: its lm-eval child (8-10 s of CI)
    # would rehearse nothing that bench-small has not.
    large_methods=naive_one,engine_packed,engine_padded
    # The limits are the GPU plan's; a shared 2-core CI machine under load has taken
    # 85 s of the tests' 120 and 142 s of bench-small's 170, so the rehearsal gives
    # each step 3 times its limit: it tests the steps, not the H200's speed.
    scale=${GPU_CHECK_LIMIT_SCALE:-3}
    # torch's CPU threads sleep when idle instead of spinning (as in tests/conftest.py):
    # make check runs this beside lint, and spinning threads then starve both.
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
else
    # SmolLM2-135M's shape (every method on distinct prompts, the engine and the naive loop
    # on shared ones), then a 1B Llama shape where the GPU does real work (distinct only).
    small=smollm2-random; large=llama-1b-random; dtype=bfloat16; peak=${PEAK_TFLOPS:-989}
    small_args=(--pairs 512 --shared 64x8); large_args=(--pairs 512 --shared off)
    bench_args=(--gemm-seconds 0.5 --child-timeout 60)
    large_methods=naive_one,lmeval,engine_packed,engine_padded
    scale=${GPU_CHECK_LIMIT_SCALE:-1}
fi
small_methods=naive_one,lmeval,engine_packed,engine_padded,grpc
# On shared prompts: the engine's two layouts (what sharing a prompt buys each) and the naive baseline.
shared_methods=naive_one,engine_packed,engine_padded

site=$(mktemp -d "${TMPDIR:-/tmp}/pairscore-gpu-site.XXXXXX")
trap 'rm -rf "$site"' EXIT
export PYTHONPATH="$site:$PWD/client:$PWD/server${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()

# step NAME LIMIT_S LOG CMD...: runs CMD under its own timeout, output to LOG and the
# terminal, one line (name, exit status, seconds, limit) in steps.tsv.
step() {
    local name=$1 limit=$(($2 * scale)) log=$3 t0=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    # timeout runs programs: a function of this script runs in a child bash (export -f).
    if declare -F "$1" >/dev/null; then set -- bash -c "$*"; fi
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: timed out after ${limit}s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$out/steps.tsv"
    [ "$rc" = 0 ] || failed+=("$name")
    return "$rc"
}

install_carried() {
    set -e
    [ -f "$carry/.prepared" ] || { echo "no $carry/.prepared: run bash bench/gpu_prepare.sh here first"; exit 1; }
    # As the device README says: no index, no deps, into a target put first on PYTHONPATH.
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$carry"/wheels/*.whl
    # grpcio/protobuf for cp312: only where the machine's own are under the stubs' floors.
    mapfile -t older < <("$py" bench/gpu_carry.py older "$carry")
    if [ ${#older[@]} -gt 0 ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${older[@]}"
    fi
    ls "$site"
}

probe_env() {
    if [ "$device" != cpu ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    fi
    "$py" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "tokenizers", "accelerate", "grpcio", "protobuf",
             "grpcio-health-checking", "grpcio-reflection", "gguf", "lm-eval", "prometheus-client"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import torch
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import grpc_health, grpc_reflection, pairscore_server.lifecycle, pairscore_server.health  # the server's imports
print("pairscore server imports ok")
try:  # what the benchmark's lmeval method imports
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    print("lm-eval imports ok")
except Exception as exc:
    print(f"lm-eval does not import: {exc!r}")
EOF
}
export -f install_carried probe_env
export py carry site device out

summarize() {
    step summary 10 "$out/bench.log" "$py" bench/gpu_summary.py "$out" \
        --require "bench-small.json:distinct=$small_methods" --require "bench-small.json:shared=$shared_methods" \
        --require "bench-large.json:distinct=$large_methods"
    cat "$out/summary.md" 2>/dev/null
    if [ ${#failed[@]} -gt 0 ]; then
        echo "gpu_check: failed steps: ${failed[*]} (see $out)"
        exit 1
    fi
    echo "gpu_check: all steps passed in ${SECONDS}s; results in $out"
}

# Without the carried wheels nothing else can import (the client needs grpc_health): stop.
step install 30 "$out/env.txt" install_carried || summarize
step env 20 "$out/env.txt" probe_env
if ! grep -q "^lm-eval imports ok" "$out/env.txt"; then
    echo "lm-eval does not import from $carry (see env.txt): the lmeval method is skipped" | tee -a "$out/env.txt"
    small_methods=${small_methods/lmeval,/}; large_methods=${large_methods/lmeval,/}
fi
# GPU tests (CUDA vs the CPU float32 engine and a float64 reference; skipped without CUDA)
# and the engine math, which runs on the CPU anywhere.
export PAIRSCORE_GPU_TOKENIZER="$carry/tokenizer"
step tests 120 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -o addopts="-rA" \
    tests/test_cuda.py tests/test_engine_math.py
step bench-small 170 "$out/bench.log" "$py" bench/throughput.py --model "$small" --tokenizer "$carry/tokenizer" \
    --device "$device" --dtype "$dtype" --methods "$small_methods" --peak-tflops "$peak" \
    --shared-methods "$shared_methods" "${small_args[@]}" "${bench_args[@]}" --json "$out/bench-small.json"
step bench-large 100 "$out/bench.log" "$py" bench/throughput.py --model "$large" --tokenizer "$carry/tokenizer" \
    --device "$device" --dtype "$dtype" --methods "$large_methods" --peak-tflops "$peak" \
    "${large_args[@]}" "${bench_args[@]}" --json "$out/bench-large.json"
summarize
