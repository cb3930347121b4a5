"""Checks of an evaluation request, run before anything heavy: suite, limit, backend, the
offline mirror's coverage, model labels and folders; and the models a merge is compared with.

Each failure names the bad value and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dareflow.evaluation.fingerprint import local_model_dir
from dareflow.evaluation.mirror import MIRROR_TASKS
from dareflow.evaluation.runner import BACKENDS, vllm_available
from dareflow.evaluation.suite import Suite, load_suite


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or vllm without its package, before any heavy work (the
    device and GPU checks are ``backends.plan_run``'s).

    Raises:
        ValueError: not ``hf`` or ``vllm``, or ``vllm`` without the vllm package.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)} "
                         "(hf: transformers, CPU or GPU; vllm: GPU only)")
    if backend == "vllm" and not vllm_available():
        raise ValueError("backend 'vllm' needs the vllm package (an NVIDIA GPU machine: "
                         "`pip install -e '.[vllm]'`); use --backend hf on the CPU")


def check_mirrored(suite: Suite) -> None:
    """With the offline mirror, every lm-eval entry of ``suite`` must be a mirrored task.

    Raises:
        KeyError: an entry whose task the mirror does not hold (names it and the choices).
    """
    missing = [f"{t.name} (task {t.task})" for t in suite.tasks
               if t.data is None and t.task not in MIRROR_TASKS]
    if missing:
        raise KeyError(f"suite {suite.name!r}: {', '.join(missing)} not in the offline mirror "
                       f"(it holds {', '.join(MIRROR_TASKS)}); drop --offline-mirror to read "
                       "the Hub datasets, or remove the entry")


def check_limit(limit: int | None) -> None:
    """Raises ValueError unless ``limit`` is None or a positive int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents or None, got {limit!r}")


def check_options(suite: str | os.PathLike, *, limit: int | None, backend: str,
                  mirror: bool) -> Suite:
    """Check the suite, limit, backend and mirror choice; return the parsed suite."""
    parsed = load_suite(suite)
    check_limit(limit)
    check_backend(backend)
    if mirror:
        check_mirrored(parsed)
    return parsed


def check_request(models: Mapping[str, str], suite: str | os.PathLike, *, limit: int | None,
                  backend: str, mirror: bool, merged: str | None = None) -> Suite:
    """Every check of an evaluation request, before anything heavy runs.

    Returns:
        The parsed suite.

    Raises:
        ValueError, FileNotFoundError, KeyError: naming the bad value and the fix.
    """
    parsed = check_options(suite, limit=limit, backend=backend, mirror=mirror)
    if not models:
        raise ValueError("no models to evaluate: pass at least one LABEL=PATH or PATH")
    for label, uri in models.items():
        if not label or "/" in label:
            raise ValueError(f"model label {label!r} must be a non-empty name without '/'")
        local_model_dir(uri)
    if merged is not None and merged not in models:
        raise KeyError(f"merged={merged!r} is not one of the model labels {list(models)}")
    return parsed


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["merged=out/m", "path/to/wizardmath"]`` -> ``{"merged": "out/m", "wizardmath": ...}``
    (a bare path is labelled by its folder name; a repeated label is an error)."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, uri = spec.partition("=")
        if not sep or "/" in label:
            label, uri = Path(spec.rstrip("/")).name, spec
        if label in models:
            raise ValueError(f"model label {label!r} given twice ({models[label]!r} and "
                             f"{uri!r}): name them with LABEL=PATH")
        models[label] = uri
    return models


def check_local_output(out: str) -> None:
    """Raises ValueError if ``out`` is a remote URI (lm-eval reads local folders)."""
    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"out={out!r}: merge-and-evaluate needs a local output folder "
                         "(lm-eval reads local folders); merge to a folder, then upload")


def merge_eval_models(manifest: Mapping[str, Any], out: str) -> dict[str, str]:
    """The models a merge is compared with: ``{"merged": out, <base>: uri, <fine-tune>: uri}``.

    Args:
        manifest: the merge flow's result (its ``sources``: role, model, uri of each input,
            as mirrored into the store).
        out: the merged model's local folder.

    Returns:
        Labels are the models' names without their location (``org/name`` -> ``name``, a
        folder's last component), made unique with ``-2``, ``-3``...
    """
    check_local_output(out)
    models = {"merged": out}
    ordered = sorted(manifest["sources"], key=lambda s: s["role"] != "base")
    for source in ordered:
        name = Path(str(source["model"]).rstrip("/")).name or "model"
        label, n = name, 2
        while label in models:
            label, n = f"{name}-{n}", n + 1
        models[label] = source["uri"]
    return models
