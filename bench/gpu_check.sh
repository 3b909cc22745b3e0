#!/usr/bin/env bash
# The GPU checks of pairscore, as one short script for a machine with a CUDA GPU
# (the project's CI has none). Needs torch with CUDA and transformers already
# installed (as on the lent H100/H200 machines); installs the rest without deps.
# Writes logs under ${OUT:-./gpu-check-out}. About 5-8 minutes on one H200.
set -uo pipefail
out=${OUT:-./gpu-check-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/client:$PWD/server${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# 1. GPU tier tests and the engine math on CUDA-capable torch (CPU math tests still run on CPU).
python3 -m pytest -q tests/test_cuda.py tests/test_engine_math.py 2>&1 | tee "$out/tests.log"
# 2. Throughput on SmolLM2-135M in bf16: engine, gRPC and lm-eval (auto batch size) on the same card.
python3 bench/throughput.py --model smollm2 --device cuda --dtype bfloat16 --pairs 512 \
    --methods naive_one,lmeval,engine,grpc --peak-tflops "${PEAK_TFLOPS:-989}" \
    --json "$out/bench-smollm2.json" 2>&1 | grep -v Warning | tee "$out/bench.log"
# 3. Packed rows vs padded batches on CUDA (auto = padded there until this says otherwise).
python3 bench/throughput.py --model smollm2 --device cuda --dtype bfloat16 --pairs 512 \
    --methods engine,engine_padded --packing on --peak-tflops "${PEAK_TFLOPS:-989}" \
    --json "$out/bench-packing.json" 2>&1 | grep -v Warning | tee "$out/bench-packing.log"
