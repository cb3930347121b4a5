"""The results cache key: one function (``runs.benchmark_key``) used by the runs and by the
Prefect cache; it changes with every input a run's numbers depend on, and only with those."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dareflow.evaluation import runner, runs
from dareflow.evaluation.suite import load_suite
from dareflow.tasks.evaluate import benchmark_cache_key

V1 = load_suite("openllm_v1")
ARC = V1.task("arc_challenge").model_dump(mode="json")
MODEL = {"label": "m", "model_dir": "/nowhere", "revision": "sha256:" + "0" * 64}
CUDA = {"device": "cuda", "batch_size": "auto", "model_args": {"dtype": "bfloat16"},
        "slots": [["0"]], "timeout_s": 60}
VERSIONS = {"lm_eval": "0.4.13", "transformers": "5.25.0", "torch": "2.13.0",
            "datasets": "5.2.0"}
BASE = {"revision": MODEL["revision"], "entry": ARC, "limit": 2, "backend": "hf",
        "mirror_sha": "a" * 64, "batch_size": 1, "device": "cpu",
        "model_args": {"dtype": "float32"}, "task_configs": "b" * 64, "versions": VERSIONS}


def _key(**changes) -> str:
    args = {**BASE, **changes}
    return runs.run_key(args.pop("revision"), args.pop("entry"), **args)


@pytest.mark.parametrize(("name", "value"), [
    ("revision", "sha256:" + "1" * 64),
    ("entry", {**ARC, "shots": 0}),
    ("limit", None),
    ("backend", "vllm"),
    ("mirror_sha", None),
    ("batch_size", "auto"),
    ("device", "cuda"),
    ("model_args", {"dtype": "bfloat16"}),
    ("model_args", {"dtype": "float32", "max_length": 2048}),
    ("task_configs", "c" * 64),
    ("versions", {**VERSIONS, "transformers": "5.26.0"}),
    ("versions", {**VERSIONS, "torch": "2.14.0"}),
    ("versions", {**VERSIONS, "datasets": "5.3.0"}),
    ("versions", {**VERSIONS, "lm_eval": "0.4.14"}),
    ("versions", {**VERSIONS, "vllm": "0.11.0"}),
])
def test_each_input_changes_the_key(name: str, value) -> None:
    assert _key() == _key()
    assert _key(**{name: value}) != _key()


def test_code_version_changes_the_key(monkeypatch) -> None:
    before = _key()
    monkeypatch.setattr(runs, "EVAL_CODE_VERSION", "99")
    assert _key() != before


def test_library_versions_are_the_installed_ones() -> None:
    hf = runner.library_versions("hf")
    assert hf["lm_eval"] == "0.4.13" and set(hf) == {"lm_eval", "transformers", "torch",
                                                     "datasets"}
    assert runner.library_versions("vllm")["vllm"] is None or runner.vllm_available()
    assert _key(versions=None) == runs.run_key(
        BASE["revision"], ARC, **{**{k: v for k, v in BASE.items()
                                    if k not in ("revision", "entry")}, "versions": hf})


def test_benchmark_key_sees_device_dtype_batch_and_options(mirror_dir: Path) -> None:
    def key(run=None, backend="hf", **kw):
        return runs.benchmark_key(MODEL, ARC, limit=2, backend=backend,
                                  mirror_dir=str(mirror_dir), run=run, **kw)

    cpu = key()
    assert cpu == key(runs.CPU_RUN)
    assert key(CUDA) != cpu
    assert key({**CUDA, "batch_size": 16}) != key(CUDA)
    # what the slots and timeout are does not change the numbers: same key
    assert key({**CUDA, "slots": [["5"]], "timeout_s": None}) == key(CUDA)
    # the defaults lm-eval would get count, however they are spelled
    assert key({**CUDA, "model_args": {}}) == key(CUDA)  # bfloat16 is hf's GPU default
    assert key({**CUDA, "model_args": {"dtype": "float16"}}) != key(CUDA)
    vllm = {**CUDA, "model_args": {"dtype": "auto", "tensor_parallel_size": 1}}
    assert key(vllm, "vllm") != key({**vllm, "model_args": {
        "dtype": "auto", "tensor_parallel_size": 2}}, "vllm")


def test_the_prefect_cache_key_is_the_run_key(mirror_dir: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    params = {"model": MODEL, "entry": ARC, "store": store, "limit": 2, "backend": "hf",
              "mirror_dir": str(mirror_dir), "run": CUDA}
    key = runs.benchmark_key(MODEL, ARC, limit=2, backend="hf", mirror_dir=str(mirror_dir),
                             run=CUDA)
    assert benchmark_cache_key(None, params) is None  # nothing committed yet
    uri = Path(runs.result_uri(store, key))
    uri.parent.mkdir(parents=True)
    uri.write_text('{"results": {}}')
    assert benchmark_cache_key(None, params) == f"dareflow-eval-{key}"


def test_task_config_digest_follows_the_yaml_not_the_folders(mirror_dir: Path,
                                                             tmp_path: Path,
                                                             monkeypatch) -> None:
    entry = V1.task("arc_challenge")
    digest = runner.task_config_digest(entry, mirror_dir)
    assert len(digest) == 64 and digest == runner.task_config_digest(entry, mirror_dir)
    # the same mirror elsewhere (another machine's cache): same YAMLs once paths are out
    copy = tmp_path / "elsewhere" / "mirror"
    shutil.copytree(mirror_dir, copy)
    assert runner.task_config_digest(entry, copy) == digest
    # each task has its own digest; MMLU's covers its 57 subjects and groups
    assert runner.task_config_digest(V1.task("mmlu"), mirror_dir) not in (digest, None)
    assert runner.task_config_digest(entry, None) is None  # online: lm-eval's own YAMLs

    # a changed generated config (e.g. another split role) changes the digest...
    real = runner.write_task_configs

    def other_split(mirror, out, *, cache_dir=None):
        names = real(mirror, out, cache_dir=cache_dir)
        path = Path(out) / "dareflow_arc_challenge.yaml"
        path.write_text(path.read_text() + "fewshot_split: validation\n")
        return names

    monkeypatch.setattr(runner, "write_task_configs", other_split)
    assert runner.task_config_digest(entry, mirror_dir) != digest
    # ...and only that task's
    hella = V1.task("hellaswag")
    monkeypatch.setattr(runner, "write_task_configs", real)
    before = runner.task_config_digest(hella, mirror_dir)
    monkeypatch.setattr(runner, "write_task_configs", other_split)
    assert runner.task_config_digest(hella, mirror_dir) == before


def test_jsonl_task_digest_ignores_where_the_file_is(tmp_path: Path) -> None:
    skills = load_suite("demo_skills")
    entry = skills.tasks[0]
    digest = runner.task_config_digest(entry, None)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(entry.data.path, moved)
    other = entry.model_copy(update={"data": entry.data.model_copy(update={"path": moved})})
    assert runner.task_config_digest(other, None) == digest
    changed = entry.model_copy(update={"data": entry.data.model_copy(
        update={"prompt_template": "Question: {{prompt}} Answer: "})})
    assert runner.task_config_digest(changed, None) != digest
