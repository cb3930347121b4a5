"""Pre-flight from metadata only (dareflow.merge.preflight, dareflow.sources.headers): against
the local fake Hub (a real HTTP server; its request log shows what was fetched), moto S3 (its
access log) and local folders, with real tiny checkpoints. The merge flow runs it first."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dareflow.errors import ProblemsError
from dareflow.io import storage
from dareflow.merge.preflight import Estimate, IORates, measure_io, preflight
from dareflow.recipe import parse_recipe
from dareflow.sources import mirror_source
from tests.flows.conftest import pico_family, write_recipe  # noqa: F401
from tests.reliability.conftest import variant

TOKEN = "hf_PreflightToken0123456789abcdefXYZ"
UP = "model.layers.0.mlp.up_proj.weight"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _hub_repo(src: Path, dst: Path) -> Path:
    """``src`` as a Hub repo, plus files the mirror never takes."""
    shutil.copytree(src, dst)
    (dst / "README.md").write_text("# card\n")
    (dst / "original").mkdir()
    (dst / "original" / "consolidated.safetensors").write_bytes(b"sub-folder duplicate")
    return dst


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _header_end(path: Path) -> int:
    """Offset one past a safetensors file's header: 8 + its header length."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _weight_requests(hub) -> list:
    return [r for r in hub.requests if "/resolve/" in r.path and r.path.endswith(".safetensors")]


def _assert_only_headers_fetched(hub, repos: dict[str, Path]) -> dict[str, int]:
    """Every GET of a weight file asks for bytes within its header and got 206; returns the
    number of such requests per file (``repo/file``)."""
    counts: dict[str, int] = {}
    for r in _weight_requests(hub):
        repo, name = next((rid, r.path.rsplit("/", 1)[-1]) for rid in repos
                          if r.path.startswith(f"/{rid}/resolve/"))
        assert f"/resolve/{hub.commit(repo)}/" in r.path  # pinned to the commit sha
        assert r.method == "GET" and r.range is not None, f"full GET of {r.path}"
        assert r.status == 206, (r.path, r.status)
        _, last = map(int, r.range.removeprefix("bytes=").split("-"))
        assert last < _header_end(repos[repo] / name), f"{r.range} of {r.path} reads weights"
        counts[f"{repo}/{name}"] = counts.get(f"{repo}/{name}", 0) + 1
    return counts


@pytest.fixture
def hub_family(pico_family, tiny_llama_sharded_dir, tmp_path, fake_hub):  # noqa: F811
    """org/base: the tiny Llama in shards with an index; org/ft: a fine-tune, one file."""
    repos = {"org/base": _hub_repo(tiny_llama_sharded_dir, tmp_path / "hub-base"),
             "org/ft": _hub_repo(pico_family["a"], tmp_path / "hub-ft")}
    return fake_hub(repos, token=TOKEN), repos


def _ta(base: str, *models: str, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": m} for m in models], "dtype": "float32", **extra}


# ------------------------------------------------------------------------------------------
# the Hub: ranged requests only
# ------------------------------------------------------------------------------------------


def test_plan_from_hub_headers_lists_sizes_and_fetches_no_weight(hub_family, tmp_path):
    hub, repos = hub_family
    store = tmp_path / "store"
    report = preflight(parse_recipe(_ta("org/base", "org/ft")), str(store),
                       out_uri=str(tmp_path / "out"), workers=2, measure=False,
                       token=TOKEN, endpoint=hub.endpoint)
    assert report.ok, report.problems
    assert [(s.role, s.model, s.read_from, s.source.revision) for s in report.sources] == [
        ("base", "org/base", "hub", hub.commit("org/base")),
        ("fine-tuned", "org/ft", "hub", hub.commit("org/ft"))]

    # what the mirror would download: every top-level file it takes, nothing else
    def mirrored_size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.iterdir()
                   if p.is_file() and p.name != "README.md")
    assert [s.download_bytes for s in report.sources] == [
        mirrored_size(repos["org/base"]), mirrored_size(repos["org/ft"])]

    base, ft = _weights(repos["org/base"]), _weights(repos["org/ft"])
    assert report.tensors == len(base) and report.units == 4 and report.out_dtype == "float32"
    e = report.estimate
    assert e.download_bytes == sum(s.download_bytes for s in report.sources)
    assert e.unit_bytes == sum(_nbytes(t) for t in base.values())  # float32 out, float32 in
    assert e.input_bytes == e.unit_bytes + sum(_nbytes(t) for t in ft.values())
    assert e.store_bytes == e.download_bytes + e.unit_bytes
    # the output holds a copy of the shards (never hard links into the store)
    assert e.output_disk_bytes == e.unit_bytes
    units: dict[str, int] = {}
    for name, t in base.items():
        m = _LAYER.search(name)
        unit = f"layer_{int(m.group(1)):03d}" if m else ("embeddings" if "embed" in name
                                                           else "final")
        units[unit] = units.get(unit, 0) + 3 * _nbytes(t)  # output + base + fine-tune
    largest = max(units, key=units.get)
    assert (e.largest_unit, e.unit_memory_bytes) == (largest, units[largest])
    assert e.memory_bytes == 2 * units[largest] and e.merge_seconds is None

    # the Hub's log: model info, config.json and the index whole, weight files by range only
    counts = _assert_only_headers_fetched(hub, repos)
    shards = set(json.loads((repos["org/base"] / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert counts == {**{f"org/base/{s}": 2 for s in shards}, "org/ft/model.safetensors": 2}
    whole = sorted(r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests
                   if "/resolve/" in r.path and r.range is None)
    assert whole == ["config.json", "config.json", "model.safetensors.index.json"]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert not (store / "sources").exists()


def test_family_problem_on_the_hub_is_reported_without_weight_bytes(
        pico_family, tmp_path, fake_hub):  # noqa: F811
    def edit(ts):
        ts = {n: t + 0.001 for n, t in ts.items()}
        del ts[UP]
        ts["model.norm.weight"] = torch.ones(48)
        return ts
    bad = variant(pico_family["a"], tmp_path / "bad", tensors=edit)
    repos = {"org/base": _hub_repo(pico_family["base"], tmp_path / "hub-base"),
             "org/bad": _hub_repo(bad, tmp_path / "hub-bad")}
    hub = fake_hub(repos)
    report = preflight(parse_recipe(_ta("org/base", "org/bad")), str(tmp_path / "store"),
                       measure=False, endpoint=hub.endpoint)
    assert not report.ok and len(report.problems) == 1
    msg = report.problems[0]
    assert msg.startswith("models cannot be merged with base 'hf://org/base@"
                          f"{hub.commit('org/base')}' (2 problems)")
    assert f"model 'org/bad' (hf://org/bad@{hub.commit('org/bad')}): missing 1 tensor(s) " \
           f"present in the base: {UP!r}" in msg
    assert "tensor 'model.norm.weight' has shape [48] but the base has [32]" in msg
    assert _assert_only_headers_fetched(hub, repos) == {
        "org/base/model.safetensors": 2, "org/bad/model.safetensors": 2}
    with pytest.raises(ValueError) as info:
        report.raise_for_problems()
    assert str(info.value) == msg  # the family check's own error, as the plan raises it


def test_a_server_that_ignores_range_still_gives_the_header(hub_family, tmp_path):
    hub, _ = hub_family
    hub.ignore_range = True
    report = preflight(parse_recipe(_ta("org/base", "org/ft")), str(tmp_path / "store"),
                       measure=False, token=TOKEN, endpoint=hub.endpoint)
    assert report.ok, report.problems
    assert report.tensors == len(_weights(hub.repos["org/base"]))
    assert {r.status for r in _weight_requests(hub)} == {200}


def test_mirrored_sources_are_read_from_the_store(hub_family, tmp_path):
    hub, _ = hub_family
    store = tmp_path / "store"
    mirror_source("org/base", str(store), token=TOKEN, endpoint=hub.endpoint)
    hub.reset_requests()
    sha = hub.commit("org/base")
    report = preflight(parse_recipe(_ta(f"org/base@{sha}", "org/ft")), str(store),
                       measure=False, token=TOKEN, endpoint=hub.endpoint)
    assert report.ok, report.problems
    base, ft = report.sources
    assert (base.read_from, base.download_bytes, ft.read_from) == ("store", 0, "hub")
    assert base.checkpoint.uri == str(store / "sources" / "hf--org--base" / sha)
    # a commit sha already mirrored needs no request at all
    assert not any(r.path.startswith(("/org/base/", "/api/models/org/base"))
                   for r in hub.requests)
    assert report.estimate.download_bytes == ft.download_bytes > 0


# ------------------------------------------------------------------------------------------
# s3 and local sources
# ------------------------------------------------------------------------------------------


def test_s3_sources_are_read_by_ranged_gets_only(pico_family, s3_bucket, tmp_path):  # noqa: F811
    uri, options, server = s3_bucket
    fs, root = storage.get_fs(uri, **options)
    for role in ("base", "a"):
        for f in sorted(pico_family[role].iterdir()):
            fs.put_file(str(f), f"{root}/{role}/{f.name}")
    before = server.log_tail(1 << 40)
    report = preflight(parse_recipe(_ta(f"{uri}/base", f"{uri}/a")), str(tmp_path / "store"),
                       measure=False)
    log = server.log_tail(1 << 40)[len(before):]
    assert report.ok, report.problems
    assert [(s.read_from, s.in_place) for s in report.sources] == [("s3", False)] * 2
    assert report.estimate.download_bytes == sum(
        p.stat().st_size for role in ("base", "a") for p in pico_family[role].iterdir())
    gets = re.findall(r'"GET (/\S+\.safetensors) HTTP/1\.1" (\d+)', log)
    assert sorted(gets) == sorted([(f"/{root}/{r}/model.safetensors", "206")
                                   for r in ("base", "a")] * 2), log  # length, then header
    assert not (tmp_path / "store" / "sources").exists()


def test_vocabulary_rows_and_policy_are_reported(pico_family, tmp_path):  # noqa: F811
    def added_token(ts):
        out = {n: t + 0.002 for n, t in ts.items()}
        for name in (EMBED, HEAD):
            out[name] = torch.cat([out[name], torch.full((1, out[name].shape[1]), 0.5)])
        return out
    wide = variant(pico_family["a"], tmp_path / "wide", tensors=added_token)
    base = str(pico_family["base"])
    refused = preflight(parse_recipe(_ta(base, str(wide))), str(tmp_path / "store"),
                        measure=False)
    assert [s.read_from for s in refused.sources] == ["local", "local"]
    assert all(s.in_place and s.download_bytes == 0 for s in refused.sources)
    assert len(refused.problems) == 1 and "a vocabulary-size difference" in refused.problems[0]
    assert refused.vocabulary == [
        f"{HEAD} rows: base 64, '{wide}' 65",
        f"{EMBED} rows: base 64, '{wide}' 65",
        "rows differ: the vocabulary settings decide",
        "settings: vocab_mismatch: refuse (default)",
    ]
    kept = preflight(parse_recipe(_ta(base, str(wide),
                                      parameters={"vocab_mismatch": "exclude_embeddings"})),
                     str(tmp_path / "store"), measure=False)
    assert kept.ok, kept.problems
    assert kept.vocabulary[-1] == "settings: vocab_mismatch: exclude_embeddings"


def test_every_problem_is_listed_and_raised_together(pico_family, tmp_path, fake_hub):  # noqa: F811
    hub = fake_hub({"org/base": pico_family["base"]})
    other = variant(pico_family["a"], tmp_path / "mistral", config={"model_type": "mistral"})
    report = preflight(parse_recipe(_ta("org/base", "org/missing", str(other))),
                       str(tmp_path / "store"), measure=False, endpoint=hub.endpoint)
    assert len(report.problems) == 2
    assert report.problems[0].startswith("fine-tuned model 'org/missing': Hub repo "
                                         f"org/missing on {hub.endpoint} not found")
    assert f"model '{other}' ({other}): model_type 'mistral' differs" in report.problems[1]
    with pytest.raises(ProblemsError) as info:
        report.raise_for_problems()
    assert str(info.value).startswith("pre-flight: 2 problems:\n  - fine-tuned model "
                                      "'org/missing'")
    assert _assert_only_headers_fetched(hub, {"org/base": pico_family["base"]}) == {
        "org/base/model.safetensors": 2}


# ------------------------------------------------------------------------------------------
# estimates
# ------------------------------------------------------------------------------------------


def test_merge_time_is_the_io_floor_times_the_measured_ratio():
    e = Estimate(download_bytes=10**9, unit_bytes=2 * 10**9, input_bytes=6 * 10**9,
                 largest_unit="embeddings", unit_memory_bytes=5,
                 workers=3, download_rate=50e6, io=IORates(3e9, 1e9, "probe"), floor_ratio=1.5)
    assert e.download_seconds == 20.0
    assert e.merge_seconds == pytest.approx((6e9 / 3e9 + 2e9 / 1e9) * 1.5)
    assert (e.store_bytes, e.output_disk_bytes, e.memory_bytes) == (3 * 10**9, 2 * 10**9, 15)


def test_measure_io_leaves_nothing_behind(tmp_path):
    rates = measure_io(str(tmp_path), nbytes=4 << 20)
    assert rates.read > 0 and rates.write > 0
    assert rates.basis == f"4 MiB written with fsync and read back in {tmp_path}"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# the merge flow runs it first
# ------------------------------------------------------------------------------------------


def test_merge_flow_fails_at_preflight_before_mirroring(
        pico_family, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    from dareflow.flows.merge import run_merge

    bad = variant(pico_family["a"], tmp_path / "bad",
                  tensors=lambda ts: {n: t for n, t in ts.items() if n != UP})
    repos = {"org/base": _hub_repo(pico_family["base"], tmp_path / "hub-base"),
             "org/bad": _hub_repo(bad, tmp_path / "hub-bad")}
    hub = fake_hub(repos)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    store, out = tmp_path / "store", tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", _ta("org/base", "org/bad"))
    with pytest.raises(ValueError) as info:
        run_merge(str(recipe), str(out), store=str(store), max_workers=1)
    assert f"missing 1 tensor(s) present in the base: {UP!r}" in str(info.value)
    assert not (store / "sources").exists() and not (store / "units").exists()
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))
    _assert_only_headers_fetched(hub, repos)
