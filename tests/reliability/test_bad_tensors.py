"""NaN/Inf, non-float tensors, mixed dtypes, corrupt and lying safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from dareflow.flows.merge import run_merge
from tests.reliability.conftest import (
    WEIGHTS,
    committed_units,
    refused,
    snapshot,
    variant,
    write_recipe,
)

UP = "model.layers.1.mlp.up_proj.weight"


def ta(base: Path, *models: Path, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m)} for m in models], "dtype": "float32", **extra}


def _poison(value: float):
    def edit(ts):
        ts = {n: t + 0.002 for n, t in ts.items()}
        ts[UP][3, 5] = value
        return ts
    return edit


def test_nan_in_a_finetune_names_tensor_and_model_and_publishes_nothing(pico_family, tmp_path):
    nan = variant(pico_family["base"], tmp_path / "nan-ft", tensors=_poison(float("nan")))
    out, store = tmp_path / "out", tmp_path / "store"
    path = write_recipe(tmp_path / "r.yaml", ta(pico_family["base"], nan))
    try:
        run_merge(str(path), str(out), store=str(store), max_workers=1)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("a NaN input was merged")
    assert f"tensor {UP!r} of model 'nan-ft' has 1 NaN/Inf values in its delta; check that " \
           "checkpoint (a corrupt shard or an fp16 overflow) or leave the model out" in msg
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))
    # units finished before the bad one stay committed and verify; the bad one is not
    units = committed_units(store)
    assert "layer_001" not in units
    for sidecar in store.glob("units/*/*.json"):
        record = json.loads(sidecar.read_text())
        shard = sidecar.with_suffix(".safetensors")
        assert snapshot(shard.parent)[shard.name] == record["sha256"]


def test_inf_in_the_base_is_named(pico_family, tmp_path):
    bad_base = variant(pico_family["base"], tmp_path / "inf-base", tensors=_poison(float("inf")))
    try:
        run_merge(str(write_recipe(tmp_path / "r.yaml", ta(bad_base, pico_family["a"]))),
                  str(tmp_path / "out"), max_workers=1)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("an Inf input was merged")
    assert f"tensor {UP!r} of the base model has 1 NaN/Inf values" in msg, msg
    assert not (tmp_path / "out").exists()


def test_non_float_tensor_in_a_finetune_is_refused(pico_family, tmp_path):
    ints = variant(pico_family["a"], tmp_path / "int-ft",
                   tensors=lambda ts: {**ts, UP: ts[UP].to(torch.int32)})
    msg = refused(ta(pico_family["base"], ints), tmp_path)
    assert f"model '{ints}' ({ints}): tensor {UP!r} has non-floating dtype I32 (base: F32); " \
           "re-save the model with floating weights" in msg


def test_non_float_buffers_that_differ_from_the_base_are_refused(pico_family, tmp_path):
    # buffers are copied from the base (tests/merge/test_buffers.py); other values are named
    pos = "model.position_ids"
    base = variant(pico_family["base"], tmp_path / "int-base",
                   tensors=lambda ts: {**ts, pos: torch.arange(8)})
    ft = variant(pico_family["a"], tmp_path / "int-ft",
                 tensors=lambda ts: {**ts, pos: torch.arange(8) + 1})
    msg = refused(ta(base, ft), tmp_path)
    assert f"  - tensor '{pos}' (I64 [8]) of the base differs in model(s) '{ft}' ({ft})" in msg


def test_bf16_base_and_f32_finetune_merge_in_float32(pico_family, tmp_path):
    base = variant(pico_family["base"], tmp_path / "bf16-base",
                   tensors=lambda ts: {n: t.to(torch.bfloat16) for n, t in ts.items()})
    ft = variant(pico_family["base"], tmp_path / "f32-ft",
                 tensors=lambda ts: {n: t.to(torch.bfloat16).float() + 1e-4 for n, t in ts.items()})
    out = tmp_path / "out"
    run_merge(str(write_recipe(tmp_path / "r.yaml", ta(base, ft, parameters={"lambda": 0.5}))),
              str(out), max_workers=1)
    b, f = load_file(base / WEIGHTS), load_file(ft / WEIGHTS)
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    for name, t in b.items():
        # 1e-4 is below bf16 resolution: a bf16 computation would lose it entirely
        expected = t.float() + 0.5 * (f[name] - t.float())
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], expected), name


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _write_header(path: Path, header: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text += b" " * (n - len(text))  # same length: tensor offsets stay where they were
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def test_truncated_file_is_refused(pico_family, tmp_path):
    cut = variant(pico_family["a"], tmp_path / "cut")
    data = (cut / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    msg = refused(ta(pico_family["base"], cut), tmp_path)
    assert f"safetensors file '{cut / WEIGHTS}' is corrupt or incomplete: tensor " in msg
    assert f"but the file has only {len(data) // 2} bytes (truncated). Download or write it " \
           "again" in msg


def test_garbage_file_is_refused(pico_family, tmp_path):
    junk = variant(pico_family["a"], tmp_path / "junk")
    (junk / WEIGHTS).write_bytes(b"<html>404 Not Found</html>" * 10)
    msg = refused(ta(pico_family["base"], junk), tmp_path)
    assert f"safetensors file '{junk / WEIGHTS}' is corrupt or incomplete: its header length " \
           "is" in msg and "(truncated, or not a safetensors file)" in msg


def test_header_that_lies_about_a_tensor_size_is_refused(pico_family, tmp_path):
    liar = variant(pico_family["a"], tmp_path / "liar")
    _, header = _header(liar / WEIGHTS)
    begin, end = header[UP]["data_offsets"]
    header[UP]["data_offsets"] = [begin, end - 4]
    _write_header(liar / WEIGHTS, header)
    msg = refused(ta(pico_family["base"], liar), tmp_path)
    assert f"tensor {UP!r} has data_offsets [{begin}, {end - 4}] ({end - 4 - begin} bytes) but " \
           f"dtype F32 and shape [64, 32] need {end - begin} bytes (the header lies)" in msg


def test_header_with_overlapping_tensors_is_refused(pico_family, tmp_path):
    liar = variant(pico_family["a"], tmp_path / "overlap")
    _, header = _header(liar / WEIGHTS)
    other = "model.layers.1.mlp.gate_proj.weight"
    header[UP]["data_offsets"] = list(header[other]["data_offsets"])
    _write_header(liar / WEIGHTS, header)
    msg = refused(ta(pico_family["base"], liar), tmp_path)
    assert "overlap in the file (the header lies)" in msg and other in msg and UP in msg
