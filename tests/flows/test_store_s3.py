"""The merge flow with its inputs, artifact store and output on S3 (a real moto server).

The ``s3_bucket`` fixture points the standard AWS_* variables at the server; the code
under test gets no storage options from the tests: it must find the store on its own.
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dareflow.cli import main
from dareflow.flows.merge import run_merge
from dareflow.io import storage
from tests.flows.conftest import dare_ties_recipe

# Distinctive values: grep finds them only if they leaked.
AWS_SECRET = "dareflowS3SecretNeverWritten0123"
HF_TOKEN = "hf_DareflowTokenNeverWritten0123456789"
ROOT = Path(__file__).resolve().parents[2]


def _upload(local: Path, uri: str) -> None:
    fs, path = storage.get_fs(uri)
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")


def _recipe(path: Path, base: str, a: str, b: str) -> Path:
    return dare_ties_recipe(path, base, a, b, seed=5)


def _s3_shards(out_uri: str) -> dict[str, str]:
    fs, path = storage.get_fs(out_uri)
    fs.invalidate_cache()
    return {Path(p).name: hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in sorted(fs.glob(f"{path}/*.safetensors"))}


def _local_shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


def _s3_sidecars(store_uri: str) -> dict[str, str]:
    """Committed unit sidecars: name -> ETag + LastModified (changes on any rewrite)."""
    fs, path = storage.get_fs(store_uri)
    fs.invalidate_cache()
    return {Path(p).name: f"{info['ETag']} {info['LastModified']}"
            for p, info in fs.find(f"{path}/units", detail=True).items()
            if p.endswith(".json")}


@pytest.fixture
def s3_family(s3_bucket, pico_family):
    """The pico family with both fine-tunes uploaded under ``{bucket}/models/``; the base
    stays a local folder (a recipe mixing kinds)."""
    uri = s3_bucket.uri
    for name in ("a", "b"):
        _upload(pico_family[name], f"{uri}/models/ft-{name}")
    return {"bucket": uri, "base": str(pico_family["base"]),
            "a": f"{uri}/models/ft-a", "b": f"{uri}/models/ft-b"}


def test_merge_on_s3_gives_the_bytes_of_the_merge_on_local_disk(s3_family, tmp_path):
    bucket = s3_family["bucket"]
    recipe = _recipe(tmp_path / "r.yaml", s3_family["base"], s3_family["a"], s3_family["b"])

    on_s3 = run_merge(str(recipe), f"{bucket}/out", store=f"{bucket}/store")
    local = run_merge(str(recipe), str(tmp_path / "out"), store=str(tmp_path / "store"))

    assert len(local["shards"]) == 4
    assert _s3_shards(f"{bucket}/out") == _local_shards(tmp_path / "out")
    assert on_s3["shards"] == local["shards"]
    # Inputs were mirrored into each store; the local base was copied into the S3 store
    # but read in place with the local store.
    by_role = {(s["role"], s["model"]): s for s in on_s3["sources"]}
    base = by_role[("base", s3_family["base"])]
    assert base["kind"] == "local" and base["revision"].startswith("local-")
    assert base["uri"] == f"{bucket}/store/sources/local--base--{base['uri'].split('--')[2]}"
    ft_a = by_role[("fine-tuned", s3_family["a"])]
    assert ft_a["kind"] == "s3" and ft_a["id"] == s3_family["a"]
    assert ft_a["revision"].startswith("s3-")
    assert ft_a["uri"] == (f"{bucket}/store/sources/s3--{bucket[len('s3://'):]}--models--ft-a/"
                           f"{ft_a['revision']}")
    local_base = next(s for s in local["sources"] if s["role"] == "base")
    assert local_base["uri"] == str(Path(s3_family["base"]).resolve())
    local_a = next(s for s in local["sources"] if s["model"] == s3_family["a"])
    assert local_a["revision"] == ft_a["revision"]
    assert local_a["uri"].startswith(str(tmp_path / "store" / "sources" / "s3--"))
    # The manifest on S3 records the sha256 of every shard, which match the bytes.
    manifest = json.loads(storage.read_bytes(f"{bucket}/out/manifest.json"))
    assert {f: s["sha256"] for f, s in manifest["shards"].items()} == _s3_shards(f"{bucket}/out")

    # A rerun with nothing changed reuses every unit and every mirror.
    again = run_merge(str(recipe), f"{bucket}/out2", store=f"{bucket}/store")
    assert all(again["cached"].values())
    assert _s3_shards(f"{bucket}/out2") == _s3_shards(f"{bucket}/out")


def _merge_in_subprocess(args: list[str], log: Path, env: dict[str, str]) -> int:
    """`dareflow merge ARGS` in its own process group; the group is killed afterwards so
    its temporary Prefect server never outlives the test."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dareflow.cli", "merge", *args],
                                env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        try:
            return proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_killed_merge_on_s3_resumes_without_recomputing_committed_units(s3_family, tmp_path):
    bucket = s3_family["bucket"]
    recipe = _recipe(tmp_path / "r.yaml", s3_family["base"], s3_family["a"], s3_family["b"])
    store, out = f"{bucket}/store", f"{bucket}/out"
    code = _merge_in_subprocess(
        [str(recipe), "--out", out, "--store", store, "--max-workers", "1"],
        tmp_path / "killed.log", {**os.environ, "DAREFLOW_FAULT": "unit-committed:2",
                                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"},
    )
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    committed = _s3_sidecars(store)
    assert len(committed) == 2
    assert not storage.exists(f"{out}/manifest.json")  # nothing published

    result = run_merge(str(recipe), out, store=store)
    assert sum(result["cached"].values()) == 2
    after = _s3_sidecars(store)
    assert {k: after[k] for k in committed} == committed  # neither recomputed nor rewritten
    assert len(after) == 4
    reference = run_merge(str(recipe), str(tmp_path / "ref"), store=str(tmp_path / "store"))
    assert _s3_shards(out) == _local_shards(tmp_path / "ref")
    assert result["shards"] == reference["shards"]


def test_cli_merge_to_s3_writes_no_secret_and_records_pinned_sources(
        s3_bucket, pico_family, fake_hub, tmp_path, monkeypatch, capsys):
    hub = fake_hub({"org/ft-a": pico_family["a"]}, token=HF_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)  # moto accepts any secret
    bucket = s3_bucket.uri
    _upload(pico_family["b"], f"{bucket}/models/ft-b")
    recipe = _recipe(tmp_path / "r.yaml", str(pico_family["base"]), "org/ft-a",
                     f"{bucket}/models/ft-b")

    code = main(["merge", str(recipe), "--out", f"{bucket}/x", "--store", f"{bucket}/store",
                 "--max-workers", "2"])
    assert code == 0
    assert f"merged 4 shard(s) into {bucket}/x" in capsys.readouterr().out

    # Sources: kind, id, requested and pinned revision, mirrored URI.
    manifest = json.loads(storage.read_bytes(f"{bucket}/x/manifest.json"))
    hub_source = next(s for s in manifest["sources"] if s["model"] == "org/ft-a")
    commit = hub.commit("org/ft-a")
    assert hub_source == {
        "role": "fine-tuned", "model": "org/ft-a", "kind": "hub", "id": "org/ft-a",
        "requested_revision": "main", "revision": commit,
        "uri": f"{bucket}/store/sources/hf--org--ft-a/{commit}",
    }
    shards = _s3_shards(f"{bucket}/x")
    assert {f: s["sha256"] for f, s in manifest["shards"].items()} == shards
    card = storage.read_bytes(f"{bucket}/x/README.md").decode()
    assert commit in card and "requested_revision" in card
    for name, sha in shards.items():
        assert f"| `{name}` | `{sha}` |" in card

    # A rerun reuses every unit; Prefect now records its cache entries in the store too.
    assert main(["merge", str(recipe), "--out", f"{bucket}/y", "--store", f"{bucket}/store"]) == 0
    assert "merged 0 unit(s), reused 4 committed unit(s)" in capsys.readouterr().out

    # No object of the bucket (mirrors, units, Prefect results, the model) holds a secret.
    fs, _ = storage.get_fs(bucket)
    fs.invalidate_cache()
    objects = fs.find(bucket[5:])
    assert any("/prefect-results/" in o for o in objects)
    assert any("/sources/hf--org--ft-a/" in o for o in objects)
    for obj in objects:
        data = fs.cat_file(obj)
        for secret in (AWS_SECRET, HF_TOKEN):
            assert secret.encode() not in data, f"{secret[:6]}... leaked into s3://{obj}"
