"""Run one suite entry (one benchmark) on one model through ``lm_eval.simple_evaluate``.

Offline runs (a mirror, or a JSONL task) generate their lm-eval task YAMLs into a temporary
folder, point ``HF_HOME`` and the ``datasets`` cache there and force Hugging Face offline mode
for the duration of the call. Those settings are process-wide: run one ``run_task`` per
process (the flow maps each benchmark to its own worker process), never two in threads.

Backends: ``hf`` (transformers, CPU or GPU) and ``vllm`` (GPU only; vllm is imported by
lm-eval only when that backend is asked for, so this module imports without it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import huggingface_hub.constants as hub_constants
import yaml

from dareflow.errors import did_you_mean, unknown_choice
from dareflow.evaluation.backends import default_batch_size, default_model_args
from dareflow.evaluation.mirror import (
    MIRROR_TASKS,
    TASK_PREFIX,
    lm_eval_tasks_root,
    verify_mirror,
    write_task_configs,
)
from dareflow.evaluation.suite import SuiteTask

Backend = Literal["hf", "vllm"]
BACKENDS: tuple[str, ...] = ("hf", "vllm")
SKILL_PREFIX = TASK_PREFIX + "skill_"
# The filter applied to JSONL-task generations before exact match (the metric key's suffix).
STRIP_FILTER = "strip"


def vllm_available() -> bool:
    """Whether the vllm package is importable (it is not imported here)."""
    return importlib.util.find_spec("vllm") is not None


def model_spec(
    model_dir: str | os.PathLike,
    backend: str,
    device: str,
    model_args: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """lm-eval's model name and ``model_args`` for a local HF model folder.

    Args:
        model_dir: folder with ``config.json``, weights and tokenizer.
        backend: ``hf`` or ``vllm``.
        device: ``cpu``, ``cuda``, ``cuda:0``, ...
        model_args: extra lm-eval model arguments, written over the defaults (a suite
            entry's ``model_args``, then the run's from ``backends.option_model_args``).

    Returns:
        ``("hf", {...})`` or ``("vllm", {...})``: ``backends.default_model_args`` (hf:
        float32 on the CPU, bfloat16 on a GPU; vllm: the checkpoint's dtype),
        ``trust_remote_code`` off (a model folder's own Python never runs here), then
        ``model_args``.

    Raises:
        ValueError: an unknown backend, or vllm asked to run on the CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(unknown_choice("backend", backend, BACKENDS))
    if backend == "vllm" and device == "cpu":
        raise ValueError(
            "backend='vllm' runs on a GPU, got device='cpu': pass device='cuda' or use "
            "backend='hf' on the CPU"
        )
    defaults = default_model_args(backend, "cpu" if device == "cpu" else "cuda")
    return backend, {"pretrained": str(model_dir), **defaults, "trust_remote_code": False,
                     **dict(model_args or {})}


def jsonl_task_config(entry: SuiteTask, task_name: str, cache_dir: Path | None = None) -> dict:
    """lm-eval task config for a suite entry with ``data`` (exact-match generation over JSONL).

    The JSONL file is both the evaluated split and, for ``shots > 0``, the few-shot pool
    (lm-eval then leaves the evaluated row out of its own context).
    """
    if entry.data is None:
        raise ValueError(f"suite task {entry.name!r} has no 'data' block")
    data = entry.data
    kwargs: dict[str, Any] = {"data_files": {"test": str(data.path)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": kwargs,
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "generate_until",
        "doc_to_text": data.prompt_template,
        "doc_to_target": data.target_template,
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "generation_kwargs": {
            "until": list(data.until),
            "max_gen_toks": data.max_gen_toks,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {"name": STRIP_FILTER,
             "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]},
        ],
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
             "ignore_case": data.ignore_case, "ignore_punctuation": False},
        ],
        "metadata": {"version": 1.0},
    }


@contextlib.contextmanager
def hf_offline(hf_home: Path) -> Iterator[None]:
    """Force Hugging Face offline mode with ``HF_HOME`` in ``hf_home``, restoring afterwards.

    ``datasets`` and ``huggingface_hub`` read these variables once at import, so their module
    flags are set as well as the environment.
    """
    import datasets  # optional (eval extra), heavy (~0.3 s): only inside an offline run

    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_flags = (
        hub_constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    bars_were_on = datasets.is_progress_bar_enabled()
    os.environ.update(env)
    hub_constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_OFFLINE) = saved_flags
        if bars_were_on:
            datasets.enable_progress_bars()


def _json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy of lm-eval's results (numpy scalars, sets, callables...)."""

    def default(o: Any) -> Any:
        if hasattr(o, "item") and callable(o.item):
            try:
                return o.item()
            except (TypeError, ValueError):
                pass
        if isinstance(o, (set, frozenset, tuple)):
            return list(o)
        if isinstance(o, Path):
            return str(o)
        return repr(o)

    text = json.dumps(obj, default=default, allow_nan=True)
    return json.loads(text)


def lm_eval_version() -> str:
    """The installed lm-eval's version (recorded with every result; part of cache keys)."""
    return importlib.metadata.version("lm_eval")


def library_versions(backend: str) -> dict[str, str | None]:
    """Versions of the libraries a run's numbers depend on (part of the results cache key):
    lm-eval, transformers (model code, tokenizers), torch (kernels), datasets (loading and
    shuffling), and vllm for the vllm backend (None where a package is not installed)."""
    names = ["lm_eval", "transformers", "torch", "datasets"] + (
        ["vllm"] if backend == "vllm" else [])
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_task_configs_for(entry: SuiteTask, mirror_dir: str | os.PathLike | None,
                           include_dir: Path, cache_dir: Path) -> str | None:
    """Write the lm-eval task YAMLs a run of ``entry`` reads into ``include_dir``.

    Returns:
        The lm-eval task name to run from ``include_dir``; None for an online run (lm-eval's
        builtin task on the Hub data: nothing is written).

    Raises:
        KeyError: a benchmark the mirror does not hold.
        FileNotFoundError: no mirror manifest.
    """
    if entry.data is not None:
        task_name = SKILL_PREFIX + entry.name
        _write_yaml(include_dir / f"{task_name}.yaml",
                    jsonl_task_config(entry, task_name, cache_dir))
        return task_name
    if mirror_dir is None:
        return None
    if entry.task not in MIRROR_TASKS:
        raise KeyError(
            f"{unknown_choice('offline mirror task', entry.task, MIRROR_TASKS)}; "
            "run it online (mirror_dir=None) instead"
        )
    verify_mirror(mirror_dir, [entry.task])
    write_task_configs(mirror_dir, include_dir, cache_dir=cache_dir)
    return MIRROR_TASKS[entry.task].mirror_name


def task_config_digest(entry: SuiteTask, mirror_dir: str | os.PathLike | None) -> str | None:
    """sha256 of the task YAMLs a run of ``entry`` reads (part of the results cache key).

    The YAMLs are generated as ``run_task`` generates them, into a temporary folder, and
    the machine-specific paths in them (that folder, the ``datasets`` cache, the mirror
    folder, lm-eval's task folder, a JSONL task's file) are replaced by placeholders: the
    digest changes with what lm-eval is told to do (split roles, shots source, filters,
    prompts), not with where things are. Of a mirror's YAMLs only those of ``entry``'s task
    count (their file names carry its task name), so mirroring another task changes no key.
    None for an online run (lm-eval's builtin YAMLs: covered by its version).
    """
    with tempfile.TemporaryDirectory(prefix="dareflow-key-") as tmp:
        tmp_path = Path(tmp)
        include_dir, cache_dir = tmp_path / "tasks", tmp_path / "hf" / "datasets"
        task_name = write_task_configs_for(entry, mirror_dir, include_dir, cache_dir)
        if task_name is None:
            return None
        places = {str(tmp_path): "<tmp>", str(lm_eval_tasks_root()): "<lm_eval_tasks>"}
        if mirror_dir is not None:
            places[str(Path(mirror_dir).resolve())] = "<mirror>"
        if entry.data is not None:
            places[str(entry.data.path)] = "<jsonl>"
        digest = hashlib.sha256()
        for path in sorted(include_dir.rglob("*.yaml")):
            if task_name not in path.name:
                continue
            text = path.read_text("utf-8")
            for place in sorted(places, key=len, reverse=True):  # longest (innermost) first
                text = text.replace(place, places[place])
            digest.update(f"{path.relative_to(include_dir).as_posix()}\n{text}\n".encode())
        return digest.hexdigest()


def run_task(
    model_dir: str | os.PathLike,
    entry: SuiteTask,
    *,
    backend: Backend = "hf",
    limit: int | None = None,
    mirror_dir: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int | str | None = None,
    revision: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluate one model on one suite entry with lm-eval; return lm-eval's results dict.

    Args:
        model_dir: local HF model folder (``config.json``, weights, tokenizer).
        entry: the suite entry (benchmark, shots, metric).
        backend: ``hf`` (transformers) or ``vllm`` (GPU; needs the vllm package).
        limit: evaluate only the first ``limit`` documents (per subtask for groups such as
            MMLU); None evaluates everything.
        mirror_dir: a folder written by ``prepare_mirror``: run the mirrored task offline
            (``dareflow_<task>``). None runs lm-eval's builtin task on the Hub datasets.
            Ignored for JSONL tasks, which are always local.
        device: ``cpu``, ``cuda``, ...; None picks ``cpu`` for hf and ``cuda`` for vllm.
        batch_size: lm-eval batch size (an int, or ``"auto"``); None: 1 for hf on the CPU,
            ``auto`` on a GPU (``backends.default_batch_size``).
        revision: the model's revision, recorded in the results (e.g. a commit or a hash).
        model_args: extra lm-eval model arguments over the defaults and the entry's (the
            run's backend options, e.g. ``{"max_model_len": 4096}``).

    Returns:
        lm-eval's results dict (``results``, ``groups``, ``group_subtasks``, ``configs``,
        ``n-shot``, ``n-samples``, ``versions``, ``config``, env info...), made
        JSON-serialisable, without per-sample logs, plus ``dareflow``: the entry, the lm-eval
        task name run, model folder, revision, backend, device, limit, mirror flag, library
        versions, batch size, model arguments and wall seconds.

    Raises:
        FileNotFoundError: no model folder, or no mirror manifest.
        ImportError: ``backend="vllm"`` without the vllm package.
        KeyError: a benchmark the mirror does not hold.
        ValueError: a bad backend, limit or device.
    """
    model_path = Path(model_dir).expanduser()
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {model_path} has no config.json: pass a local Hugging Face model "
            "folder (config.json, weights, tokenizer)"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    device = device or ("cuda" if backend == "vllm" else "cpu")
    if batch_size is None:
        batch_size = default_batch_size(backend, "cpu" if device == "cpu" else "cuda")
    lm_name, lm_args = model_spec(model_path.resolve(), backend, device,
                                  {**entry.model_args, **(model_args or {})})
    if backend == "vllm" and not vllm_available():
        raise ImportError(
            "backend='vllm' needs the vllm package, which is not installed (it needs an NVIDIA "
            "GPU): `pip install vllm` on a GPU machine, or use backend='hf'"
        )

    # optional (eval extra), heavy: lm_eval.tasks (~0.5 s), only when a run is asked for
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dareflow-eval-") as tmp:
        tmp_path = Path(tmp)
        include_dir, hf_home = tmp_path / "tasks", tmp_path / "hf"
        written = write_task_configs_for(entry, mirror_dir, include_dir, hf_home / "datasets")
        offline, task_name = written is not None, written or entry.task

        if offline:
            task_manager = TaskManager(include_path=str(include_dir), include_defaults=False)
        else:
            task_manager = TaskManager()
        if task_name not in task_manager.all_tasks:
            close = did_you_mean(task_name, task_manager.all_tasks)
            hint = f" Did you mean {close!r}?" if close else ""
            raise KeyError(f"lm-eval knows no task {task_name!r}.{hint}")

        env = hf_offline(hf_home) if offline else contextlib.nullcontext()
        with env:
            results = lm_eval.simple_evaluate(
                model=lm_name,
                model_args=lm_args,
                tasks=[task_name],
                num_fewshot=entry.shots,
                batch_size=batch_size,
                # vllm takes no device (it would warn): CUDA_VISIBLE_DEVICES pins its GPUs
                device=None if backend == "vllm" else device,
                limit=limit,
                task_manager=task_manager,
                log_samples=False,
            )
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise RuntimeError(f"lm-eval returned no results for {task_name!r}")
    results.pop("samples", None)
    out = _json_safe(results)
    out["dareflow"] = {
        "entry": entry.model_dump(mode="json"),
        "task_name": task_name,
        "model_dir": str(model_path.resolve()),
        "revision": revision,
        "backend": backend,
        "device": device,
        "limit": limit,
        "mirror": entry.data is None and mirror_dir is not None,
        "lm_eval_version": lm_eval_version(),
        "versions": library_versions(backend),
        "batch_size": batch_size,
        "model_args": {k: v for k, v in lm_args.items() if k != "pretrained"},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out


def _write_yaml(path: Path, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")

