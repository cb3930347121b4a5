"""Non-floating tensors (buffers): copied from the base, never merged (io/homology.py
check_family and check_buffers, merge/plan.py, merge/units.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dareflow.flows.merge import run_merge
from dareflow.io import buffers
from dareflow.io.checkpoints import Checkpoint
from dareflow.io.homology import check_buffers, check_family
from dareflow.merge import assemble, units
from tests.reliability.conftest import refused, write_recipe

POS = "bert.embeddings.position_ids"
WORDS = "bert.embeddings.word_embeddings.weight"
DELTA = 0.002


def _bert_folder(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def bert_pair(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BERT base stored as older transformers saved it (with an int64
    ``position_ids`` [1, 32]) and a fine-tune saved without it (base + 0.002 everywhere);
    a second fine-tune stores position ids that differ from the base's."""
    root = tmp_path_factory.mktemp("bert-pair")
    weights = load_file(tiny_bert_dir / "model.safetensors")
    assert POS not in weights  # transformers 5 does not save the buffer
    positions = torch.arange(32, dtype=torch.int64).unsqueeze(0)
    tuned = {n: t + DELTA for n, t in weights.items()}
    return {
        "base": _bert_folder(tiny_bert_dir, root / "base", {**weights, POS: positions}),
        "ft": _bert_folder(tiny_bert_dir, root / "ft", tuned),
        "other": _bert_folder(tiny_bert_dir, root / "other",
                              {**tuned, POS: positions.flip(-1).contiguous()}),
    }


def _dare(base: Path, *models: Path, **extra) -> dict:
    return {"merge_method": "dare_linear", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}}
                       for m in models],
            "parameters": {"rescale": "inverse"}, "dtype": "float32", "seed": 3, **extra}


def test_bert_pair_with_a_base_only_buffer_merges_and_loads(bert_pair, tmp_path):
    from transformers import BertForMaskedLM

    out = tmp_path / "merged"
    run_merge(str(write_recipe(tmp_path / "r.yaml", _dare(bert_pair["base"], bert_pair["ft"]))),
              str(out), store=str(tmp_path / "store"), max_workers=1)
    base = load_file(bert_pair["base"] / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = {}
    for file in set(index["weight_map"].values()):
        merged.update(load_file(out / file))
    assert set(merged) == set(base)
    assert merged[POS].dtype == torch.int64
    assert torch.equal(merged[POS], base[POS])
    # DARE ran on the weights: each delta element is dropped (0) or rescaled (2 x 0.002)
    delta = merged[WORDS] - base[WORDS]
    rescaled = torch.isclose(delta, torch.tensor(2 * DELTA), atol=1e-6)
    assert bool((rescaled | (delta == 0)).all())
    assert 0.4 < rescaled.float().mean().item() < 0.6

    model, info = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(model.bert.embeddings.position_ids, base[POS])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight.detach(), merged[WORDS])


def test_differing_buffers_are_refused_before_any_unit(bert_pair, tmp_path):
    msg = refused(_dare(bert_pair["base"], bert_pair["ft"], bert_pair["other"]), tmp_path)
    base, other = bert_pair["base"], bert_pair["other"]
    assert (
        f"non-floating tensors (buffers) are copied from the base '{base}', not merged, and "
        f"these differ:\n  - tensor '{POS}' (I64 [1, 32]) of the base differs in model(s) "
        f"'{other}' ({other})\nRemove the tensor from the models that differ (transformers "
        "recomputes buffers such as position_ids, and a model saved by a current "
        "transformers version does not store them), or make the model whose values you "
        "want the base"
    ) in msg


def test_without_a_base_buffers_are_compared_to_the_first_model(bert_pair, tmp_path):
    first = Checkpoint.open(str(bert_pair["base"]))
    same = Checkpoint.open(str(bert_pair["base"]))
    check_buffers(first, {"same": same, "ft": Checkpoint.open(str(bert_pair["ft"]))},
                  base_role="first model")
    with pytest.raises(ValueError, match=r"(?s)copied from the first model .* of the first "
                                         r"model differs in model\(s\) 'other'"):
        check_buffers(first, {"other": Checkpoint.open(str(bert_pair["other"]))},
                      base_role="first model")


# --------------------------------------------------------------------------- check_family

FLOATS = {"w.weight": torch.ones(2, 3), "n.weight": torch.ones(3)}
CONFIG = {"model_type": "bert", "hidden_size": 3}


def _open(folder: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return Checkpoint.open(str(folder))


def test_a_fine_tune_may_lack_a_buffer_but_not_a_weight(tmp_path):
    base = _open(tmp_path / "base", {**FLOATS, "pos": torch.arange(4)})
    without = _open(tmp_path / "without", FLOATS)
    check_family(base, {"without": without})
    no_weight = _open(tmp_path / "no-weight", {"w.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError) as err:
        check_family(base, {"no-weight": no_weight})
    assert (f"model 'no-weight' ({no_weight.uri}): missing 1 tensor(s) present in the base: "
            "'n.weight'") in str(err.value)
    assert "'pos'" not in str(err.value)


def test_a_buffer_of_another_dtype_is_named(tmp_path):
    base = _open(tmp_path / "base", {**FLOATS, "pos": torch.arange(4)})
    i32 = _open(tmp_path / "i32", {**FLOATS, "pos": torch.arange(4, dtype=torch.int32)})
    with pytest.raises(ValueError) as err:
        check_family(base, {"i32": i32})
    assert (f"model 'i32' ({i32.uri}): buffer 'pos' is stored as I32 but the base stores "
            "I64; non-floating tensors are copied from the base, not merged: remove it from "
            "this model's safetensors") in str(err.value)


def test_a_buffer_only_in_a_fine_tune_is_left_out_with_a_warning(tmp_path, caplog):
    base = _open(tmp_path / "base", FLOATS)
    extra = _open(tmp_path / "extra", {**FLOATS, "pos": torch.arange(4)})
    with caplog.at_level(logging.WARNING, logger="dareflow.io.homology"):
        check_family(base, {"extra": extra})
    assert "stores non-floating tensor(s) the base does not have: 'pos'" in caplog.text
    float_extra = _open(tmp_path / "float-extra", {**FLOATS, "x.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) not in the base: 'x.weight'"):
        check_family(base, {"float-extra": float_extra})


def test_check_buffers_reads_only_buffers_and_compares_bytes(tmp_path):
    base = _open(tmp_path / "base", {**FLOATS, "pos": torch.arange(4), "mask": torch.ones(2).bool()})
    same = _open(tmp_path / "same", {"w.weight": torch.zeros(2, 3), "n.weight": torch.ones(3),
                                     "pos": torch.arange(4)})
    flipped = _open(tmp_path / "flipped", {**FLOATS, "pos": torch.arange(4),
                                           "mask": torch.tensor([True, False])})
    check_buffers(base, {"same": same})  # float weights differ: not compared
    with pytest.raises(ValueError) as err:
        check_buffers(base, {"same": same, "flipped": flipped})
    msg = str(err.value)
    assert f"tensor 'mask' (BOOL [2]) of the base differs in model(s) 'flipped' ({flipped.uri})" \
        in msg
    assert "'pos'" not in msg and "'same'" not in msg


# --------------------------------------------------------------------------- shard layout


def test_unit_shard_with_a_buffer_has_write_shard_bytes(tmp_path):
    shapes = {"emb.weight": (4, 3), "pos": (1, 5), "a.mask": (2,), "ln.bias": (3,)}
    kept = {"pos": torch.int64, "a.mask": torch.bool}
    views, ends, header, buffer, size = units._shard_buffer(shapes, torch.bfloat16, kept)
    assert list(views) == ["pos", "emb.weight", "ln.bias", "a.mask"]  # file order
    assert list(ends.values()) == sorted(ends.values()) and ends["a.mask"] == size
    tensors = {}
    for name, view in views.items():
        value = torch.arange(view.numel()).reshape(view.shape)
        view.copy_(value % 2 == 0 if view.dtype == torch.bool else value.to(view.dtype))
        tensors[name] = view.clone()
    assert {n: t.dtype for n, t in tensors.items()} == {
        "emb.weight": torch.bfloat16, "pos": torch.int64, "a.mask": torch.bool,
        "ln.bias": torch.bfloat16}
    head, data = assemble.shard_bytes(tensors, {"format": "pt"})
    assert bytes(buffer[:size]) == head + bytes(data)
    assert header == len(head)
    with buffers.FillingWrite([str(tmp_path / "u.safetensors")], buffer, size) as write:
        assert write.finish() == hashlib.sha256(head + bytes(data)).hexdigest()
    loaded = load_file(tmp_path / "u.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
