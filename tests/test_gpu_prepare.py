"""The GPU check's preparation, without a GPU and without network (docs/gpu-check.md).

What the lent GPU machine runs (bench/gpu_check.sh) is rehearsed whole on the CPU
by `make gpu-rehearsal`; these are the cheap checks: the random-weight presets
build and have the shapes they claim, every step of the check has its own
timeout within the 8-minute plan, the carried folder's checks (pins, pure-python
wheels, size budget) and the summary writer.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"pairscore_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _load("throughput")


@pytest.fixture(scope="module")
def gpu_carry():
    return _load("gpu_carry")


# --- the random-weight presets -------------------------------------------------------


@pytest.mark.parametrize("name, params", [("smollm2-random", 134.5e6), ("llama-1b-random", 1.074e9)])
def test_gpu_shapes_have_their_parameter_counts(throughput, name, params):
    """Built on the meta device: the shape without the memory (SmolLM2-135M: 134.5M parameters)."""
    model = throughput.build_random_llama(name, 49152, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(params, rel=0.01)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tiny_preset_builds_on_cpu_seeded_and_scores(throughput):
    a = throughput.build_random_llama("llama-tiny-random", 300)
    b = throughput.build_random_llama("llama-tiny-random", 300)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)  # every child process of one benchmark run gets the same weights
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        logits = a(ids).logits
    assert logits.shape == (2, 17, 300) and torch.isfinite(logits).all()
    # The presets keep their shapes when overridden for a small copy (dims, not values).
    small = throughput.build_random_llama(
        "smollm2-random", 300, num_hidden_layers=1, hidden_size=72, intermediate_size=96
    )
    assert small.config.num_attention_heads == 9 and small.config.num_key_value_heads == 3
    assert small.config.rope_parameters["rope_theta"] == 100000.0


def test_smollm2_preset_matches_the_embedded_gguf_config(throughput):
    """The same check bench/gpu_prepare.sh makes, where the embedded model is installed."""
    pytest.importorskip("gguf")
    from transformers import AutoConfig

    from pairscore_server.engine.loading import ModelLoadError, embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    real = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    preset = throughput.llama_config("smollm2-random", real.vocab_size)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(preset, key) == getattr(real, key), key
    assert preset.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert preset.rms_norm_eps == pytest.approx(real.rms_norm_eps, rel=1e-6)


# --- bench/gpu_check.sh: a timeout on every step, within the 8-minute plan ---------


def _logical_lines(text: str) -> list[str]:
    out, buf = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def test_every_step_of_the_gpu_check_has_its_own_timeout():
    text = (BENCH / "gpu_check.sh").read_text()
    lines = _logical_lines(text)
    # Functions and the lines inside them.
    functions: dict[str, list[str]] = {}
    current = None
    top = []
    heredoc = None
    for line in lines:
        if heredoc:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if current is None and (m := re.match(r"^(\w+)\(\) \{", line)):
            current = m.group(1)
            functions[current] = []
            continue
        if current is not None:
            if line.startswith("}"):
                current = None
            else:
                functions[current].append(line)
                if m := re.search(r"<<'?(\w+)'?", line):
                    heredoc = m.group(1)
            continue
        top.append(line)
    steps = [
        m
        for line in [*top, *(line for body in functions.values() for line in body)]
        if (m := re.match(r"^\s*step (\S+) (\d+) ", line))
    ]
    names = sorted(m.group(1) for m in steps)
    assert names == sorted(["install", "env", "tests", "bench-small", "bench-large", "summary"])
    assert sum(int(m.group(2)) for m in steps) <= 8 * 60 - 30, "the limits must fit 8 minutes with a margin"
    assert 'timeout -k 10 "$limit" "$@"' in "\n".join(functions["step"])

    runs_something = re.compile(r'"\$py" |nvidia-smi |^\s*python3? |\bpytest\b')
    called_by_step = {
        m.group(1) for line in top if (m := re.match(r"^\s*step \S+ \d+ \S+ (\w+)\s*(\|\|.*)?$", line))
    }
    for name, body in [("", top), *functions.items()]:
        if name == "step" or name in called_by_step:
            continue
        for line in body:
            code = line.split("#", 1)[0]
            if runs_something.search(code) and not code.lstrip().startswith("echo"):
                assert re.search(r"^\s*step |timeout ", code), (
                    f"{name or 'top level'}: runs outside a step: {line!r}"
                )
    # The bench steps bound each method too, so one hung method cannot take the whole step.
    assert "--child-timeout" in text


def test_gpu_check_and_prepare_scripts_parse():
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


# --- the carried folder's checks -----------------------------------------------------


def _fake_wheel(folder: Path, filename: str, requires=(), size: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    name, version = filename.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        if size:
            zf.writestr("padding.bin", b"\0" * size)  # stored, not compressed: size counts
    return path


def _fake_carry(gpu_carry, root: Path) -> Path:
    carry = root / ".gpu-carry"
    for name, version in gpu_carry.PURE.items():
        requires = ["numpy", "datasets>=2.16.0", "rouge-score; extra == 'math'"] if name == "lm-eval" else []
        _fake_wheel(carry / "wheels", f"{name.replace('-', '_')}-{version}-py3-none-any.whl", requires)
    for name, (version, _) in gpu_carry.COMPILED.items():
        _fake_wheel(carry / "wheels-cp312", f"{name}-{version}-cp312-cp312-manylinux_2_17_x86_64.whl")
    (carry / "tokenizer").mkdir()
    (carry / "tokenizer" / "tokenizer.json").write_text("{}")
    return carry


def test_carry_check_passes_on_the_pinned_set(gpu_carry, tmp_path, capsys):
    carry = _fake_carry(gpu_carry, tmp_path)
    assert gpu_carry.check(carry) == 0
    out = capsys.readouterr().out
    assert re.search(r"carried [\d.]+ MiB \+ working tree [\d.]+ MiB = [\d.]+ MiB of the 64 MiB", out)
    # lm-eval's unconditional needs that the machine lacks are named; extras are not.
    assert "datasets" in out and "rouge-score" not in out


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "want gguf==0.19.0, found None"),
        ("two-versions", "two wheels of gguf"),
        ("compiled-in-pure", "is not pure python"),
        ("unpinned", "is not pinned"),
        ("no-tokenizer", "tokenizer/tokenizer.json missing"),
    ],
)
def test_carry_check_fails_on_a_broken_set(gpu_carry, tmp_path, capsys, damage, message):
    carry = _fake_carry(gpu_carry, tmp_path)
    gguf = next((carry / "wheels").glob("gguf-*.whl"))
    if damage == "missing":
        gguf.unlink()
    elif damage == "two-versions":
        _fake_wheel(carry / "wheels", "gguf-0.18.0-py3-none-any.whl")
    elif damage == "compiled-in-pure":
        _fake_wheel(carry / "wheels", "xxhash-4.1.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    elif damage == "unpinned":
        _fake_wheel(carry / "wheels", "dill-0.4.1-py3-none-any.whl")
    elif damage == "no-tokenizer":
        (carry / "tokenizer" / "tokenizer.json").unlink()
    assert gpu_carry.check(carry) == 1
    assert message in capsys.readouterr().err


def test_size_budget(gpu_carry, tmp_path, monkeypatch, capsys):
    mib = gpu_carry.MIB
    ok, line = gpu_carry.budget(20 * mib, 1 * mib)
    assert ok and "21.0 MiB of the 64 MiB" in line
    assert gpu_carry.BUDGET_MIB < gpu_carry.LIMIT_MIB
    ok, line = gpu_carry.budget(gpu_carry.BUDGET_MIB * mib, 1)
    assert not ok and "OVER BUDGET" in line
    # check() fails when the carried folder and the tree are over the budget.
    carry = _fake_carry(gpu_carry, tmp_path)
    _fake_wheel(carry / "wheels-cp312", "bulk-1.0-cp312-cp312-manylinux_2_17_x86_64.whl", size=3 * mib)
    monkeypatch.setattr(gpu_carry, "BUDGET_MIB", 2)
    assert gpu_carry.check(carry) == 1
    captured = capsys.readouterr()
    assert "OVER BUDGET" in captured.out and "over the size budget" in captured.err


def test_tree_bytes_counts_what_travels(gpu_carry, tmp_path):
    """Tracked and untracked-not-ignored files travel; ignored ones (the carry itself) do not."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.gpu-carry/\n")
    (repo / "tracked.txt").write_bytes(b"x" * 1000)
    (repo / "untracked.txt").write_bytes(b"y" * 500)
    (repo / ".gpu-carry").mkdir()
    (repo / ".gpu-carry" / "big.whl").write_bytes(b"z" * 100_000)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.txt", ".gitignore"], check=True)
    assert gpu_carry.tree_bytes(repo) == 1000 + 500 + len("/.gpu-carry/\n")


def test_repo_ignores_the_carry_and_the_rehearsal_venv():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/.gpu-carry/" in ignored and "/.gpu-rehearsal-venv/" in ignored
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-rehearsal:", makefile, re.M)


def test_older_installs_only_under_the_floor(gpu_carry, tmp_path, monkeypatch, capsys):
    carry = _fake_carry(gpu_carry, tmp_path)
    versions = {"grpcio": "1.80.0", "protobuf": "7.36.2"}
    monkeypatch.setattr("importlib.metadata.version", lambda name: versions[name])
    assert gpu_carry.older(carry) == 0
    out = capsys.readouterr().out.split()
    assert [Path(p).name.split("-")[0] for p in out] == ["grpcio"]


# --- bench/gpu_summary.py ---------------------------------------------------------------


def _bench_json(methods):
    row = {
        "tokens_per_s": 1000.0,
        "pairs_per_s": 5.0,
        "ideal_fraction": 0.5,
        "peak_rss_gib": 1.0,
        "cuda_max_allocated_gib": 2.0,
        "over_weights_gib": 0.5,
        "mfu": 0.1,
    }
    summary = {m: dict(row) for m in methods}
    if "engine_packed" in summary:
        summary["engine_packed"]["max_diff_vs_engine_padded"] = [1e-6, 2e-6]
    return {
        "meta": {
            "model": "smollm2-random",
            "device": "cuda",
            "dtype": "bfloat16",
            "devices": ["NVIDIA H200"],
        },
        "distinct": summary,
    }


def test_summary_writes_markdown_and_checks_methods(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.tsv").write_text("install\t0\t3\t30\ntests\t124\t90\t90\n")
    (out / "env.txt").write_text("python 3.12.3 /opt/torch/.venv/bin/python3\ntorch 2.11.0+cu130\nnoise\n")
    (out / "tests.log").write_text(
        "GPU-FIGURE x: 1e-6\nFAILED tests/test_cuda.py::t - boom\n1 failed, 3 passed in 9s\n"
    )
    (out / "bench-small.json").write_text(
        json.dumps(_bench_json(["naive_one", "engine_packed", "engine_padded"]))
    )
    summary = _load("gpu_summary")
    rc = summary.main(
        [
            str(out),
            "--require",
            "bench-small.json=naive_one,lmeval,engine_packed",
            "--require",
            "bench-large.json=engine_padded",
        ]
    )
    assert rc == 1
    md = (out / "summary.md").read_text()
    assert "| tests | timed out | 90 | 90 |" in md
    assert "torch 2.11.0+cu130" in md and "noise" not in md
    assert "1 failed, 3 passed" in md and "FAILED tests/test_cuda.py::t" in md and "GPU-FIGURE x" in md
    assert "| engine_packed | 1000 | 5.00 | 50% | 10.0% | 1.00 | 2.00 | 1.00e-06 / 2.00e-06 |" in md
    assert "engine_packed / engine_padded = 1.00" in md
    assert "lmeval did not run" in md and "bench-large.json: no results" in md
    (out / "bench-large.json").write_text(json.dumps(_bench_json(["engine_padded"])))
    assert (
        summary.main(
            [
                str(out),
                "--require",
                "bench-small.json:distinct=naive_one,engine_packed",
                "--require",
                "bench-large.json=engine_padded",
            ]
        )
        == 0
    )
    # A workload named but missing fails the check.
    assert summary.main([str(out), "--require", "bench-small.json:shared=engine_packed"]) == 1
    assert "bench-small.json: no shared workload" in (out / "summary.md").read_text()
