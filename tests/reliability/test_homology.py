"""Models that are not one family are refused before any unit is merged; the vocabulary
policy (``parameters.vocab_mismatch``) and tied embeddings are handled as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dareflow.flows.merge import run_merge
from tests.reliability.conftest import WEIGHTS, refused, variant, write_recipe

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def ta(base: Path, *models: Path, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m)} for m in models], "dtype": "float32", **extra}


def plus(delta: float):
    return lambda ts: {n: t + delta for n, t in ts.items()}


def test_other_architecture_is_refused(pico_family, tmp_path):
    other = variant(pico_family["a"], tmp_path / "mistral", config={"model_type": "mistral"})
    msg = refused(ta(pico_family["base"], other), tmp_path)
    assert f"model '{other}' ({other}): model_type 'mistral' differs from the base's " \
           "'llama'; merge only fine-tunes of the same architecture as the base" in msg


def test_other_hidden_size_is_refused_once_not_per_tensor(pico_family, tmp_path):
    def wider(ts):  # hidden 32 -> 48 everywhere it appears
        return {n: torch.zeros([48 if d == 32 else d for d in t.shape]) for n, t in ts.items()}
    wide = variant(pico_family["base"], tmp_path / "wide", tensors=wider,
                   config={"hidden_size": 48})
    msg = refused(ta(pico_family["base"], wide), tmp_path)
    assert f"model '{wide}' ({wide}): config.json hidden_size 48 vs base 32: another model " \
           "size, not a fine-tune of this base; merge only fine-tunes of the same base " \
           "model" in msg
    assert "has shape" not in msg  # no per-tensor noise once the config says why
    assert msg.startswith(f"models cannot be merged with base '{pico_family['base']}' (1 problem)")


def test_other_layer_count_is_refused_naming_the_missing_layer(pico_family, tmp_path):
    shallow = variant(
        pico_family["a"], tmp_path / "one-layer", config={"num_hidden_layers": 1},
        tensors=lambda ts: {n: t for n, t in ts.items() if ".layers.1." not in n})
    msg = refused(ta(pico_family["base"], shallow), tmp_path)
    assert "config.json num_hidden_layers 1 vs base 2" in msg
    assert "missing 9 tensor(s) present in the base: 'model.layers.1.input_layernorm.weight'" in msg


def test_missing_and_extra_tensor_are_both_named(pico_family, tmp_path):
    def edit(ts):
        ts = dict(ts)
        del ts["model.layers.0.mlp.up_proj.weight"]
        ts["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
        return ts
    odd = variant(pico_family["a"], tmp_path / "odd", tensors=edit)
    msg = refused(ta(pico_family["base"], odd), tmp_path)
    assert f"model '{odd}' ({odd}): missing 1 tensor(s) present in the base: " \
           "'model.layers.0.mlp.up_proj.weight'" in msg
    assert f"model '{odd}' ({odd}): 1 tensor(s) not in the base: " \
           "'model.layers.0.mlp.extra_proj.weight'; merge only fine-tunes of this base " \
           "(same architecture and heads)" in msg
    assert "(2 problems)" in msg


def _added_token(ts):
    """One added token (vocab 64 -> 65): a new embedding and head row, deltas elsewhere."""
    out = {n: t + 0.002 for n, t in ts.items()}
    for name in (EMBED, HEAD):
        out[name] = torch.cat([out[name], torch.full((1, out[name].shape[1]), 0.5)])
    return out


@pytest.fixture
def vocab65(pico_family, tmp_path):
    return variant(pico_family["base"], tmp_path / "vocab65", tensors=_added_token,
                   config={"vocab_size": 65})


def test_vocabulary_size_difference_is_refused_by_default(pico_family, vocab65, tmp_path):
    msg = refused(ta(pico_family["base"], vocab65), tmp_path)
    assert f"tensor '{EMBED}' has 65 rows vs 64 in the base (shapes [65, 32] vs [64, 32]): " \
           "a vocabulary-size difference (e.g. added tokens, 64 vs 65)" in msg
    assert "model.resize_token_embeddings(64)" in msg


def test_pad_to_union_pads_the_smaller_models_with_their_mean_row(
        pico_family, vocab65, tmp_path):
    # more cases: tests/merge/test_vocab_merge.py
    from dareflow.merge.vocab import mean_rows

    recipe = write_recipe(tmp_path / "r.yaml", ta(
        pico_family["base"], vocab65, parameters={"vocab_mismatch": "pad_to_union"}))
    run_merge(str(recipe), str(tmp_path / "out"), max_workers=1)
    base, v = load_file(pico_family["base"] / WEIGHTS), load_file(vocab65 / WEIGHTS)
    merged = _merged(tmp_path / "out")
    for name in (EMBED, HEAD):
        padded = torch.cat([base[name], mean_rows(base[name])[None]])
        assert torch.equal(merged[name], padded + (v[name] - padded)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 65


def test_unknown_vocab_policy_lists_the_choices(pico_family, vocab65, tmp_path):
    msg = refused(ta(pico_family["base"], vocab65, parameters={"vocab_mismatch": "pad"}),
                  tmp_path)
    assert "parameters.vocab_mismatch: Input should be 'refuse', 'exclude_embeddings' or " \
           "'pad_to_union' (got 'pad')" in msg


def test_exclude_embeddings_keeps_the_base_rows_and_merges_the_rest(
        pico_family, vocab65, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", ta(
        pico_family["base"], vocab65, pico_family["b"],
        parameters={"vocab_mismatch": "exclude_embeddings"}))
    out = tmp_path / "out"
    manifest = run_merge(str(recipe), str(out), max_workers=1)
    base = load_file(pico_family["base"] / WEIGHTS)
    v = load_file(vocab65 / WEIGHTS)
    b = load_file(pico_family["b"] / WEIGHTS)
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    assert set(merged) == set(base)
    for name, t in base.items():
        if name in (EMBED, HEAD):
            assert torch.equal(merged[name], t), name  # the base's rows, bit for bit
        else:
            assert torch.equal(merged[name], t + ((v[name] - t) + (b[name] - t))), name
    assert manifest["recipe"]["parameters"]["vocab_mismatch"] == "exclude_embeddings"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_exclude_embeddings_needs_a_base(pico_family, vocab65, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(pico_family["base"])},
                                                   {"model": str(vocab65)}],
              "parameters": {"vocab_mismatch": "exclude_embeddings"}}
    msg = refused(recipe, tmp_path)
    assert "parameters.vocab_mismatch: 'exclude_embeddings' keeps the base model's " \
           "embeddings, but merge_method 'linear' has no base" in msg


# ------------------------------------------------------------------------ tied embeddings
# Policy: the merged model follows the base's tying.
#  - base tied, fine-tune untied: the output head is the merged input embedding; the
#    fine-tune's separate lm_head is not merged (a warning says so).
#  - base untied, fine-tune tied: the fine-tune's head *is* its input embedding, so its
#    head delta is (its embedding - the base's lm_head).


def _merged(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def test_tied_base_with_untied_finetune_keeps_the_base_tying(pico_family, tmp_path, caplog):
    tied = variant(pico_family["base"], tmp_path / "tied-base", config={
        "tie_word_embeddings": True},
        tensors=lambda ts: {n: t for n, t in ts.items() if n != HEAD})
    untied = variant(tied, tmp_path / "untied-ft", config={"tie_word_embeddings": False},
                     tensors=lambda ts: {**{n: t + 0.002 for n, t in ts.items()},
                                         HEAD: ts[EMBED] + 0.25})
    out = tmp_path / "out"
    run_merge(str(write_recipe(tmp_path / "r.yaml", ta(tied, untied))), str(out),
              max_workers=1)
    base, ft, merged = load_file(tied / WEIGHTS), load_file(untied / WEIGHTS), _merged(out)
    assert HEAD not in merged and set(merged) == set(base)
    assert torch.equal(merged[EMBED], base[EMBED] + (ft[EMBED] - base[EMBED]))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert f"stores an untied '{HEAD}' but the base ties it to its input embeddings; the " \
           "merged model keeps the base's tying, so that head is not merged" in caplog.text

    # really tied when transformers loads it (in a fresh process: loading state left by
    # other tests in this one can change how transformers materialises weights)
    check = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "print(m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())")
    proc = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, check=False,
                          text=True, timeout=120)
    assert proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


def test_untied_base_with_tied_finetune_merges_its_embedding_as_the_head(
        pico_family, tmp_path):
    base_dir = pico_family["base"]
    tied = variant(base_dir, tmp_path / "tied-ft", config={"tie_word_embeddings": True},
                   tensors=lambda ts: {n: t + 0.002 for n, t in ts.items() if n != HEAD})
    out = tmp_path / "out"
    run_merge(str(write_recipe(tmp_path / "r.yaml", ta(base_dir, tied))), str(out),
              max_workers=1)
    base, ft, merged = load_file(base_dir / WEIGHTS), load_file(tied / WEIGHTS), _merged(out)
    assert set(merged) == set(base)
    assert torch.equal(merged[HEAD], base[HEAD] + (ft[EMBED] - base[HEAD]))
    assert torch.equal(merged[EMBED], base[EMBED] + (ft[EMBED] - base[EMBED]))
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings") is False
