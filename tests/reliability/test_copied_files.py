"""Files read and copied from input model folders (issue 14, item 4): only regular files
inside the folder, of bounded size, and no pointer to remote code in the output config.

Real files on the real filesystem: symbolic links, a FIFO, a sparse oversized file; real
merges (in-process, or a real ``dareflow merge`` process where a hang is possible).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from dareflow.io import storage
from dareflow.merge import assemble
from dareflow.sources import resolve
from dareflow.sources.files import (
    MAX_MODEL_FILE_BYTES,
    local_file_problem,
    open_local_file,
    read_model_file,
)
from tests.reliability.cli_runs import finish, start_merge
from tests.reliability.conftest import refused, snapshot, write_recipe

#: Stands for the content of /etc/passwd: must never appear in an output or the store.
SECRET = "root:x:0:0:SECRET-PASSWD-MARKER-4e1d"


def _refusal(base: Path, name: str, problem: str) -> str:
    return (f"model folder '{base}': {name} {problem}. dareflow reads and copies only regular "
            "files inside a model folder (a link out of it could publish any file of this "
            "machine with the merged model); replace it with a copy of the file it should "
            "be, or remove it")


@pytest.fixture
def passwd(tmp_path) -> Path:
    """A file outside every model folder, standing for /etc/passwd."""
    path = tmp_path / "etc" / "passwd"
    path.parent.mkdir()
    path.write_text(SECRET + "\n")
    return path


def _base_with(pico_family, tmp_path: Path, name: str, make) -> Path:
    """A copy of the pico base whose file ``name`` is replaced by ``make(path)``."""
    base = tmp_path / "models" / "base"
    shutil.copytree(pico_family["base"], base)
    (base / name).unlink(missing_ok=True)
    make(base / name)
    return base


def _recipe(base: Path, finetuned: Path, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(finetuned), "parameters": {"weight": 0.5}}], **extra}


def _holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def _s3_holding(bucket, needle: str) -> list[str]:
    fs, _ = storage.get_fs(bucket.uri, **bucket.storage_options)
    fs.invalidate_cache()
    return [key for key in fs.find(bucket.uri) if needle.encode() in fs.cat_file(key)]


# ------------------------------------------------------------------ links out of the folder


def test_vocab_file_linking_to_passwd_is_refused_before_anything_is_written(
        pico_family, tmp_path, passwd):
    base = _base_with(pico_family, tmp_path, "vocab.txt", lambda p: p.symlink_to(passwd))
    msg = refused(_recipe(base, pico_family["a"]), tmp_path)
    assert _refusal(base, "vocab.txt", f"is a symbolic link to {passwd}, outside the model "
                    "folder") in msg
    assert _holding(tmp_path / "out", SECRET) == []
    assert _holding(tmp_path / "store", SECRET) == []


def test_link_out_of_the_folder_is_never_uploaded_to_s3(pico_family, tmp_path, passwd,
                                                         s3_bucket):
    """An S3 output, and an S3 store (the local base is then mirrored, not read in place)."""
    base = _base_with(pico_family, tmp_path, "tokenizer.json", lambda p: p.symlink_to(passwd))
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(base, pico_family["a"]))
    expected = _refusal(base, "tokenizer.json", f"is a symbolic link to {passwd}, outside "
                        "the model folder")
    for out, store in ((f"{s3_bucket.uri}/out", str(tmp_path / "store")),
                       (str(tmp_path / "out"), f"{s3_bucket.uri}/store")):
        with pytest.raises(ValueError) as caught:
            run_merge(str(recipe), out, store=store, max_workers=1)
        assert expected in str(caught.value)
    assert _s3_holding(s3_bucket, SECRET) == []
    assert not (tmp_path / "out").exists()


def test_linked_sub_folder_out_of_the_model_is_refused(pico_family, tmp_path, passwd):
    """sentence-transformers' 1_Pooling/ linked to a folder elsewhere."""
    (passwd.parent / "config.json").write_text(json.dumps({"secret": SECRET}))
    base = _base_with(pico_family, tmp_path, "1_Pooling",
                      lambda p: p.symlink_to(passwd.parent, target_is_directory=True))
    with pytest.raises(ValueError) as caught:
        resolve(str(base))
    assert str(caught.value) == _refusal(
        base, "1_Pooling/config.json",
        f"is a symbolic link to {passwd.parent / 'config.json'}, outside the model folder")


def test_links_inside_the_folder_and_into_a_hub_cache_blob_are_read(tmp_path, passwd):
    # the layout huggingface_hub's cache uses: snapshots/<sha>/name -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"model_type": "llama"}')
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/abc123")
    (snap / "real.json").write_text("{}")
    (snap / "tokenizer_config.json").symlink_to("real.json")
    (snap / "vocab.txt").symlink_to(passwd)
    assert local_file_problem(snap, "config.json") is None
    assert local_file_problem(snap, "tokenizer_config.json") is None
    assert read_model_file(str(snap), "config.json") == b'{"model_type": "llama"}'
    assert local_file_problem(snap, "vocab.txt") == (
        f"is a symbolic link to {passwd}, outside the model folder")
    # a file that only looks like a cache snapshot gets no such leeway
    other = tmp_path / "plain" / "snapshots" / "x"
    other.mkdir(parents=True)
    (other / "config.json").symlink_to(repo / "blobs" / "abc123")
    assert local_file_problem(other, "config.json").startswith("is a symbolic link to ")


def test_a_file_swapped_for_a_link_after_the_listing_is_not_read(tmp_path, passwd):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "vocab.txt").write_text("a\nb\n")
    assert local_file_problem(folder, "vocab.txt") is None  # what the listing saw
    (folder / "vocab.txt").unlink()
    (folder / "vocab.txt").symlink_to(passwd)  # swapped before the copy opens it
    with pytest.raises(ValueError) as caught:
        open_local_file(folder, "vocab.txt")
    assert str(caught.value) == _refusal(folder, "vocab.txt", f"is a symbolic link to "
                                         f"{passwd}, outside the model folder")


def test_copy_model_files_refuses_a_link_even_without_the_listing(
        pico_family, tmp_path, passwd):
    """assemble's own check: a base folder that no listing looked at writes nothing."""
    base = _base_with(pico_family, tmp_path, "merges.txt", lambda p: p.symlink_to(passwd))
    out = tmp_path / "o"
    with pytest.raises(ValueError) as caught:
        assemble.copy_model_files(str(base), str(out), "float32")
    assert str(caught.value) == _refusal(base, "merges.txt", f"is a symbolic link to "
                                         f"{passwd}, outside the model folder")
    assert not out.exists()


# ------------------------------------------------------------------ special files


def test_fifo_named_like_a_tokenizer_file_does_not_hang_the_merge(pico_family, tmp_path):
    """A real `dareflow merge` process with a tokenizer policy, which reads every
    tokenizer file: a FIFO would block it forever."""
    base = _base_with(pico_family, tmp_path, "tokenizer.json", os.mkfifo)
    recipe = write_recipe(tmp_path / "r.yaml",
                          _recipe(base, pico_family["a"], tokenizer={"source": "union"}))
    started = time.monotonic()
    proc, sink = start_merge(recipe, tmp_path / "out", tmp_path / "store", tmp_path / "log")
    code = finish(proc, sink, timeout=240)
    log = (tmp_path / "log").read_text()
    assert code == 2, log
    assert ("error: " + _refusal(base, "tokenizer.json", "is a FIFO (named pipe), not a "
                                 "regular file")) in log, log
    assert time.monotonic() - started < 240
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_special_files_are_never_opened(tmp_path, kind):
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "tokenizer.model"
    sock = None
    if kind == "fifo":
        os.mkfifo(path)
        what = "a FIFO (named pipe)"
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        what = "a socket"
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs root (CAP_MKNOD)")
        what = "a character device"
    try:
        assert local_file_problem(folder, "tokenizer.model") == f"is {what}, not a regular file"
        started = time.monotonic()
        with pytest.raises(ValueError) as caught:
            read_model_file(str(folder), "tokenizer.model")
        assert time.monotonic() - started < 5
        assert "not a regular file" in str(caught.value)
    finally:
        if sock is not None:
            sock.close()


# ------------------------------------------------------------------ sizes


def test_oversized_tokenizer_file_is_refused_before_it_is_read(pico_family, tmp_path):
    def sparse(path: Path) -> None:  # no disk space used
        with open(path, "wb") as f:
            f.truncate(MAX_MODEL_FILE_BYTES + 1)

    base = _base_with(pico_family, tmp_path, "tokenizer.json", sparse)
    msg = refused(_recipe(base, pico_family["a"]), tmp_path)
    assert (f"local source {base}: tokenizer.json ({MAX_MODEL_FILE_BYTES + 1} bytes) larger "
            f"than the {MAX_MODEL_FILE_BYTES} bytes dareflow reads from a config, tokenizer "
            "or sentence-transformers file; is it the right file? Remove it if the model "
            "does not need it") in msg
    with pytest.raises(ValueError) as caught:  # and the reader's own bound
        read_model_file(str(base), "tokenizer.json")
    assert str(caught.value).startswith(f"'{base}/tokenizer.json' has more than "
                                        f"{MAX_MODEL_FILE_BYTES} bytes")


# ------------------------------------------------------------------ remote code


def test_remote_code_keys_are_dropped_with_a_note_in_the_card(pico_family, tmp_path):
    base = tmp_path / "models" / "base"
    shutil.copytree(pico_family["base"], base)
    config = json.loads((base / "config.json").read_text())
    config |= {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
               "trust_remote_code": True}
    (base / "config.json").write_text(json.dumps(config))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(tok))
    before = snapshot(base)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(base, pico_family["a"]))
    out = tmp_path / "out"
    run_merge(str(recipe), str(out), store=str(tmp_path / "store"), max_workers=1)
    written = json.loads((out / "config.json").read_text())
    assert not {"auto_map", "trust_remote_code", "custom_pipelines"} & set(written)
    assert written["model_type"] == config["model_type"]
    written_tok = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in written_tok
    assert {k: v for k, v in tok.items() if k != "auto_map"} == written_tok
    card = (out / "README.md").read_text()
    notes = card[card.index("\n## Notes\n"):]
    assert ("- `auto_map`, `trust_remote_code` dropped from `config.json`: these keys make "
            "transformers import Python code shipped with the base model "
            "(`trust_remote_code=True`), and a merge ships no code, so they would point at "
            "code that is not here.") in notes
    assert "- `auto_map` dropped from `tokenizer_config.json`: " in notes
    assert snapshot(base) == before  # the input is untouched
    # a base without those keys gets no Notes section
    plain = tmp_path / "plain"
    run_merge(str(write_recipe(tmp_path / "p.yaml", _recipe(pico_family["base"],
                                                            pico_family["a"]))),
              str(plain), store=str(tmp_path / "store"), max_workers=1)
    assert "## Notes" not in (plain / "README.md").read_text()
