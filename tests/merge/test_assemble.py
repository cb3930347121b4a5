"""src/dareflow/merge/assemble.py: shards, index, config, tokenizer, card, manifest; a round trip through
transformers' from_pretrained."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dareflow.io import storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.merge import assemble
from dareflow.merge.layers import plan_units

RECIPE = {
    "merge_method": "dare_linear",
    "base_model": "org/tiny-base",
    "models": [
        {"model": "org/tiny-math@abc123", "parameters": {"weight": 0.5, "drop_rate": 0.9}},
        {"model": "/data/tiny-facts", "parameters": {"density": 0.25}},
    ],
    "parameters": {"rescale": "inverse", "weight": 1.0},
    "dtype": "float32",
    "seed": 1234,
    "name": "tiny-merged",
}


def assemble_copy(src: Path, out: Path, dtype: str = "float32") -> dict[str, str]:
    """Copy a checkpoint unit by unit through the assemble functions (what the merge flow
    does with merged tensors). Returns shard file -> sha256."""
    base = Checkpoint.open(str(src))
    torch_dtype = getattr(torch, assemble.normalize_dtype(dtype))
    weight_map: dict[str, str] = {}
    shards: dict[str, str] = {}
    total = 0
    for unit in plan_units(base.tensors):
        tensors = {name: base.read(name).to(torch_dtype) for name in unit.tensors}
        file = f"model-{unit.name}.safetensors"
        sha, nbytes = assemble.write_shard(
            storage.join(str(out), file), tensors, {"unit": unit.name, "dareflow": "0.1.0"}
        )
        assert nbytes == (out / file).stat().st_size
        shards[file] = sha
        weight_map.update({name: file for name in unit.tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assemble.write_index(str(out), weight_map, total)
    assemble.copy_model_files(str(src), str(out), dtype)
    return shards


@pytest.mark.parametrize("source", ["tiny_llama_dir", "tiny_llama_sharded_dir"])
def test_roundtrip_loads_in_transformers_and_generates(source, request, tmp_path):
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(source)
    out = tmp_path / "merged"
    shards = assemble_copy(src, out)
    for file, sha in shards.items():
        assert hashlib.sha256((out / file).read_bytes()).hexdigest() == sha

    original = AutoModelForCausalLM.from_pretrained(src)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    ref = original.state_dict()
    got = merged.state_dict()
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
        expected = original.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    assert torch.equal(generated, expected)
    # The output reopens as a sharded checkpoint with the same tensors.
    assert list(Checkpoint.open(str(out)).tensors) == list(Checkpoint.open(str(src)).tensors)


def test_bf16_output_and_tokenizer_files(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bf16"
    assemble_copy(tiny_llama_dir, out, dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16  # transformers 5 loads in the config's dtype
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w3 w4 w5")["input_ids"][-3:] == [3, 4, 5]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama_dir / name).read_bytes()


def test_copy_model_files_dtype_fields_and_selection(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    config = {"model_type": "llama", "torch_dtype": "float32",
              "text_config": {"dtype": "float32"}, "vocab_size": 8}
    (base / "config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "model.safetensors", "training_args.bin", "notes.txt"):
        (base / name).write_text(name)
    out = tmp_path / "out"
    written = assemble.copy_model_files(str(base), str(out), "float16")
    assert written == ["config.json", "added_tokens.json", "merges.txt",
                       "special_tokens_map.json", "tokenizer.model", "vocab.json"]
    new = json.loads((out / "config.json").read_text())
    assert new["dtype"] == new["torch_dtype"] == new["text_config"]["dtype"] == "float16"
    assert new["vocab_size"] == 8
    assert sorted(p.name for p in out.iterdir()) == sorted(written)


def test_copy_model_files_errors(tmp_path):
    (tmp_path / "base").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        assemble.copy_model_files(str(tmp_path / "base"), str(tmp_path / "o"), "float32")
    with pytest.raises(ValueError, match="'int8'.*float32, bfloat16 or float16"):
        assemble.copy_model_files(str(tmp_path / "base"), str(tmp_path / "o"), "int8")
    with pytest.raises(FileNotFoundError, match="nope"):
        assemble.copy_model_files(str(tmp_path / "nope"), str(tmp_path / "o"), "float32")


# --------------------------------------------------------------------------- shards


def test_write_shard_is_deterministic(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "a": torch.randn(5, generator=gen),
        "c": torch.randn(2, 2, generator=gen, dtype=torch.float64),
    }
    metadata = {f"k{i}": str(i) for i in range(12)}
    results = set()
    for i in range(6):
        order = list(tensors) if i % 2 else list(reversed(tensors))
        md = dict(metadata.items()) if i % 2 else dict(reversed(metadata.items()))
        results.add(assemble.write_shard(
            str(tmp_path / f"s{i}.safetensors"), {k: tensors[k] for k in order}, md
        ))
    assert len(results) == 1
    assert len({(tmp_path / f"s{i}.safetensors").read_bytes() for i in range(6)}) == 1


def test_write_shard_header_and_values(tmp_path):
    path = tmp_path / "units" / "layer_000.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3).t(), "v": torch.ones(3, dtype=torch.float16)}
    sha, nbytes = assemble.write_shard(str(path), tensors, {"z": "1", "a": "2"})
    raw = path.read_bytes()
    assert (sha, nbytes) == (hashlib.sha256(raw).hexdigest(), len(raw))
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == ["a", "format", "z"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "2", "format": "pt", "z": "1"}
        assert torch.equal(f.get_tensor("w"), tensors["w"])  # non-contiguous input
        assert torch.equal(f.get_tensor("v"), tensors["v"])
    assert not [p for p in path.parent.iterdir() if storage.is_temporary(p.name)]


def test_write_shard_rejects_bad_metadata_and_shared_tensors(tmp_path):
    with pytest.raises(ValueError, match="strings to strings"):
        assemble.write_shard(str(tmp_path / "x.safetensors"), {"a": torch.ones(1)}, {"n": 1})
    shared = torch.ones(4)
    with pytest.raises(ValueError, match="cannot serialise"):
        assemble.write_shard(str(tmp_path / "y.safetensors"), {"a": shared, "b": shared})
    assert not list(tmp_path.iterdir())


def test_write_shard_to_s3(s3_store):
    bucket, opts = s3_store
    uri = storage.join(bucket, "runs", "r1", "units", "final.safetensors")
    sha, nbytes = assemble.write_shard(uri, {"x": torch.ones(3)}, **opts)
    assert storage.sha256_of(uri, **opts) == sha and storage.size(uri, **opts) == nbytes
    assert torch.equal(Checkpoint.open(uri, **opts).read("x"), torch.ones(3))


def test_write_index(tmp_path):
    uri = assemble.write_index(str(tmp_path), {"b": "s2.safetensors", "a": "s1.safetensors"}, 40)
    assert uri == storage.join(str(tmp_path), "model.safetensors.index.json")
    data = json.loads(Path(uri).read_text())
    assert data == {"metadata": {"total_size": 40},
                    "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    assert list(data["weight_map"]) == ["a", "b"]
    for bad_map, size in [({}, 1), ({"a": "../x.safetensors"}, 1), ({"a": "x.bin"}, 1),
                          ({"a": "x.safetensors"}, -1)]:
        with pytest.raises(ValueError, match="write_index"):
            assemble.write_index(str(tmp_path), bad_map, size)


# --------------------------------------------------------------------------- card, manifest


def test_model_card(tmp_path):
    sources = [
        {"id": "org/tiny-base", "role": "base", "revision": "0" * 40, "sha256": "aa"},
        {"id": "org/tiny-math", "role": "model", "revision": "abc123", "sha256": "bb"},
        {"id": "/data/tiny-facts", "role": "model", "uri": "/data/tiny-facts"},
    ]
    shards = {"model-layer_000.safetensors": "f" * 64, "model-embeddings.safetensors": "e" * 64}
    versions = {"dareflow": "0.1.0", "torch": torch.__version__}
    uri = assemble.write_model_card(
        str(tmp_path), recipe=RECIPE, sources=sources, shards=shards, versions=versions
    )
    text = Path(uri).read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "dare", "dareflow"]
    assert front["base_model"] == ["org/tiny-base", "org/tiny-math"]
    assert "# tiny-merged" in text
    assert "`dare_linear`" in text and "**Seed:** 1234" in text
    assert "inverse — kept deltas × 1/(1−p)" in text
    assert "| `org/tiny-math@abc123` | 0.9 | 0.5 |" in text
    assert "| `/data/tiny-facts` | 0.75 | 1.0 |" in text
    assert "| org/tiny-math | model | abc123 | bb | — |" in text
    block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == RECIPE
    files = text.split("## Files")[1]
    assert files.index("model-embeddings") < files.index("model-layer_000")
    assert f"`{'f' * 64}`" in files
    assert f"torch: {torch.__version__}" in text
    # Same inputs, same bytes (the card is part of what a cache compares).
    again = assemble.render_model_card(recipe=RECIPE, sources=sources, shards=shards,
                                       versions=versions)
    assert again == text


def test_model_card_local_only_sources(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "/models/base", "models": [{"model": "s3://b/ft"}]}
    text = assemble.render_model_card(recipe=recipe, sources=[], shards={}, versions={})
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["/models/base"]
    assert "base_model_relation" not in front


def test_write_manifest(tmp_path):
    uri = assemble.write_manifest(str(tmp_path), {"z": 1, "a": {"y": [1, 2], "b": None}})
    text = Path(uri).read_text()
    assert text == json.dumps({"a": {"b": None, "y": [1, 2]}, "z": 1}, indent=2) + "\n"
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        assemble.write_manifest(str(tmp_path), {"t": torch.ones(1)})


def test_model_card_says_whose_convention_each_option_follows():
    from dareflow.merge.plan import resolved_recipe
    from dareflow.recipe import parse_recipe

    recipe = parse_recipe({
        "merge_method": "dare_ties", "base_model": "org/base",
        "models": [{"model": "org/base"},
                   {"model": "org/a", "parameters": {"weight": [0, 0.5, 1], "density": 0.5}},
                   {"model": "org/b", "parameters": {"density": [
                       {"filter": "mlp", "value": 0.3}, {"value": 0.7}]}}],
        "parameters": {"lambda": 0.9}})
    text = assemble.render_model_card(recipe=resolved_recipe(recipe, "bfloat16"), sources=[],
                                      shards={}, versions={})
    section = text.split("## Recipe\n\n")[1].split("\n## ")[0]
    assert section.splitlines()[2:9] == [
        "- **Scale λ:** 0.9 · *set in the recipe*",
        ("- **Rescale:** l1 — kept deltas rescaled to the L1 norm of the full delta (mergekit "
        "since 2025) · *mergekit default for dare_ties*"),
        ("- **Sign election:** weighted_sum — sign of Σ w·δ (mergekit) · *mergekit default "
        "for dare_ties*"),
        ("- **Disjoint merge:** sum — Σ agreeing w·δ (mergekit normalize: false) · *mergekit "
        "default for dare_ties*"),
        "- **Trim after DARE:** 0.0 · *mergekit default for dare_ties*",
        "- **Seed:** 0 · *dareflow default*",
        "- **Output dtype:** bfloat16 · *dareflow default: the base checkpoint's dtype*",
    ]
    assert ("| `org/a` | 0.5 | gradient [0.0, 0.5, 1.0] | weight: set in the recipe; "
            "density: set in the recipe |") in section
    assert ("| `org/b` | 1 − density (mlp: 0.3; *: 0.7) | 1.0 | weight: dareflow default 1.0 "
            "(mergekit requires a weight); density: set in the recipe |") in section
    block = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert block["conventions"]["rescale"] == "mergekit default for dare_ties"
