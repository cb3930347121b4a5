"""src/dareflow/io/checkpoints.py, headers.py and homology.py: header parsing, byte-range reads,
folder layouts, check_family."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from dareflow.io import buffers, headers, storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.io.homology import check_family

ALL_DTYPES = {
    "bf16": torch.tensor([[1.5, -2.25], [3.0, 0.125]], dtype=torch.bfloat16),
    "f16": torch.tensor([1.0, -0.5, 65504.0], dtype=torch.float16),
    "f32": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "f64": torch.tensor([1e-300, 2.5], dtype=torch.float64),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "i16": torch.tensor([-3, 4], dtype=torch.int16),
    "i32": torch.tensor([[-1, 2**31 - 1]], dtype=torch.int32),
    "i64": torch.tensor([2**40, -7], dtype=torch.int64),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.25),
    "empty": torch.zeros(0, 4),
}


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A minimal model folder: model.safetensors (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with a hand-written (possibly lying) header."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# --------------------------------------------------------------------------- header + read


def test_header_matches_safetensors_and_reads_every_dtype(tmp_path):
    folder = write_folder(tmp_path / "m", ALL_DTYPES)
    ckpt = Checkpoint.open(str(folder))
    assert list(ckpt.tensors) == sorted(ALL_DTYPES)
    assert ckpt.config is None
    for name, expected in ALL_DTYPES.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(expected.shape)
        assert info.torch_dtype == expected.dtype
        assert info.nbytes == expected.numel() * expected.element_size()
        got = ckpt.read(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


def test_offsets_are_absolute(tmp_path):
    folder = write_folder(tmp_path / "m", {"a": torch.arange(4.0), "b": torch.ones(2, 2)})
    ckpt = Checkpoint.open(str(folder))
    raw = (folder / "model.safetensors").read_bytes()
    for name in ("a", "b"):
        info = ckpt.tensors[name]
        assert info.file == storage.join(str(folder), "model.safetensors")
        chunk = raw[info.start : info.end]
        assert torch.equal(torch.frombuffer(bytearray(chunk), dtype=torch.float32),
                           ckpt.read(name).flatten())


def test_read_owns_memory_and_is_writable(tmp_path):
    folder = write_folder(tmp_path / "m", {"w": torch.ones(3, 5, dtype=torch.bfloat16)})
    t = Checkpoint.open(str(folder)).read("w")
    assert t.is_contiguous()
    assert t.untyped_storage().nbytes() == 3 * 5 * 2
    t.add_(1)  # writable
    assert torch.all(t == 2)


def test_open_reads_headers_only_and_read_reads_one_range(tmp_path, monkeypatch, tiny_llama_dir):
    calls: list[tuple] = []
    real_read_bytes, real_read_into = storage.read_bytes, buffers.read_into

    def spy_read_bytes(uri, start=None, end=None, **kw):
        calls.append(("bytes", uri.rsplit("/", 1)[-1], start, end))
        return real_read_bytes(uri, start, end, **kw)

    def spy_read_into(uri, buffer, start=0, **kw):
        calls.append(("into", uri.rsplit("/", 1)[-1], start, start + len(buffer)))
        return real_read_into(uri, buffer, start, **kw)

    monkeypatch.setattr(storage, "read_bytes", spy_read_bytes)
    monkeypatch.setattr(buffers, "read_into", spy_read_into)
    ckpt = Checkpoint.open(str(tiny_llama_dir))
    weights = [c for c in calls if c[1] == "model.safetensors"]
    first_data = min(t.start for t in ckpt.tensors.values())
    assert all(c[0] == "bytes" and c[3] is not None and c[3] <= first_data for c in weights)
    calls.clear()
    name = "model.layers.1.mlp.up_proj.weight"
    ckpt.read(name)
    info = ckpt.tensors[name]
    assert calls == [("into", "model.safetensors", info.start, info.end)]


def test_sharded_equals_single(tiny_llama_dir, tiny_llama_sharded_dir):
    single = Checkpoint.open(str(tiny_llama_dir))
    sharded = Checkpoint.open(str(tiny_llama_sharded_dir))
    assert len(sharded.files) > 1
    assert list(single.tensors) == list(sharded.tensors)
    assert sharded.config["model_type"] == "llama"
    for name in single.tensors:
        assert torch.equal(single.read(name), sharded.read(name))
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == list(single.tensors)
        assert torch.equal(f.get_tensor("model.norm.weight"), single.read("model.norm.weight"))


def test_open_single_file_uri(tmp_path):
    path = tmp_path / "layer_000.safetensors"
    path.write_bytes(save({"x": torch.ones(2)}))
    ckpt = Checkpoint.open(str(path))
    assert list(ckpt.tensors) == ["x"] and ckpt.config is None
    assert torch.equal(ckpt.read("x"), torch.ones(2))


def test_fingerprint_stable_distinct_and_changes_with_file(tmp_path):
    folder = write_folder(tmp_path / "m", {"a": torch.zeros(2), "b": torch.zeros(2)})
    one, two = Checkpoint.open(str(folder)), Checkpoint.open(str(folder))
    assert one.fingerprint("a") == two.fingerprint("a")
    assert len(one.fingerprint("a")) == 32
    assert one.fingerprint("a") != one.fingerprint("b")
    write_folder(folder, {"a": torch.zeros(3), "b": torch.zeros(2)})
    assert Checkpoint.open(str(folder)).fingerprint("b") != one.fingerprint("b")


def test_unknown_tensor_suggests_names(tiny_llama_dir):
    ckpt = Checkpoint.open(str(tiny_llama_dir))
    with pytest.raises(KeyError, match="did you mean 'model.norm.weight'"):
        ckpt.read("model.norm.weights")


# --------------------------------------------------------------------------- refusals, errors


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoint.open(str(tmp_path / "nope"))


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        Checkpoint.open(str(folder))
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg
    assert "save_pretrained" in msg and "safetensors" in msg


def test_pt_file_is_refused(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "weights.pt")
    with pytest.raises(ValueError, match="refuses pickle"):
        Checkpoint.open(str(folder))
    with pytest.raises(ValueError, match="refuses pickle"):
        Checkpoint.open(str(folder / "weights.pt"))


def test_adapter_folder_explains(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="merge_and_unload"):
        Checkpoint.open(str(folder))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        Checkpoint.open(str(tmp_path))


def test_truncated_file_names_file_and_tensor(tmp_path, tiny_llama_dir):
    folder = tmp_path / "trunc"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as err:
        Checkpoint.open(str(folder))
    msg = str(err.value)
    assert "model.safetensors" in msg and "truncated" in msg
    last = max(Checkpoint.open(str(tiny_llama_dir)).tensors.values(), key=lambda t: t.end)
    assert repr(last.name) in msg


def test_truncated_after_open_is_caught_on_read(tmp_path):
    folder = write_folder(tmp_path / "m", {"a": torch.ones(4), "b": torch.ones(1000)})
    ckpt = Checkpoint.open(str(folder))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"tensor 'b'.*truncated"):
        ckpt.read("b")


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="header length is 10000"):
        Checkpoint.open(str(tmp_path))


def test_tiny_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="fewer than the 8-byte"):
        Checkpoint.open(str(tmp_path))


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        # 2x2 float32 needs 16 bytes, the header claims 12.
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16,
         r"tensor 'w'.*need 16 bytes.*lies"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
         r"'a' and 'b' overlap"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8,
         r"tensor 'w' needs bytes up to.*truncated"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8,
         r"tensor 'w' has data_offsets"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0",
         r"tensor 'w' has dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, b"",
         r"tensor 'w' has shape"),
        ({"__metadata__": {"format": 1}}, b"", r"__metadata__"),
    ],
)
def test_lying_headers(tmp_path, header, data, match):
    raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=match) as err:
        Checkpoint.open(str(tmp_path))
    assert "model.safetensors" in str(err.value)


def test_header_not_json(tmp_path):
    text = b"not json"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValueError, match="not valid JSON"):
        Checkpoint.open(str(tmp_path))


def test_index_with_missing_shard(tmp_path, tiny_llama_sharded_dir):
    folder = tmp_path / "sh"
    shutil.copytree(tiny_llama_sharded_dir, folder)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Checkpoint.open(str(folder))


def test_index_that_disagrees_with_shards(tmp_path, tiny_llama_sharded_dir):
    folder = tmp_path / "sh"
    shutil.copytree(tiny_llama_sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(
        s for s in shards if s != index["weight_map"]["model.norm.weight"]
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'model.norm.weight'"):
        Checkpoint.open(str(folder))


# --------------------------------------------------------------------------- S3


def test_checkpoint_over_s3(s3_store, tiny_llama_sharded_dir):
    bucket, opts = s3_store
    root = storage.join(bucket, "models", "tiny-llama-sharded")
    for path in sorted(Path(tiny_llama_sharded_dir).iterdir()):
        storage.copy_file(str(path), storage.join(root, path.name), **opts)
    remote = Checkpoint.open(root, **opts)
    local = Checkpoint.open(str(tiny_llama_sharded_dir))
    assert list(remote.tensors) == list(local.tensors)
    assert remote.config == local.config
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(remote.read(name), local.read(name))
    assert remote.fingerprint(name) != local.fingerprint(name)
    assert "ETag" in remote.files[remote.tensors[name].file].version


# --------------------------------------------------------------------------- check_family

BASE = {
    "model.embed_tokens.weight": torch.zeros(8, 4),
    "model.layers.0.mlp.up_proj.weight": torch.zeros(6, 4),
    "model.norm.weight": torch.zeros(4),
    "lm_head.weight": torch.zeros(8, 4),
}
LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 8, "tie_word_embeddings": False}


def open_family(tmp_path: Path, **models: tuple[dict, dict]) -> tuple[Checkpoint, dict]:
    base = Checkpoint.open(str(write_folder(tmp_path / "base", BASE, LLAMA_CONFIG)))
    opened = {
        k: Checkpoint.open(str(write_folder(tmp_path / k, tensors, config)))
        for k, (tensors, config) in models.items()
    }
    return base, opened


def test_check_family_accepts_homologous_models(tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in BASE.items()}
    base, models = open_family(tmp_path, a=(BASE, LLAMA_CONFIG), b=(bf16, LLAMA_CONFIG))
    check_family(base, models)


def test_check_family_reports_all_problems_at_once(tmp_path):
    missing = {k: v for k, v in BASE.items() if k != "model.norm.weight"}
    extra = {**BASE, "model.layers.0.extra.weight": torch.zeros(2)}
    vocab = {**BASE, "model.embed_tokens.weight": torch.zeros(9, 4),
             "lm_head.weight": torch.zeros(9, 4)}
    shape = {**BASE, "model.layers.0.mlp.up_proj.weight": torch.zeros(7, 4)}
    ints = {**BASE, "model.norm.weight": torch.zeros(4, dtype=torch.int32)}
    base, models = open_family(
        tmp_path,
        missing=(missing, LLAMA_CONFIG),
        extra=(extra, LLAMA_CONFIG),
        vocab=(vocab, LLAMA_CONFIG),
        shape=(shape, LLAMA_CONFIG),
        ints=(ints, LLAMA_CONFIG),
        other=(BASE, {**LLAMA_CONFIG, "model_type": "mistral"}),
    )
    with pytest.raises(ValueError) as err:
        check_family(base, models)
    msg = str(err.value)
    assert "(7 problems)" in msg
    assert "model 'missing'" in msg and "'model.norm.weight'" in msg
    assert "model 'extra'" in msg and "'model.layers.0.extra.weight'" in msg
    assert "vocabulary-size difference" in msg and "9 rows vs 8" in msg
    assert "same tokenizer" in msg or "share the base's tokenizer" in msg
    assert "resize" in msg
    assert "[7, 4] but the base has [6, 4]" in msg
    assert "non-floating dtype I32" in msg
    assert "model_type 'mistral'" in msg


def test_check_family_dtypes_may_be_refused(tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in BASE.items()}
    base, models = open_family(tmp_path, a=(bf16, LLAMA_CONFIG))
    check_family(base, models)
    with pytest.raises(ValueError, match="4 tensor\\(s\\) stored in another dtype.*BF16"):
        check_family(base, models, allow_dtypes_differ=False)


def test_check_family_accepts_a_non_float_base_buffer(tmp_path):
    # copied from the base, not merged (tests/merge/test_buffers.py): a model may lack it
    tensors = {**BASE, "model.embeddings.position_ids": torch.arange(4)}
    base = Checkpoint.open(str(write_folder(tmp_path / "b", tensors, LLAMA_CONFIG)))
    model = Checkpoint.open(str(write_folder(tmp_path / "m", tensors, LLAMA_CONFIG)))
    without = Checkpoint.open(str(write_folder(tmp_path / "w", BASE, LLAMA_CONFIG)))
    check_family(base, {"m": model, "w": without})


def test_check_family_needs_models(tmp_path):
    base, _ = open_family(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        check_family(base, {})


def test_tied_fine_tune_of_untied_base_reads_its_embeddings(tmp_path):
    tied = {k: v + 1 for k, v in BASE.items() if k != "lm_head.weight"}
    base, models = open_family(
        tmp_path, tied=(tied, {**LLAMA_CONFIG, "tie_word_embeddings": True})
    )
    check_family(base, models)
    ft = models["tied"]
    assert "lm_head.weight" in ft and "lm_head.weight" not in ft.tensors
    assert ft.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(ft.read("lm_head.weight"), ft.read("model.embed_tokens.weight"))
    assert ft.fingerprint("lm_head.weight") == ft.fingerprint("model.embed_tokens.weight")


def test_untied_fine_tune_of_tied_base_follows_the_base_with_a_warning(tmp_path, caplog):
    # policy (tests/reliability/test_homology.py): the merged model keeps the base's tying
    tied_config = {**LLAMA_CONFIG, "tie_word_embeddings": True}
    tied = {k: v for k, v in BASE.items() if k != "lm_head.weight"}
    base = Checkpoint.open(str(write_folder(tmp_path / "base", tied, tied_config)))
    model = Checkpoint.open(str(write_folder(tmp_path / "m", BASE, LLAMA_CONFIG)))
    check_family(base, {"m": model})
    assert "untied 'lm_head.weight' but the base ties" in caplog.text


def test_missing_lm_head_without_tying_is_missing(tmp_path):
    untied = {k: v for k, v in BASE.items() if k != "lm_head.weight"}
    base, models = open_family(tmp_path, m=(untied, LLAMA_CONFIG))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'lm_head.weight'.*tie_word_emb"):
        check_family(base, models)


def test_gpt2_family_with_tied_embeddings(tiny_gpt2_dir):
    base = Checkpoint.open(str(tiny_gpt2_dir))
    assert base.tie_word_embeddings and "lm_head.weight" not in base.tensors
    assert base.aliases == {"lm_head.weight": "transformer.wte.weight"}
    check_family(base, {"same": Checkpoint.open(str(tiny_gpt2_dir))})


def test_module_constants_cover_torch_dtypes():
    for code, dtype in headers.SAFETENSORS_DTYPES.items():
        assert isinstance(code, str) and isinstance(dtype, torch.dtype)
