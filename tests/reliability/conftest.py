"""Fixtures of the reliability suite: tiny families with one thing wrong each, and
``refused``, which runs a merge that must fail and checks that it changed nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.flows.conftest import (  # noqa: F401
    dare_ties_recipe,
    make_finetune,
    pico_family,
    write_recipe,
)

WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    """Each test gets its own artifact store, so no test reuses another's layers."""
    monkeypatch.setenv("DAREFLOW_STORE", str(tmp_path / "store"))


def variant(src: Path, out: Path, *,
            tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
            config: dict | None = None) -> Path:
    """Copy a model folder, rewriting its tensors and/or updating its config.json."""
    shutil.copytree(src, out)
    if tensors is not None:
        save_file(tensors(load_file(src / WEIGHTS)), out / WEIGHTS, metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def committed_units(store: Path) -> list[str]:
    """Unit names whose commit record (sidecar) exists in a local store."""
    return sorted(json.loads(p.read_text())["unit"] for p in store.glob("units/*/*.json"))


def refused(recipe: dict, tmp_path: Path, *, error=ValueError,
            max_workers: int = 1) -> str:
    """Run a merge that must fail, over an existing output with ``overwrite=True``.

    Checks that the previous output is untouched (same files and bytes), that nothing
    was staged or published, and that no unit was committed in the store.

    Returns:
        The error message.
    """
    from dareflow.flows.merge import run_merge

    out, store = tmp_path / "out", tmp_path / "store"
    out.mkdir(exist_ok=True)
    (out / "README.md").write_text("previous model\n")
    (out / WEIGHTS).write_bytes(b"previous weights")
    before = snapshot(out)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    with pytest.raises(error) as caught:
        run_merge(str(path), str(out), store=str(store), max_workers=max_workers,
                  overwrite=True)
    assert snapshot(out) == before, "the existing output was modified"
    assert not list(tmp_path.glob("out.partial*")), "a partial model was left staged"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert committed_units(store) == [], "units were committed for a refused merge"
    return str(caught.value)
