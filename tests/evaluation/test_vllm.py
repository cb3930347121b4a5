"""The vLLM backend: argument building everywhere; a real run only where vllm and CUDA exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from dareflow.evaluation.runner import model_spec, run_task, vllm_available
from dareflow.evaluation.suite import load_suite


def test_model_spec_for_each_backend(tmp_path: Path) -> None:
    assert model_spec(tmp_path, "hf", "cpu") == (
        "hf", {"pretrained": str(tmp_path), "dtype": "float32", "trust_remote_code": False})
    # on a GPU: bfloat16 (how 7B checkpoints ship; float32 would double the memory)
    assert model_spec(tmp_path, "hf", "cuda:0")[1]["dtype"] == "bfloat16"
    name, args = model_spec(tmp_path, "vllm", "cuda", {"max_model_len": 2048})
    assert name == "vllm"
    # no gpu_memory_utilization: vLLM's own default, one engine per GPU
    assert args == {"pretrained": str(tmp_path), "dtype": "auto", "trust_remote_code": False,
                    "max_model_len": 2048}
    with pytest.raises(ValueError, match="runs on a GPU"):
        model_spec(tmp_path, "vllm", "cpu")
    with pytest.raises(ValueError, match="did you mean 'vllm'\\? choices: hf, vllm"):
        model_spec(tmp_path, "vlm", "cuda")


def test_runner_imports_without_vllm() -> None:
    import sys

    import dareflow.evaluation.runner  # noqa: F401

    assert "vllm" not in sys.modules or vllm_available()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (vllm_available() and _cuda()),
    reason="vllm is not installed" if not vllm_available() else "no CUDA device",
)
def test_vllm_run_on_the_mirror(tiny_lm_dir: Path, mirror_dir: Path) -> None:
    entry = load_suite("openllm_v1").task("arc_challenge")
    raw = run_task(tiny_lm_dir, entry, backend="vllm", limit=2, mirror_dir=mirror_dir,
                   model_args={"max_model_len": 1024, "gpu_memory_utilization": 0.3})
    assert raw["dareflow"]["backend"] == "vllm"
    assert 0.0 <= raw["results"]["dareflow_arc_challenge"]["acc_norm,none"] <= 1.0
