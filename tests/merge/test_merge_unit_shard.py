"""merge_unit lays the shard out before merging: same bytes as assemble.write_shard."""

from __future__ import annotations

import pytest
import torch

from dareflow.io import buffers
from dareflow.merge import assemble, units


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shard_buffer_matches_write_shard_bytes(dtype, tmp_path):
    shapes = {"model.layers.0.mlp.up_proj.weight": (16, 8), "model.layers.0.norm.weight": (8,),
              "a.b": (3, 5, 2), "émbed.weight": (7,)}
    views, _, _, buffer, size = units._shard_buffer(shapes, dtype)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, view in views.items():
        view.copy_(torch.randn(view.shape, generator=generator).to(dtype))
        tensors[name] = view.clone()
    expected_head, expected_data = assemble.shard_bytes(tensors, {"format": "pt"})
    assert bytes(buffer[:size]) == expected_head + bytes(expected_data)
    with buffers.FillingWrite([str(tmp_path / "a.safetensors")], buffer, size) as write:
        ours = (write.finish(), size)
    theirs = assemble.write_shard(str(tmp_path / "b.safetensors"), tensors, {"format": "pt"})
    assert ours == theirs
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
