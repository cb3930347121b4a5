"""Write-behind: a merged unit's shard goes into the run's staging folder from memory."""

import hashlib
from pathlib import Path

from dareflow.flows.merge import run_merge
from dareflow.merge import output, publish
from tests.flows.conftest import dare_ties_recipe


def test_private_staging_is_a_local_run_folder_this_process_sees(tmp_path):
    staging = tmp_path / ("model" + publish.STAGING_MARK + "0123456789abcdef")
    assert publish.private_staging(str(staging)) is None  # not created (another machine)
    staging.mkdir()
    assert publish.private_staging(str(staging)) == str(staging)
    assert publish.private_staging(f"file://{staging}") == str(staging)
    assert publish.private_staging(str(staging) + "/") == str(staging)
    for other in ("model", "model.partial-xyz", publish.STAGING_MARK + "0123456789abcdef"):
        (tmp_path / other).mkdir()
        assert publish.private_staging(str(tmp_path / other)) is None, other
    assert publish.private_staging("") is None
    # an object-store output is its own staging folder: it may hold the previous model
    assert publish.private_staging("s3://bucket/model.partial-0123456789abcdef") is None


def _shards(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.safetensors"))}


def test_merged_units_are_staged_from_memory_and_reused_units_copied(
        pico_family, tmp_path, monkeypatch):
    copied = []
    real_copy = output.copy_shard

    def counting_copy(src, dst, nbytes):
        copied.append(Path(dst).name)
        real_copy(src, dst, nbytes)

    monkeypatch.setattr(output, "copy_shard", counting_copy)
    recipe = dare_ties_recipe(tmp_path / "r.yaml", pico_family["base"], pico_family["a"],
                              pico_family["b"])
    store = tmp_path / "store"
    first = run_merge(str(recipe), str(tmp_path / "out1"), store=str(store), max_workers=2)
    assert not any(first["cached"].values())
    assert copied == []  # every shard was written by its unit
    shards = _shards(tmp_path / "out1")
    assert len(shards) == len(first["cached"])
    assert shards == {name: entry["sha256"] for name, entry in first["shards"].items()}

    second = run_merge(str(recipe), str(tmp_path / "out2"), store=str(store), max_workers=2)
    assert all(second["cached"].values())
    assert sorted(copied) == sorted(shards)  # committed units are copied from the store
    assert _shards(tmp_path / "out2") == shards


def test_a_staged_shard_is_kept_only_at_its_recorded_size_in_a_run_folder(tmp_path):
    staging = tmp_path / ("out" + publish.STAGING_MARK + "0123456789abcdef")
    staging.mkdir()
    (staging / "model-layer_000.safetensors").write_bytes(b"s" * 64)
    assert output.is_staged(str(staging), "model-layer_000.safetensors", 64)
    assert not output.is_staged(str(staging), "model-layer_000.safetensors", 65)
    assert not output.is_staged(str(staging), "model-layer_001.safetensors", 64)
    plain = tmp_path / "out"  # not a run's staging folder: always copied
    plain.mkdir()
    (plain / "model-layer_000.safetensors").write_bytes(b"s" * 64)
    assert not output.is_staged(str(plain), "model-layer_000.safetensors", 64)
