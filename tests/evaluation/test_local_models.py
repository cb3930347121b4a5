"""dareflow.evaluation.local: models in an object store are copied for lm-eval."""

import pytest

from dareflow.evaluation.local import is_remote, local_models
from dareflow.io import storage


def test_remote_folders_are_copied_local_ones_kept(s3_bucket, tmp_path):
    uri = f"{s3_bucket.uri}/store/models/m"
    storage.write_bytes_atomic(f"{uri}/config.json", b"{}")
    storage.write_bytes_atomic(f"{uri}/sub/w.safetensors", b"abc")
    out = local_models({"m": uri, "here": "/data/here"}, tmp_path / "cache")
    assert out["here"] == "/data/here"
    local = tmp_path / "cache" / out["m"].rsplit("/", 1)[-1]
    assert out["m"] == str(local)
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == [
        "config.json", "sub/w.safetensors"]
    assert (local / "sub" / "w.safetensors").read_bytes() == b"abc"
    # a new night's model replaces the copy
    storage.write_bytes_atomic(f"{uri}/sub/w.safetensors", b"xyz")
    storage.remove(f"{uri}/config.json")
    assert local_models({"m": uri}, tmp_path / "cache") == {"m": str(local)}
    assert [p.name for p in local.rglob("*") if p.is_file()] == ["w.safetensors"]
    assert (local / "sub" / "w.safetensors").read_bytes() == b"xyz"
    with pytest.raises(FileNotFoundError, match=r"model 'x' at '.*/nothing' holds no files"):
        local_models({"x": f"{s3_bucket.uri}/nothing"}, tmp_path / "cache")


def test_is_remote():
    assert is_remote("s3://b/m") and not is_remote("file:///m") and not is_remote("/m")
