"""Source parsing, revision pinning and mirroring against real servers: a fake Hugging Face
Hub (a real HTTP server huggingface_hub talks to over the network), moto and nanio for S3.
Nothing in huggingface_hub, s3fs or fsspec is mocked."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dareflow.io import storage
from dareflow.io.s3 import storage_options_for
from dareflow.sources import Source, mirror_source, parse_source, resolve
from dareflow.sources.mirror import MARKER, mirror
from dareflow.sources.resolve import select_files

TOKEN = "hf_TestTokenValue0123456789abcdefXYZ"
WEIGHT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_files(uri: str, options: dict) -> dict[str, bytes]:
    """Every file under ``uri`` (relative name → bytes), through the store's filesystem."""
    fs, root = storage.get_fs(uri, **options)
    fs.invalidate_cache()
    return {p[len(root.rstrip("/")) + 1:]: fs.cat_file(p) for p in fs.find(root)}


@pytest.fixture
def repo_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """The tiny Llama as a Hub repo, plus files that must never be mirrored."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_llama_dir, repo)
    (repo / "README.md").write_text("# tiny\n")
    (repo / "pytorch_model.bin").write_bytes(b"pickle weights we never take")
    (repo / "training_args.bin").write_bytes(b"trainer pickle")
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.safetensors").write_bytes(b"sub-folder duplicate")
    return repo


@pytest.fixture
def pickle_repo(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A repo whose only weights are a real pickle (torch.save of a state dict)."""
    import torch
    from safetensors.torch import load_file

    repo = tmp_path / "pickle-repo"
    repo.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, repo / name)
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), repo / "pytorch_model.bin")
    (repo / "README.md").write_text("old checkpoint\n")
    return repo


# ------------------------------------------------------------------------------------------
# parse_source
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("meta-llama/Llama-2-7b-hf", Source("hub", "meta-llama/Llama-2-7b-hf", None)),
        ("org/name@v1.0", Source("hub", "org/name", "v1.0")),
        ("org/name@" + "a" * 40, Source("hub", "org/name", "a" * 40)),
        ("hf://org/name@refs/pr/1", Source("hub", "org/name", "refs/pr/1")),
        ("s3://bucket/models/base/", Source("s3", "s3://bucket/models/base")),
        ("s3a://bucket", Source("s3", "s3://bucket")),
    ],
)
def test_parse_source_remote(spec, expected):
    got = parse_source(spec)
    assert (got.kind, got.id, got.revision) == (expected.kind, expected.id, expected.revision)
    assert got.spec == spec


def test_parse_source_local_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    # An existing folder wins over the Hub id it looks like...
    assert parse_source("org/name") == Source("local", str(tmp_path / "org/name"), None,
                                              "org/name")
    # ...unless hf:// forces the Hub.
    assert parse_source("hf://org/name").kind == "hub"
    assert parse_source("./org/name").kind == "local"
    assert parse_source(f"file://{tmp_path}/org").id == str(tmp_path / "org")
    # A missing folder whose parent exists here is a mistyped path, never a Hub id...
    with pytest.raises(FileNotFoundError, match=r"'org/other' does not exist .*write "
                       r"hf://org/other for the Hub repo"):
        parse_source("org/other")
    # ...and without a local parent, what looks like a repo id is a Hub id.
    assert parse_source("nolocal/other").kind == "hub"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_source("./org/missing")
    with pytest.raises(ValueError, match=r"neither an existing local folder nor a Hub repo id"):
        parse_source("gpt2")
    with pytest.raises(ValueError, match="neither"):
        parse_source("a/b/c")
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        parse_source("hf://org/bad--name")
    with pytest.raises(ValueError, match="empty revision"):
        parse_source("org/name2@")
    with pytest.raises(ValueError, match="unsupported model source scheme 'gs'"):
        parse_source("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        parse_source("s3://")


def test_safe_ids_are_path_safe_and_distinct(tmp_path):
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    ids = {
        parse_source("org/name").safe_id,
        parse_source("s3://bucket/org/name").safe_id,
        parse_source(str(tmp_path / "a" / "m")).safe_id,
        parse_source(str(tmp_path / "b" / "m")).safe_id,
    }
    assert len(ids) == 4
    assert all("/" not in i and ".." not in i for i in ids)
    assert parse_source("org/name").safe_id == "hf--org--name"


# ------------------------------------------------------------------------------------------
# the fake Hub itself (huggingface_hub's own client against it)
# ------------------------------------------------------------------------------------------


def test_fake_hub_speaks_huggingface_hub(fake_hub, repo_dir, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    hub = fake_hub({"org/tiny": repo_dir})
    info = HfApi(endpoint=hub.endpoint).model_info("org/tiny", files_metadata=True)
    assert info.sha == hub.commit("org/tiny")
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == (repo_dir / "model.safetensors").stat().st_size
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["model.safetensors"].sha256 == _sha256(repo_dir / "model.safetensors")
    path = hf_hub_download("org/tiny", "config.json", revision=info.sha, endpoint=hub.endpoint,
                           cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == (repo_dir / "config.json").read_bytes()
    snap = snapshot_download("org/tiny", endpoint=hub.endpoint, local_dir=tmp_path / "snap",
                             allow_patterns=["*.json", "original/*"])
    got = {p.relative_to(snap).as_posix() for p in Path(snap).rglob("*")
           if p.is_file() and ".cache" not in p.parts}
    assert got == {"config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "original/consolidated.safetensors"}
    assert not any(r.headers.get("x-xet-hash") for r in hub.requests)


def test_fake_hub_ranges_and_errors(fake_hub, repo_dir):
    hub = fake_hub({"org/tiny": repo_dir})
    host, port = urlsplit(hub.endpoint).hostname, urlsplit(hub.endpoint).port
    data = (repo_dir / "model.safetensors").read_bytes()

    def get(path, headers=None):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r, body

    r, body = get("/org/tiny/resolve/main/model.safetensors", {"Range": "bytes=8-23"})
    assert r.status == 206 and body == data[8:24]
    assert r.getheader("Content-Range") == f"bytes 8-23/{len(data)}"
    assert r.getheader("X-Repo-Commit") == hub.commit("org/tiny")
    r, body = get("/org/tiny/resolve/main/model.safetensors", {"Range": "bytes=-4"})
    assert body == data[-4:]
    r, _ = get("/org/tiny/resolve/nope/config.json")
    assert (r.status, r.getheader("X-Error-Code")) == (404, "RevisionNotFound")
    r, _ = get("/org/tiny/resolve/main/missing.json")
    assert (r.status, r.getheader("X-Error-Code")) == (404, "EntryNotFound")
    r, _ = get("/api/models/org/unknown")
    assert (r.status, r.getheader("X-Error-Code")) == (401, "RepoNotFound")
    hub.stop()
    assert not any(t.name == "fake-hf-hub" for t in threading.enumerate())
    with pytest.raises(OSError):
        get("/api/models/org/tiny")


# ------------------------------------------------------------------------------------------
# mirror from the Hub
# ------------------------------------------------------------------------------------------


def test_hub_mirror_to_local_store_once(fake_hub, repo_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hub = fake_hub({"org/tiny": repo_dir})
    store = str(tmp_path / "store")
    commit = hub.commit("org/tiny")

    result = mirror_source("org/tiny", store, endpoint=hub.endpoint)
    assert result.uri == f"{store}/sources/hf--org--tiny/{commit}"
    assert result.source.revision == commit and result.source.requested_revision == "main"
    assert not result.cached
    # allow-patterns: no README, no .bin, no sub-folder file
    mirrored = {p.name for p in Path(result.uri).iterdir()}
    assert mirrored == WEIGHT_FILES | {MARKER}
    marker = json.loads((Path(result.uri) / MARKER).read_text())
    assert marker["source"] == {"kind": "hub", "id": "org/tiny", "revision": commit,
                                "requested_revision": "main", "spec": "org/tiny"}
    for rec in marker["files"]:
        assert rec["sha256"] == _sha256(repo_dir / rec["name"]) == \
            _sha256(Path(result.uri) / rec["name"])
        assert rec["size"] == (repo_dir / rec["name"]).stat().st_size
    assert sorted(hub.downloads()) == sorted(
        f"/org/tiny/resolve/{commit}/{name}" for name in WEIGHT_FILES)
    ref = json.loads(Path(store, "sources/hf--org--tiny/refs/main.json").read_text())
    assert ref["revision"] == commit

    # Second call: one metadata request to pin "main", no file request at all.
    hub.reset_requests()
    again = mirror_source("org/tiny", store, endpoint=hub.endpoint)
    assert again.cached and again.uri == result.uri
    assert hub.downloads() == [] and hub.count("HEAD") == 0
    assert hub.count("GET", "/api/models/org/tiny") == 1
    # Pinned to the commit sha: no request at all.
    hub.reset_requests()
    assert mirror(f"org/tiny@{commit}", store, endpoint=hub.endpoint) == result.uri
    assert hub.requests == []
    # No temporary files left behind.
    assert not [p for p in Path(store).rglob("*") if storage.is_temporary(p.name)]


def test_hub_mirror_to_s3_once(fake_hub, repo_dir, s3_bucket):
    hub = fake_hub({"org/tiny": repo_dir})
    uri, options, _ = s3_bucket
    commit = hub.commit("org/tiny")
    out = mirror("org/tiny", f"{uri}/store", endpoint=hub.endpoint)
    assert out == f"{uri}/store/sources/hf--org--tiny/{commit}"
    files = _store_files(out, options)
    assert set(files) == WEIGHT_FILES | {MARKER}
    for name in WEIGHT_FILES:
        assert files[name] == (repo_dir / name).read_bytes()
    # The shard is readable by byte range from S3 (what layer tasks do).
    header_len = int.from_bytes(storage.read_bytes(f"{out}/model.safetensors", 0, 8,
                                                   **options), "little")
    header = json.loads(storage.read_bytes(f"{out}/model.safetensors", 8, 8 + header_len,
                                           **options))
    assert "model.embed_tokens.weight" in header

    hub.reset_requests()
    again = mirror_source("org/tiny", f"{uri}/store", endpoint=hub.endpoint)
    assert again.cached and hub.downloads() == []


def test_token_sent_as_bearer_and_never_written(fake_hub, repo_dir, tmp_path, s3_bucket,
                                                 monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    hub = fake_hub({"org/private": repo_dir}, token=TOKEN)
    # Without a token the private repo is "not found", and the message says what to do.
    with pytest.raises(FileNotFoundError, match="HF_TOKEN"):
        mirror("org/private", str(tmp_path / "store"), endpoint=hub.endpoint)
    hub.reset_requests()

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the default source of the token
    local = mirror("org/private", str(tmp_path / "store"), endpoint=hub.endpoint)
    remote = mirror("org/private", f"{s3_bucket.uri}/store", endpoint=hub.endpoint)
    assert hub.requests and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert {r.status for r in hub.requests} == {200}

    written = _store_files(str(tmp_path / "store"), {})
    remote_files = _store_files(s3_bucket.uri, s3_bucket.storage_options)
    written.update({f"s3/{k}": v for k, v in remote_files.items()})
    assert len(written) >= 2 * len(WEIGHT_FILES)
    for name, data in written.items():
        assert TOKEN.encode() not in data, name
    assert TOKEN not in caplog.text
    assert local.endswith(hub.commit("org/private")) and remote.endswith(hub.commit("org/private"))


def test_pickle_only_repo_is_refused_with_instructions(fake_hub, pickle_repo, tmp_path):
    hub = fake_hub({"org/old": pickle_repo})
    with pytest.raises(ValueError) as info:
        mirror("org/old", str(tmp_path / "store"), endpoint=hub.endpoint)
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg
    assert "safe_serialization=True" in msg and "allow_pickle: true" in msg
    assert hub.downloads() == []  # refused before downloading anything
    assert not (tmp_path / "store").exists()


def test_pickle_opt_in_converts_to_safetensors(fake_hub, pickle_repo, tmp_path):
    import torch
    from safetensors.torch import load_file

    hub = fake_hub({"org/old": pickle_repo})
    result = mirror_source("org/old", str(tmp_path / "store"), endpoint=hub.endpoint,
                           allow_pickle=True)
    out = Path(result.uri)
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer.json",
                                               "tokenizer_config.json", "model.safetensors",
                                               MARKER}
    original = torch.load(pickle_repo / "pytorch_model.bin", weights_only=True)
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    marker = json.loads((out / MARKER).read_text())
    assert marker["converted_from_pickle"]["model.safetensors"] == {
        "from": "pytorch_model.bin", "sha256": _sha256(pickle_repo / "pytorch_model.bin")}
    hub.reset_requests()
    assert mirror_source("org/old", str(tmp_path / "store"), endpoint=hub.endpoint,
                         allow_pickle=True).cached
    assert hub.downloads() == []


def test_new_commit_gets_a_new_mirror_and_damage_is_repaired(fake_hub, repo_dir, tmp_path):
    hub = fake_hub({"org/tiny": repo_dir})
    store = str(tmp_path / "store")
    first = mirror("org/tiny", store, endpoint=hub.endpoint)
    # A new commit on the Hub: one edited file.
    (repo_dir / "config.json").write_text((repo_dir / "config.json").read_text() + "\n")
    second = mirror("org/tiny", store, endpoint=hub.endpoint)
    assert second != first and second.endswith(hub.commit("org/tiny"))
    assert Path(first, MARKER).exists()  # the old revision stays, untouched
    # A mirror whose files no longer match its marker is mirrored again, not trusted.
    Path(second, "model.safetensors").write_bytes(b"truncated")
    hub.reset_requests()
    result = mirror_source("org/tiny", store, endpoint=hub.endpoint)
    assert not result.cached and any(p.endswith("/model.safetensors") for p in hub.downloads())
    assert _sha256(Path(second, "model.safetensors")) == _sha256(repo_dir / "model.safetensors")


def test_offline_uses_the_mirror(fake_hub, repo_dir, tmp_path, monkeypatch):
    hub = fake_hub({"org/tiny": repo_dir})
    store = str(tmp_path / "store")
    first = mirror("org/tiny", store, endpoint=hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_requests()
    assert mirror("org/tiny", store, endpoint=hub.endpoint) == first
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    endpoint = hub.endpoint
    hub.stop()  # the Hub is gone: connection refused
    assert mirror("org/tiny", store, endpoint=endpoint) == first
    with pytest.raises(ConnectionError, match="cannot reach the Hub"):
        mirror("org/never-mirrored", store, endpoint=endpoint)


def test_index_limits_shards_and_missing_revision(fake_hub, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "sharded"
    repo.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_llama_dir / name, repo / name)
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, repo / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, repo / "consolidated.safetensors")  # a duplicate the index ignores
    hub = fake_hub({"org/sharded": repo})
    out = Path(mirror("org/sharded", str(tmp_path / "store"), endpoint=hub.endpoint))
    assert {p.name for p in out.iterdir()} == {
        "config.json", "tokenizer.json", "model.safetensors.index.json", *shards, MARKER}
    assert not any("consolidated" in p for p in hub.downloads())
    with pytest.raises(FileNotFoundError, match="revision 'v9' not found"):
        mirror("org/sharded@v9", str(tmp_path / "store"), endpoint=hub.endpoint)


# ------------------------------------------------------------------------------------------
# local and S3 sources
# ------------------------------------------------------------------------------------------


def test_local_source_in_place_or_copied(repo_dir, tmp_path, s3_bucket):
    store = str(tmp_path / "store")
    result = mirror_source(str(repo_dir), store)
    assert result.in_place and result.uri == str(repo_dir) and not (tmp_path / "store").exists()
    copied = mirror_source(str(repo_dir), store, copy_local=True)
    assert not copied.in_place and copied.source.revision.startswith("local-")
    assert {p.name for p in Path(copied.uri).iterdir()} == WEIGHT_FILES | {MARKER}
    assert mirror_source(str(repo_dir), store, copy_local=True).cached
    # An S3 store always gets a copy.
    remote = mirror(str(repo_dir), f"{s3_bucket.uri}/store")
    assert set(_store_files(remote, s3_bucket.storage_options)) == WEIGHT_FILES | {MARKER}
    # Touching a weight file changes the local revision; a README does not.
    rev = resolve(str(repo_dir)).revision
    (repo_dir / "README.md").write_text("changed\n")
    assert resolve(str(repo_dir)).revision == rev
    os.utime(repo_dir / "config.json", ns=(1, 1))
    assert resolve(str(repo_dir)).revision != rev


def test_s3_source_to_local_store(repo_dir, s3_bucket, tmp_path):
    uri, options, _ = s3_bucket
    fs, root = storage.get_fs(uri, **options)
    for p in repo_dir.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"{root}/models/tiny/{p.relative_to(repo_dir).as_posix()}",
                         p.read_bytes())
    src = f"{uri}/models/tiny"
    resolved = resolve(src)
    assert resolved.kind == "s3" and resolved.revision.startswith("s3-")
    assert {f.name for f in select_files(resolved).files} == WEIGHT_FILES
    result = mirror_source(src, str(tmp_path / "store"))
    assert {p.name for p in Path(result.uri).iterdir()} == WEIGHT_FILES | {MARKER}
    assert _sha256(Path(result.uri, "model.safetensors")) == _sha256(repo_dir /
                                                                     "model.safetensors")
    assert mirror_source(src, str(tmp_path / "store")).cached
    fs.pipe_file(f"{root}/models/tiny/config.json", b'{"changed": true}')
    assert resolve(src).revision != resolved.revision
    assert resolve(src).revision != result.source.revision


def test_s3_store_with_wrong_credentials_names_the_uri(repo_dir, nanio_bucket, monkeypatch):
    uri = nanio_bucket.uri
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(PermissionError) as info:
        mirror(str(repo_dir), f"{uri}/store")
    assert uri in str(info.value) and "definitely-wrong-secret" not in str(info.value)
    assert storage_options_for(uri)["secret"] == "definitely-wrong-secret"


def test_mirror_to_nanio_roundtrip(repo_dir, nanio_bucket):
    out = mirror(str(repo_dir), f"{nanio_bucket.uri}/store")
    files = _store_files(out, nanio_bucket.storage_options)
    assert files["model.safetensors"] == (repo_dir / "model.safetensors").read_bytes()
    assert mirror_source(str(repo_dir), f"{nanio_bucket.uri}/store").cached
