"""Quantized checkpoints (FP8 dtypes, GPTQ/AWQ/bitsandbytes tensors, a quantization_config)
are refused before any merge work, with what to do (io/headers.py, io/homology.py)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dareflow.io.checkpoints import Checkpoint
from dareflow.io.headers import DEQUANTIZE_HINT, parse_header
from dareflow.io.homology import check_family, quantization_problem
from tests.reliability.conftest import refused

HINT = (
    "dareflow merges full-precision weights only (dropping and rescaling quantized codes or "
    "their scales is not DARE). Merge the bf16/fp16 checkpoints the quantized ones were made "
    "from, or dequantize each model to bf16/fp16 first, e.g. with transformers: model = "
    "AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16); model.dequantize() "
    "(where its quantization method supports it); model.save_pretrained(out), and merge "
    "those folders"
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _variant(src: Path, out: Path, tensors: dict[str, torch.Tensor],
             config: dict | None = None) -> Path:
    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


def _dare_ties(base: Path, model: Path) -> dict:
    return {"merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(model), "parameters": {"weight": 1.0, "density": 0.5}}]}


def test_hint_says_what_to_do():
    assert DEQUANTIZE_HINT == HINT


def test_fp8_fine_tune_is_refused_and_nothing_is_written(tiny_llama_dir, tmp_path):
    weights = load_file(tiny_llama_dir / "model.safetensors")
    fp8 = {}
    for name, t in weights.items():
        if _linear(name):  # as FP8 checkpoints store them: codes plus a float32 scale
            fp8[name] = (t * 100).to(torch.float8_e4m3fn)
            fp8[name.removesuffix("weight") + "weight_scale_inv"] = torch.tensor([0.01])
        else:
            fp8[name] = t
    ft = _variant(tiny_llama_dir, tmp_path / "fp8-ft", fp8)
    assert Checkpoint.open(str(ft)).info("model.layers.0.mlp.up_proj.weight").dtype == "F8_E4M3"
    msg = refused(_dare_ties(tiny_llama_dir, ft), tmp_path)
    assert (
        f"({ft}) is a quantized checkpoint (14 tensor(s) stored as F8_E4M3: "
        "'model.layers.0.mlp.down_proj.weight', 'model.layers.0.mlp.gate_proj.weight', "
        "'model.layers.0.mlp.up_proj.weight', ... and 11 more; 14 quantizer tensor(s) such "
        "as 'model.layers.0.mlp.down_proj.weight_scale_inv', "
        "'model.layers.0.mlp.gate_proj.weight_scale_inv', "
        f"'model.layers.0.mlp.up_proj.weight_scale_inv', ... and 11 more): {HINT}"
    ) in msg
    assert f"model '{ft}'" in msg
    assert "(1 problem)" in msg  # its scale tensors are not also called extra tensors


def test_gptq_fine_tune_is_refused_and_nothing_is_written(tiny_llama_dir, tmp_path):
    weights = load_file(tiny_llama_dir / "model.safetensors")
    gptq = {}
    for name, t in weights.items():
        if _linear(name):  # GPTQ 4-bit: eight codes per int32, per-group zeros and scales
            stem = name.removesuffix("weight")
            out_f, in_f = t.shape
            gptq[stem + "qweight"] = torch.zeros(in_f // 8, out_f, dtype=torch.int32)
            gptq[stem + "qzeros"] = torch.zeros(1, out_f // 8, dtype=torch.int32)
            gptq[stem + "scales"] = torch.ones(1, out_f, dtype=torch.float16)
            gptq[stem + "g_idx"] = torch.zeros(in_f, dtype=torch.int32)
        else:
            gptq[name] = t
    ft = _variant(tiny_llama_dir, tmp_path / "gptq-ft", gptq,
                  {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    msg = refused(_dare_ties(tiny_llama_dir, ft), tmp_path)
    assert (
        f"({ft}) is a quantized checkpoint (config.json has a quantization_config "
        "(quant_method 'gptq'); 56 quantizer tensor(s) such as "
        "'model.layers.0.mlp.down_proj.g_idx', 'model.layers.0.mlp.down_proj.qweight', "
        f"'model.layers.0.mlp.down_proj.qzeros', ... and 53 more): {HINT}"
    ) in msg


# --------------------------------------------------------------------------- detection

FLOATS = {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)}


def _open(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None
          ) -> Checkpoint:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return Checkpoint.open(str(folder))


@pytest.mark.parametrize(("tensors", "config", "found"), [
    ({**FLOATS, "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4).to(torch.float8_e5m2)},
     None, "1 tensor(s) stored as F8_E5M2: 'model.layers.0.mlp.up_proj.weight'"),
    ({"model.layers.0.mlp.up_proj.weight": torch.zeros(8, dtype=torch.uint8),
      "model.layers.0.mlp.up_proj.weight.absmax": torch.ones(1),
      "model.layers.0.mlp.up_proj.weight.quant_map": torch.ones(16),
      "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4":
          torch.zeros(4, dtype=torch.uint8)},
     None, ("3 quantizer tensor(s) such as 'model.layers.0.mlp.up_proj.weight.absmax', "
            "'model.layers.0.mlp.up_proj.weight.quant_map', "
            "'model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4'")),
    ({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.int8),
      "model.layers.0.mlp.up_proj.SCB": torch.ones(4)},
     None, "1 quantizer tensor(s) such as 'model.layers.0.mlp.up_proj.SCB'"),
    (FLOATS, {"model_type": "llama", "quantization_config": {"quant_method": "awq"}},
     "config.json has a quantization_config (quant_method 'awq')"),
])
def test_quantization_is_recognised_from_metadata(tmp_path, tensors, config, found):
    ckpt = _open(tmp_path / "q", tensors, config)
    assert quantization_problem(ckpt, "model 'q'") == \
        f"model 'q' is a quantized checkpoint ({found}): {HINT}"


def test_full_precision_checkpoints_are_not_quantized(tmp_path):
    ckpt = _open(tmp_path / "f", {**FLOATS, "model.embed_tokens.weight": torch.ones(3, 4),
                                  "bert.embeddings.position_ids": torch.arange(4)})
    assert quantization_problem(ckpt, "model 'f'") is None


def test_every_quantized_checkpoint_is_named_and_nothing_else(tmp_path):
    base = _open(tmp_path / "base", FLOATS,
                 {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}})
    fp8 = _open(tmp_path / "fp8", {n: t.to(torch.float8_e4m3fn) for n, t in FLOATS.items()})
    other = _open(tmp_path / "other", FLOATS, {"model_type": "mistral"})
    with pytest.raises(ValueError) as err:
        check_family(base, {"fp8": fp8, "other": other})
    msg = str(err.value)
    # against a quantized base, shapes and dtypes say nothing: only what to do is listed
    assert "(2 problems)" in msg
    assert (f"  - base {base.uri!r} is a quantized checkpoint (config.json has a "
            f"quantization_config (quant_method 'bitsandbytes')): {HINT}") in msg
    assert (f"  - model 'fp8' ({fp8.uri}) is a quantized checkpoint (1 tensor(s) stored as "
            f"F8_E4M3: 'model.layers.0.mlp.up_proj.weight'): {HINT}") in msg


def _raw_header(dtype: str, nbytes: int) -> tuple[bytes, int]:
    text = json.dumps({"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}).encode()
    return text, 8 + len(text) + nbytes


def test_e8m0_scales_are_read_then_refused(tmp_path):
    text, _ = _raw_header("F8_E8M0", 4)
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes([127, 128, 126, 127]))
    ckpt = Checkpoint.open(str(path.parent))
    assert ckpt.read("w").float().tolist() == [1.0, 2.0, 0.5, 1.0]  # 2^(e - 127)
    assert quantization_problem(ckpt, "m") == \
        f"m is a quantized checkpoint (1 tensor(s) stored as F8_E8M0: 'w'): {HINT}"


def test_an_unreadable_quantized_dtype_says_what_to_do():
    text, size = _raw_header("F4", 2)
    with pytest.raises(ValueError) as err:
        parse_header("mem://q.safetensors", text, size)
    assert str(err.value) == (
        "safetensors file 'mem://q.safetensors': tensor 'w' has dtype 'F4', a quantized "
        f"float format; {HINT}"
    )
