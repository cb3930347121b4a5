"""Representation similarity: exact cosines on known states, a real model against itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dareflow.experiments import representation as rep


def test_layer_cosine_exact() -> None:
    a = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])]
    b = [torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[-3.0, -4.0], [1.0, 1.0]])]
    # layer 0: cos = 1 and 0 -> 0.5; layer 1: cos = -1 and 1 -> 0
    assert rep.layer_cosine(a, b) == pytest.approx([0.5, 0.0], abs=1e-7)


def test_layer_cosine_refuses_mismatches() -> None:
    with pytest.raises(ValueError, match="layer counts differ: 2 vs 1"):
        rep.layer_cosine([torch.ones(1, 2)] * 2, [torch.ones(1, 2)])
    with pytest.raises(ValueError, match=r"layer 0: hidden states \(1, 2\) vs \(3, 2\)"):
        rep.layer_cosine([torch.ones(1, 2)], [torch.ones(3, 2)])


def test_a_model_is_identical_to_itself_and_not_to_a_perturbed_copy(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    noisy = tmp_path / "noisy"
    shutil.copytree(tiny_llama_dir, noisy)
    g = torch.Generator().manual_seed(0)
    tensors = {n: t + torch.randn(t.shape, generator=g) * 0.05
               for n, t in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, str(noisy / "model.safetensors"), metadata={"format": "pt"})
    prompts = ["w3 w4 w5", "w10 w11", "w7"]
    rows = rep.similarity_rows(str(tiny_llama_dir), {"self": str(tiny_llama_dir),
                                                     "noisy": str(noisy)}, prompts)
    same = [r["cosine"] for r in rows if r["variant"] == "self"]
    other = [r["cosine"] for r in rows if r["variant"] == "noisy"]
    assert len(same) == len(other) == 3  # embeddings + 2 decoder layers
    assert same == pytest.approx([1.0] * 3, abs=1e-6)
    assert all(c < 0.999 for c in other)


def test_calibration_prompts_come_from_validation() -> None:
    from dareflow.demo.skills import get_skill, split_items

    texts = rep.calibration_prompts(["arithmetic"], 3)
    skill = get_skill("arithmetic")
    assert texts == [skill.prompt(x) + skill.answer(x) for x in split_items("arithmetic", "validation", 3)]
    assert not set(texts) & {skill.prompt(x) + skill.answer(x) for x in split_items("arithmetic", "test")}
