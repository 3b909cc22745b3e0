"""README.md and docs/*.md say only what is true of the code.

* Every relative link resolves (docs/gpu-check.md and docs/architecture.md
  are written elsewhere and may land later), every docs page is linked from
  the README, and the README stays an introduction.
* Every ``--flag`` and ``PAIRSCORE_*`` variable the docs mention is one the
  code defines (other tools' flags are listed below), every ``pairscore_*``
  metric they mention is exported, and docs/metrics.md lists them all.
* The limits' documented defaults are the server's.
* The kubectl-only way to set the image (docs/deploying.md) builds.
* Every Python block runs against a real server on a tiny model, or, when it
  needs what a test machine lacks (a cluster, a GPU, the Hub), compiles; the
  README's commands name `.venv/bin/pairscore`, and its copy-and-paste block
  runs as written.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore.types import ItemError
from pairscore_server.config import ServerConfig
from pairscore_server.engine.loading import default_max_batch_tokens
from pairscore_server.limits import DEFAULT_QUEUE_BATCHES
from pairscore_server.metrics import Metrics

from harness.deploy import build_overlays, need_tool, run
from harness.fake_engine import FakeEngine
from harness.models import build_bpe_tokenizer, build_gpt2_model, make_engine, with_chat_template
from harness.openai_http import openai_base
from harness.servers import ServerThread, cli_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: Pages other engineers write; linked from the README before they land.
PENDING = {DOCS / "gpu-check.md", DOCS / "architecture.md"}
#: Flags of other tools that the docs show: docker, kubectl, pip, argparse.
OTHER_TOOLS_FLAGS = {
    "--build-arg",
    "--gpus",
    "--read-only",
    "--shm-size",
    "--tmpfs",  # docker
    "--from-literal",  # kubectl create secret
    "--no-deps",  # pip
    "--tasks",
    "--num",  # --num_fewshot
    "--batch",  # --batch_size: lm-eval's (docs/ecosystem.md)
    "--include",  # --include_path: lm-eval's (README.md, docs/ecosystem.md)
    "--apply",  # --apply_chat_template: lm-eval's (README.md, docs/ecosystem.md, docs/api.md)
    "--system",  # --system_instruction: lm-eval's (README.md, docs/ecosystem.md)
    "--help",
}
#: Where the project's own flags and variables are defined.
SOURCES = ("client", "server", "bench", "scripts", "examples")


def page_ids() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in PAGES]


def source_text() -> str:
    return "".join(p.read_text() for d in SOURCES for p in sorted((ROOT / d).rglob("*.py")))


def test_the_docs_pages_exist() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {
        "api.md",
        "contract.md",
        "deploying.md",
        "metrics.md",
        "performance.md",
        "pipeline.md",
        "reliability.md",
        "security.md",
        "server.md",
    } <= names


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if resolved in PENDING and not resolved.exists():
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                problems.append(f"{target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page_and_stays_short() -> None:
    text = README.read_text()
    for page in sorted(set(DOCS.glob("*.md")) | PENDING):
        assert f"](docs/{page.name})" in text, f"README does not link docs/{page.name}"
    assert len(text.splitlines()) <= 250, "the reference belongs in docs/"
    for heading in ("## Quickstart", "## Score a dataset", "## The contract in brief", "## Layout"):
        assert heading in text
    assert "make serve" in text and "make test" in text
    assert "pip install ./" in text, "how to install from a checkout, before a release"


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_documented_flags_are_real(page: Path) -> None:
    defined = set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", source_text()))
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", page.read_text()))
    unknown = mentioned - defined - OTHER_TOOLS_FLAGS
    assert not unknown, f"flags no code defines: {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_documented_variables_are_real(page: Path) -> None:
    defined = set(re.findall(r"""["'](PAIRSCORE_[A-Z0-9_]*[A-Z0-9])["']""", source_text()))
    for name in re.findall(r"PAIRSCORE_[A-Z0-9_]+", page.read_text()):
        if name.endswith("_"):  # a family, PAIRSCORE_TLS_*
            assert any(d.startswith(name) for d in defined), name
        else:
            assert name in defined, f"{name} is not read by any code"


def exported_names() -> set[str]:
    """Sample names of the server's metrics: counters with _total, histograms' series, ..."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("", "_bucket", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
    }
    return {
        family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]
    }


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_documented_metrics_are_exported(page: Path) -> None:
    names = exported_names()
    mentioned = set(re.findall(r"\b(pairscore_[a-z0-9_]+)", page.read_text()))
    mentioned -= {"pairscore_server"}  # the Python package
    unknown = sorted(m for m in mentioned if m not in names)
    assert not unknown, f"not exported: {unknown}"


def test_the_metrics_page_lists_every_metric() -> None:
    rows = re.findall(r"^\| `(pairscore_[a-z0-9_]+)", (DOCS / "metrics.md").read_text(), re.MULTILINE)
    families = {f.name: f.type for f in Metrics().registry.collect()}
    listed = {r.removesuffix("_total").removesuffix("_info") for r in rows}
    assert listed == set(families), f"missing: {sorted(set(families) - listed)}"


def _limit_row(flag: str) -> str:
    text = (DOCS / "reliability.md").read_text()
    [row] = re.findall(rf"^\| `{re.escape(flag)}` \| ([^|]*) \|", text, re.MULTILINE)
    return row


def test_the_documented_limit_defaults_are_the_servers() -> None:
    import torch

    defaults = ServerConfig()
    assert _limit_row("--max-pairs-per-request").split()[0] == str(defaults.max_pairs_per_request)
    assert _limit_row("--max-text-chars").split()[0] == str(defaults.max_text_chars)
    assert _limit_row("--max-concurrent-rpcs").split()[0] == str(defaults.max_concurrent_rpcs)
    assert _limit_row("--max-message-bytes").startswith(f"{defaults.max_message_bytes // 2**20} MiB")
    cpu = DEFAULT_QUEUE_BATCHES * default_max_batch_tokens(torch.device("cpu"))
    bf16 = DEFAULT_QUEUE_BATCHES * default_max_batch_tokens(torch.device("cpu"), torch.bfloat16)
    gpu = DEFAULT_QUEUE_BATCHES * default_max_batch_tokens(torch.device("cuda"))
    row = _limit_row("--max-queue-tokens")
    assert row.startswith(f"{DEFAULT_QUEUE_BATCHES} × `--max-batch-tokens`"), row
    assert f"({cpu} on CPU, {bf16} on CPU in bfloat16, {gpu} on GPU)" in row, row


def test_the_documented_lifecycle_defaults_are_the_servers() -> None:
    defaults = ServerConfig()
    text = (DOCS / "reliability.md").read_text()
    grace = re.search(r"`--grace-period` seconds \(default (\d+)\)", text)
    assert grace and float(grace[1]) == defaults.grace_period_s
    forward = re.search(r"`--forward-timeout` \(default (\d+) s", text)
    assert forward and float(forward[1]) == defaults.forward_timeout_s


def test_the_kubectl_only_image_override_builds(tmp_path: Path) -> None:
    """docs/deploying.md's own overlay on top of gpu-prod sets the image, with kubectl alone."""
    kubectl = need_tool("kubectl", "kubectl kustomize builds the overlays (install kubectl)")
    text = (DOCS / "deploying.md").read_text()
    block = re.search(r"```yaml\n# (my-pairscore)/kustomization.yaml\n(.*?)```", text, re.DOTALL)
    assert block, "the recipe is gone from docs/deploying.md"
    for page in PAGES:  # no command to type needs the standalone kustomize CLI
        for code in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.DOTALL):
            assert "kustomize edit" not in code, page
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")  # the overlay sits beside deploy/
    folder = tmp_path / block[1]
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(block[2])
    proc = run([kubectl, "kustomize", str(folder)])
    assert proc.returncode == 0, proc.stderr
    images = set(re.findall(r"^\s+image: (\S+)$", proc.stdout, re.MULTILINE))
    new_name = re.search(r"newName: (\S+)", block[2])
    new_tag = re.search(r'newTag: "?([^"\s]+)"?', block[2])
    assert new_name and new_tag
    assert images == {f"{new_name[1]}:{new_tag[1]}"}, images
    # The overlay it builds on is gpu-prod, unchanged otherwise.
    assert len(proc.stdout.split("\n---\n")) == len(build_overlays()["gpu-prod"])


def test_the_documented_startup_log_is_what_the_server_logs() -> None:
    """docs/server.md quotes the start-up log lines: their wording is the server's."""
    source = "".join(p.read_text() for p in sorted((ROOT / "server").rglob("*.py")))
    source = re.sub(r'"\s*\n\s*"', "", source)  # adjacent string literals, as Python joins them
    text = " ".join((DOCS / "server.md").read_text().split())
    quotes = re.findall(r"`((?:serving model|limits:)[^`]*)`", text)
    assert len(quotes) == 2, quotes
    for quote in quotes:
        for piece in (p.strip() for p in quote.split("...")):
            pattern = re.sub(r"\d+", lambda _: "%[ds]", re.escape(piece))
            assert re.search(pattern, source), f"the server logs no {piece!r}"
    assert "padded tokens" not in text


# --- the docs' code runs (issue 23) -----------------------------------------------------------

#: Python blocks that need what a test machine lacks: (page, a line of the block) -> why.
#: They are compiled; every other Python block of README.md and docs/*.md is run.
NEEDS_A_SERVICE = {
    ("docs/api.md", "def note(error, delay_s):"): "a fragment: client and pairs as in the blocks above",
    ("docs/api.md", "from pairscore.ray import score_dataset"): "Ray and a fleet of servers",
    ("docs/api.md", 'ray.data.read_parquet("/shared/big.parquet")'): "Ray and a shared filesystem",
    ("docs/api.md", "from pairscore.ray import parquet_files, score_files"): "Ray and a fleet of servers",
    ("docs/deploying.md", 'client = ScoringClient("dns:///pairscore.pairscore'): "the Kubernetes service",
    ("docs/deploying.md", 'results = scorer.score([Pair("The capital'): "a GPU and a model directory",
    ("docs/deploying.md", "class ScoreBatch:"): "Ray and GPUs",
    ("docs/deploying.md", "def score_partition(frames):"): "Spark and GPUs",
    ("docs/ecosystem.md", "import pairscore.lmeval  # registers"): "arc_easy is on the Hugging Face Hub",
    ("docs/ecosystem.md", "scorer = Scorer()  # the embedded"): "the real SmolLM2 and a GPU model directory",
    ("docs/openai.md", 'model="local-completions"'): "hellaswag is on the Hugging Face Hub",
}
_PYTHON = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, int, str, str | None]]:
    """(page, line, code, why it is only compiled or None) of every Python block."""
    out = []
    for page in PAGES:
        text, name = page.read_text(), str(page.relative_to(ROOT))
        for m in _PYTHON.finditer(text):
            code = textwrap.dedent(m[2])
            why = [w for (p, line), w in NEEDS_A_SERVICE.items() if p == name and line in code]
            out.append((name, text[: m.start()].count("\n") + 2, code, why[0] if why else None))
    return out


BLOCKS = python_blocks()


def test_every_service_exception_names_a_block() -> None:
    found = {
        (p, line) for p, _, code, _ in BLOCKS for (q, line) in NEEDS_A_SERVICE if p == q and line in code
    }
    assert found == set(NEEDS_A_SERVICE), f"stale: {set(NEEDS_A_SERVICE) - found}"


@pytest.mark.parametrize(("page", "line", "code", "why"), BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_every_python_block_compiles(page: str, line: int, code: str, why: str | None) -> None:
    compile(code, f"{page}:{line}", "exec")


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A real server on a tiny GPT-2-style model with a chat template, gRPC and OpenAI ports."""
    tokenizer = with_chat_template(build_bpe_tokenizer(tmp_path_factory.mktemp("docs-tokenizer")))
    server = ServerThread(make_engine(build_gpt2_model(len(tokenizer)), tokenizer), openai_port=0).start()
    yield server
    server.stop()


RUN = [b for b in BLOCKS if b[3] is None]


@pytest.mark.parametrize(("page", "line", "code", "why"), RUN, ids=[f"{b[0]}:{b[1]}" for b in RUN])
def test_every_python_block_runs_against_a_server(
    docs_server: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    page: str,
    line: int,
    code: str,
    why: str | None,
) -> None:
    """Run as written, but against the test server, in a directory holding the README's pairs.jsonl."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text(readme_pairs())
    code = code.replace("localhost:50051", docs_server.target)
    code = code.replace("http://localhost:8000/v1", openai_base(docs_server))
    code = code.replace('"SmolLM2-135M-Instruct"', '"tiny"')  # the model the test server serves
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
    failed = [
        item
        for value in namespace.values()
        if isinstance(value, (list, tuple))
        for item in value
        if isinstance(item, ItemError)
    ]
    assert not failed, f"a pair the docs show failed: {failed}"


def readme_pairs() -> str:
    """The pairs.jsonl the README's copy-and-paste block writes."""
    block = re.search(r"cat > pairs.jsonl <<'EOF'\n(.*?)^EOF$", README.read_text(), re.DOTALL | re.MULTILINE)
    assert block, "the README's copy-and-paste block is gone"
    return block[1]


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks (continuations joined, comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        block = re.sub(r"<<'EOF'\n.*?^EOF$", "<<'EOF'", block, flags=re.DOTALL | re.MULTILINE)
        lines += [ln.split(" #")[0].strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


def test_readme_commands_name_the_installed_command() -> None:
    """`make serve` puts pairscore in .venv/bin, not on PATH: every command says .venv/bin/."""
    bare = [c for c in readme_commands() if re.match(r"pairscore(-lm-eval)?\b", c)]
    assert not bare, f"not on PATH after make serve: {bare}"


def test_the_readme_copy_and_paste_block_runs_as_written(tmp_path: Path) -> None:
    """The block of "Score a dataset", in bash, in a directory like a fresh clone after `make serve`
    (its .venv), against a server (PAIRSCORE_TARGET: the block names none); run again, it refuses."""
    pytest.importorskip("matplotlib")
    [block] = [
        b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL) if "pairs.jsonl" in b
    ]
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    server = ServerThread(FakeEngine(max_context=64)).start()
    try:
        env = {**cli_env(), "PAIRSCORE_TARGET": server.target}
        first = subprocess.run(
            ["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert first.returncode == 0, first.stderr
        for name in ("scored.jsonl", "kept.jsonl", "rejected.jsonl", "report.png"):
            assert (tmp_path / name).stat().st_size > 0, name
        again = subprocess.run(["bash", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert again.returncode == 1
        assert again.stderr.count("; pass --overwrite to replace") == 3, again.stderr
    finally:
        server.stop()
