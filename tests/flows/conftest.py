"""A pico family: fine-tunes = base + known deltas, so merged values are exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def make_finetune(base_dir: Path, out: Path, delta_for) -> Path:
    """Copy the base folder and add ``delta_for(name, tensor)`` to every tensor."""
    shutil.copytree(base_dir, out)
    tensors = load_file(base_dir / "model.safetensors")
    tuned = {name: (t.float() + delta_for(name, t)).to(t.dtype) for name, t in tensors.items()}
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def pico_family(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base + two fine-tunes: a adds +0.002 everywhere, b adds -0.001 on odd indices."""
    root = tmp_path_factory.mktemp("pico-family")
    base = root / "base"
    shutil.copytree(tiny_llama_dir, base)

    def delta_a(name, t):
        return torch.full(t.shape, 0.002)

    def delta_b(name, t):
        d = torch.zeros(t.numel())
        d[1::2] = -0.001
        return d.reshape(t.shape)

    return {
        "base": base,
        "a": make_finetune(base, root / "ft-a", delta_a),
        "b": make_finetune(base, root / "ft-b", delta_b),
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))  # JSON is valid YAML
    return path


def dare_ties_recipe(path: Path, base, a, b, seed: int | None = None) -> Path:
    """The tests' dare_ties recipe over a base and two fine-tunes (paths or source
    strings): drop rates 0.4 and 0.6, bfloat16, ``seed`` when given."""
    data = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"drop_rate": 0.4}},
                   {"model": str(b), "parameters": {"drop_rate": 0.6}}],
        "dtype": "bfloat16",
    }
    if seed is not None:
        data["seed"] = seed
    return write_recipe(path, data)


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    """Each test gets its own artifact store, so no test reuses another's layers."""
    monkeypatch.setenv("DAREFLOW_STORE", str(tmp_path / "store"))
