"""deploy/kubernetes/overlays/gpu-model-volume: the model from a volume, not the image.

An init container (fetch_model.py in the image the server runs) downloads the
model onto a ReadWriteMany PersistentVolumeClaim unless it is already there;
the server container mounts the claim read-only, loads PAIRSCORE_MODEL from
it and stays offline (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1). The overlay
also passes every check of tests/test_deploy_manifests.py (strict schemas,
probes, restricted security), which parametrizes over all overlays.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from harness.deploy import (
    K8S,
    MODEL_VOLUME_OVERLAY,
    build_overlays,
    configmap_env,
    container,
    only,
)

OVERLAY_DIR = K8S / "overlays" / MODEL_VOLUME_OVERLAY


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return build_overlays()[MODEL_VOLUME_OVERLAY]


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "Deployment", "pairscore")["spec"]["template"]["spec"]


def test_the_server_loads_the_model_from_the_claim_offline(docs: list[dict[str, Any]]) -> None:
    pod = _pod(docs)
    server = container(docs)
    model = configmap_env(docs)["PAIRSCORE_MODEL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in server["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True, "the server only reads the model"
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = only(docs, "PersistentVolumeClaim", claim)
    assert pvc["metadata"]["namespace"] == only(docs, "Namespace")["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas on several nodes share it"
    assert pvc["spec"]["resources"]["requests"]["storage"]
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


def test_an_init_container_fills_the_claim_where_the_server_looks(docs: list[dict[str, Any]]) -> None:
    pod = _pod(docs)
    server = container(docs)
    [init] = pod["initContainers"]
    assert init["image"] == server["image"], "the init container runs the server's image"
    env = {e["name"]: e for e in init["env"]}
    assert env["MODEL_DIR"]["value"] == configmap_env(docs)["PAIRSCORE_MODEL"]
    assert env["MODEL_REPO"]["value"].count("/") == 1
    assert env["HF_HUB_OFFLINE"]["value"] == "0", "the image is offline; this container downloads"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # It writes the same claim the server reads, at the same path.
    server_mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    [models] = [n for n in init_mounts if n in server_mounts and n not in ("tmp", "dshm")]
    assert init_mounts[models]["mountPath"] == server_mounts[models]
    assert not init_mounts[models].get("readOnly")
    assert env["MODEL_DIR"]["value"].startswith(init_mounts[models]["mountPath"] + "/")
    # It runs the script the overlay ships, from the ConfigMap it mounts.
    volumes = {v["name"]: v for v in pod["volumes"]}
    script = Path(init["command"][-1])
    [scripts] = [m for m in init["volumeMounts"] if m["mountPath"] == str(script.parent)]
    config_map = only(docs, "ConfigMap", volumes[scripts["name"]]["configMap"]["name"])
    assert config_map["data"][script.name] == (OVERLAY_DIR / script.name).read_text()
    # The restricted Pod Security Standard holds for init containers too.
    csc = init["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert csc["readOnlyRootFilesystem"] is True and csc["runAsNonRoot"] is True
    assert init_mounts["tmp"]["mountPath"] == "/tmp" and env["HF_HOME"]["value"].startswith("/tmp/")
    assert init["resources"]["limits"]["memory"]


# --- fetch_model.py ------------------------------------------------------------------------------


def _fetch_module() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_model", OVERLAY_DIR / "fetch_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in huggingface_hub whose snapshot_download writes a small model."""
    calls: list[dict[str, Any]] = []

    def snapshot_download(repo: str, revision: str | None = None, local_dir: str = "", **kw: Any) -> str:
        calls.append({"repo": repo, "revision": revision, "local_dir": local_dir, **kw})
        if repo == "org/broken":
            (Path(local_dir) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / "model.safetensors").write_text("half")
            raise OSError("connection reset")
        Path(local_dir, ".cache").mkdir(parents=True, exist_ok=True)
        Path(local_dir, "model.safetensors").write_text("weights")
        Path(local_dir, "config.json").write_text("{}")
        return local_dir

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    return calls


def test_fetch_model_downloads_once(tmp_path: Path, hub: list[dict[str, Any]]) -> None:
    fetch = _fetch_module().fetch
    dest = tmp_path / "models" / "m"
    assert fetch("org/m", "abc123", dest, "pod-a") == f"downloaded org/m@abc123 into {dest}"
    assert (dest / "config.json").is_file() and not (dest / ".cache").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"], "no partial folder left"
    [call] = hub
    assert call["revision"] == "abc123" and "*.bin" in call["ignore_patterns"]
    assert "*.safetensors" not in call["ignore_patterns"]
    assert fetch("org/m", "abc123", dest, "pod-b") == f"{dest} is already there"
    assert len(hub) == 1


def test_fetch_model_never_leaves_a_partial_model_where_the_server_looks(
    tmp_path: Path, hub: list[dict[str, Any]]
) -> None:
    fetch = _fetch_module().fetch
    dest = tmp_path / "m"
    with pytest.raises(OSError):
        fetch("org/broken", None, dest, "pod-a")
    assert not dest.exists()
    # The next try (the pod restarted) starts again from scratch.
    assert fetch("org/m", None, dest, "pod-a").startswith("downloaded org/m@main")
    assert (dest / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_fetch_model_lets_another_pod_win_the_race(
    tmp_path: Path, hub: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _fetch_module()
    dest = tmp_path / "m"
    real_rename = Path.rename

    def rename(self: Path, target: Any) -> Any:  # another pod renames first
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    assert module.fetch("org/m", None, dest, "pod-b") == f"{dest} was put there by another pod meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
