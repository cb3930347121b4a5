"""src/dareflow/merge/layers.py on real tensor names (tiny Llama, Mistral, GPT-2, BERT) and edge cases."""

from __future__ import annotations

import re

import pytest

from dareflow.io.checkpoints import Checkpoint
from dareflow.merge.layers import Unit, classify, plan_units


def by_name(units: list[Unit]) -> dict[str, Unit]:
    return {u.name: u for u in units}


def test_llama_units(tiny_llama_dir):
    names = list(Checkpoint.open(str(tiny_llama_dir)).tensors)
    units = plan_units(names)
    assert [u.name for u in units] == ["embeddings", "layer_000", "layer_001", "final"]
    assert [(u.kind, u.index) for u in units] == [
        ("embeddings", None), ("layer", 0), ("layer", 1), ("final", None)
    ]
    u = by_name(units)
    assert u["embeddings"].tensors == ("model.embed_tokens.weight",)
    assert u["final"].tensors == ("lm_head.weight", "model.norm.weight")
    assert len(u["layer_000"].tensors) == 9
    assert all(t.startswith("model.layers.1.") for t in u["layer_001"].tensors)
    assert sorted(t for unit in units for t in unit.tensors) == sorted(names)


def test_mistral_names_match_llama_layout():
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )
    with torch.random.fork_rng():
        names = list(MistralForCausalLM(config).state_dict())
    units = plan_units(names)
    assert [u.name for u in units] == ["embeddings", "layer_000", "layer_001", "layer_002", "final"]
    assert by_name(units)["final"].tensors == ("lm_head.weight", "model.norm.weight")


def test_gpt2_units(tiny_gpt2_dir):
    names = list(Checkpoint.open(str(tiny_gpt2_dir)).tensors)
    u = by_name(plan_units(names))
    assert list(u) == ["embeddings", "layer_000", "layer_001", "final"]
    assert u["embeddings"].tensors == ("transformer.wpe.weight", "transformer.wte.weight")
    assert u["final"].tensors == ("transformer.ln_f.bias", "transformer.ln_f.weight")
    assert all(t.startswith("transformer.h.0.") for t in u["layer_000"].tensors)


def test_bert_units(tiny_bert_dir):
    names = list(Checkpoint.open(str(tiny_bert_dir)).tensors)
    u = by_name(plan_units(names))
    assert list(u) == ["embeddings", "layer_000", "layer_001", "final"]
    assert u["embeddings"].tensors == (
        "bert.embeddings.LayerNorm.bias",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.word_embeddings.weight",
    )
    assert all(t.startswith("bert.encoder.layer.1.") for t in u["layer_001"].tensors)
    assert all(t.startswith("cls.") for t in u["final"].tensors)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj.weight", ("layer", 3)),
        ("transformer.h.11.attn.c_attn.weight", ("layer", 11)),
        ("bert.encoder.layer.0.output.dense.bias", ("layer", 0)),
        ("blocks.2.norm1.weight", ("layer", 2)),
        ("layers.0.attention.wq.weight", ("layer", 0)),
        ("gpt_neox.layers.7.mlp.dense_h_to_4h.weight", ("layer", 7)),
        ("model.heads.1.weight", ("final", None)),
        ("model.block_h.1.weight", ("final", None)),
        ("model.layers_extra.2.weight", ("final", None)),
        ("tok_embeddings.weight", ("embeddings", None)),
        ("gpt_neox.embed_in.weight", ("embeddings", None)),
        ("embed_out.weight", ("final", None)),
        ("bert.pooler.dense.weight", ("final", None)),
        ("classifier.weight", ("final", None)),
        ("model.norm.weight", ("final", None)),
    ],
)
def test_classify(name, expected):
    assert classify(name) == expected


def test_layers_sorted_numerically_and_names_filesystem_safe():
    names = [f"model.layers.{i}.w" for i in (10, 2, 1, 0, 9)] + ["lm_head.weight"]
    units = plan_units(names)
    assert [u.name for u in units] == [
        "layer_000", "layer_001", "layer_002", "layer_009", "layer_010", "final"
    ]
    assert all(re.fullmatch(r"[a-z0-9_]+", u.name) for u in units)


def test_empty_groups_omitted_and_duplicates_ignored():
    assert plan_units([]) == []
    units = plan_units(["model.layers.0.b", "model.layers.0.a", "model.layers.0.a"])
    assert units == [Unit("layer_000", "layer", 0, ("model.layers.0.a", "model.layers.0.b"))]


def test_unit_validates_kind_and_index():
    with pytest.raises(ValueError, match="kind"):
        Unit("x", "middle", None, ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs an index"):
        Unit("layer_000", "layer", None, ())
    with pytest.raises(ValueError, match="needs an index"):
        Unit("final", "final", 3, ())
