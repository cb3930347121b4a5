"""sentence-transformers files (modules.json, its configs, 1_Pooling/config.json,
2_Normalize/) are mirrored from sources and carried into the merged model like the tokenizer
(sources/resolve.py ALLOW_PATTERNS, merge/assemble.py copy_model_files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dareflow.flows.merge import run_merge
from dareflow.merge import assemble
from dareflow.sources import mirror_source
from dareflow.sources.resolve import FileEntry, ResolvedSource, resolve, select_files
from tests.reliability.conftest import write_recipe

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"},
]
#: What a sentence-transformers save adds to the transformers folder, by relative path.
ST_FILES = {
    "modules.json": json.dumps(MODULES, indent=2),
    "config_sentence_transformers.json": json.dumps(
        {"__version__": {"sentence_transformers": "5.1.0"}, "prompts": {},
         "similarity_fn_name": "cosine"}),
    "sentence_bert_config.json": json.dumps({"max_seq_length": 32, "do_lower_case": False}),
    "1_Pooling/config.json": json.dumps({"word_embedding_dimension": 32,
                                         "pooling_mode_mean_tokens": True}),
    "2_Normalize/config.json": "{}",
}
#: Next to them, files that are never taken.
NEVER = {
    "README.md": "# the base's model card\n",
    "1_Pooling/notes.txt": "not the pooling config",
    "1_Pooling/nested/config.json": "{}",
    "2_Dense/config.json": "{}",
    "2_Dense/model.safetensors": "dense weights are not merged",
    "original/modules.json": "[]",
}
CARRIED = {"config.json", *ST_FILES}


def _st_folder(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    for name, text in {**ST_FILES, **NEVER}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / "vocab.d").mkdir()  # named like a tokenizer file, but a folder
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def st_base(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    return _st_folder(tiny_bert_dir, tmp_path / "st-base")


def test_copy_model_files_carries_sentence_transformers_files(st_base, tmp_path):
    out = tmp_path / "out"
    written = assemble.copy_model_files(str(st_base), str(out), "float32")
    assert written == ["config.json", "1_Pooling/config.json", "2_Normalize/config.json",
                       "config_sentence_transformers.json", "modules.json",
                       "sentence_bert_config.json"]
    got = _files(out)
    assert set(got) == CARRIED
    assert all(got[name] == text.encode() for name, text in ST_FILES.items())


def test_local_source_mirror_keeps_sentence_transformers_files(st_base, tmp_path):
    resolved = resolve(str(st_base))
    selected = {f.name for f in select_files(resolved).files}
    assert set(ST_FILES) <= selected
    assert not selected & set(NEVER)
    mirrored = mirror_source(str(st_base), str(tmp_path / "store"), copy_local=True)
    assert set(ST_FILES) <= set(_files(Path(mirrored.uri)))
    out = tmp_path / "out"
    assemble.copy_model_files(mirrored.uri, str(out), "float32")
    got = _files(out)
    assert set(got) == CARRIED
    assert all(got[name] == text.encode() for name, text in ST_FILES.items())


def test_hub_listing_selects_exactly_the_sentence_transformers_sub_folder_files():
    names = ["config.json", "model.safetensors", *ST_FILES, *NEVER, "2_Normalize/a/b.json",
             "original/consolidated.00.pth"]
    resolved = ResolvedSource("hub", "org/st", "0" * 40,
                              tuple(FileEntry(n, 1, "") for n in sorted(names)))
    assert sorted(f.name for f in select_files(resolved).files) == sorted(
        ["config.json", "model.safetensors", *ST_FILES])


def test_hub_mirror_downloads_the_pooling_config(fake_hub, st_base, tmp_path):
    hub = fake_hub({"org/st": st_base})
    result = mirror_source("org/st", str(tmp_path / "store"), endpoint=hub.endpoint)
    got = _files(Path(result.uri))
    assert all(got[name] == text.encode() for name, text in ST_FILES.items())
    assert not set(got) & set(NEVER)


def test_merged_sentence_transformer_keeps_its_files_but_not_the_base_card(st_base, tmp_path):
    ft = tmp_path / "st-ft"
    shutil.copytree(st_base, ft)
    weights = load_file(st_base / "model.safetensors")
    save_file({n: t + 0.001 for n, t in weights.items()}, str(ft / "model.safetensors"),
              metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(st_base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}], "dtype": "float32"})
    out = tmp_path / "merged"
    run_merge(str(recipe), str(out), store=str(tmp_path / "store"), max_workers=1)
    got = _files(out)
    assert all(got[name] == text.encode() for name, text in ST_FILES.items())
    assert not {"1_Pooling/notes.txt", "2_Dense/config.json"} & set(got)
    assert got["README.md"] != NEVER["README.md"].encode()  # the merge's own model card
    assert b"dareflow" in got["README.md"]
