"""Pre-flight: what a merge will do, from metadata only, before any weight is downloaded.

:func:`preflight` reads each model's ``config.json``, safetensors index and headers where it
lives (:func:`dareflow.sources.headers.read_source_headers`: ranged GETs on the Hub and s3,
plain reads of local folders, or the store's mirror), runs the checks the plan runs
(``apply_vocab_policy``, the family check under the recipe's vocabulary policy,
``check_family_with_policy``, then every tensor's merge spec) and estimates download, disk,
memory and time. Not checked here, because they need more than headers: the values of
non-floating buffers (the plan compares their bytes after mirroring) and tokenizer files. ``dareflow plan`` prints the report; the merge flow runs it first and
stops on any problem (:meth:`Preflight.raise_for_problems`) before anything is mirrored.

What the estimates rest on:

- download: the listed sizes of the files the mirror would copy and the store lacks;
  its time at a stated rate (``DEFAULT_DOWNLOAD_RATE`` unless the caller knows better).
- disk: the store grows by those files and by the unit shards (the merged tensors in the
  output dtype); the output folder holds a copy of the same shards (never hard links: an
  output edited in place must not change the store), and a local output's filesystem
  must have that much free (``dareflow.merge.publish.check_space``: a problem if not).
- memory: a unit holds its output shard and reads each model's tensors; the bound is the
  largest unit's input tensors of every model plus its output, times the parallel units.
- time of the merge: the IO floor (read every input tensor, write the output with fsync)
  at read and write rates measured here (:func:`measure_io`), times dareflow's measured
  ratio to that floor (``FLOOR_RATIO``, README "Performance").
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dareflow.errors import ProblemsError
from dareflow.io import localdisk, storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.io.headers import TensorInfo
from dareflow.io.homology import vocab_tensor_names
from dareflow.merge.layers import plan_units
from dareflow.merge.plan import apply_vocab_policy, output_dtype, tensor_specs
from dareflow.merge.publish import check_space
from dareflow.merge.vocab_policy import check_family_with_policy
from dareflow.recipe import Recipe, fine_tunes, recipe_to_dict
from dareflow.sources import source_specs
from dareflow.sources.headers import SourceHeaders, read_source_headers

#: Download rate assumed when the caller gives none (bytes/s): a stated guess, not a
#: measurement; ``dareflow plan --download-mb-s`` replaces it with the link's real rate.
DEFAULT_DOWNLOAD_RATE = 50e6
#: dareflow's wall time over the IO floor (read the inputs, write the output with fsync),
#: measured by benchmarks/merge_vs_mergekit (README "Performance", 2 cores, bf16 family).
FLOOR_RATIO = {"dare_ties": 1.57, "dare_linear": 1.54, "task_arithmetic": 1.48, "ties": 2.85}
#: Methods that benchmark did not time: its slowest ratio.
FLOOR_RATIO_OTHER = 2.85
#: Bytes written (with fsync) and read back to measure this machine's IO rates.
PROBE_BYTES = 64 << 20
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class IORates:
    """Read and write rates (bytes/s) and how they were obtained."""

    read: float
    write: float
    basis: str


@dataclass(frozen=True)
class Estimate:
    """Sizes in bytes, rates in bytes/s, times in seconds (see the module docstring).

    Attributes:
        download_bytes: Files to download (not yet in the store, not read in place).
        unit_bytes: The merged tensors in the output dtype (the unit shards in the store).
        input_bytes: Input tensor bytes the merge reads (every model, base included).
        largest_unit: Name of the unit with the largest memory bound.
        unit_memory_bytes: That unit's input tensors of every model plus its output.
        workers: Units merged at once.
        download_rate: Rate the download time assumes.
        io: Measured IO rates, or None when not measured.
        floor_ratio: dareflow's time over the IO floor for this method.
    """

    download_bytes: int
    unit_bytes: int
    input_bytes: int
    largest_unit: str
    unit_memory_bytes: int
    workers: int
    download_rate: float
    io: IORates | None
    floor_ratio: float

    @property
    def store_bytes(self) -> int:
        """What the store grows by: downloads plus unit shards."""
        return self.download_bytes + self.unit_bytes

    @property
    def output_disk_bytes(self) -> int:
        """Disk the output folder adds: a copy of the unit shards."""
        return self.unit_bytes

    @property
    def memory_bytes(self) -> int:
        """Upper bound of the merge's memory: ``workers`` largest units at once."""
        return self.unit_memory_bytes * self.workers

    @property
    def download_seconds(self) -> float:
        return self.download_bytes / self.download_rate

    @property
    def merge_seconds(self) -> float | None:
        """IO floor at the measured rates times ``floor_ratio``; None when not measured."""
        if self.io is None:
            return None
        floor = self.input_bytes / self.io.read + self.unit_bytes / self.io.write
        return floor * self.floor_ratio


@dataclass
class Preflight:
    """The pre-flight report of one recipe.

    Attributes:
        recipe: The recipe checked.
        sources: Each model as read (base first); models that could not be read are absent.
        problems: Every problem found, one message each (empty: the merge can start).
        errors: The exceptions behind ``problems`` (re-raised by ``raise_for_problems``).
        notes: What was not checked and why.
        vocabulary: Embedding rows per model and the recipe's vocabulary settings.
        out_dtype: dtype of the merged tensors (None when the reference was not read).
        units: Number of work units; tensors: merged tensors.
        estimate: Sizes and times, or None when the reference was not read.
    """

    recipe: Recipe
    sources: list[SourceHeaders] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocabulary: list[str] = field(default_factory=list)
    out_dtype: str | None = None
    units: int = 0
    tensors: int = 0
    estimate: Estimate | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise what pre-flight found: the one error as it was raised (its type and
        message), or a ``ProblemsError`` listing every problem when there are several."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.problems:
            raise ProblemsError("pre-flight", self.problems)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts for logs and task results."""
        e = self.estimate
        return {
            "ok": self.ok, "problems": len(self.problems), "units": self.units,
            "tensors": self.tensors, "out_dtype": self.out_dtype,
            "download_bytes": e.download_bytes if e else None,
            "store_bytes": e.store_bytes if e else None,
            "memory_bytes": e.memory_bytes if e else None,
            "sources": [{"role": s.role, "model": s.model, "revision": s.source.revision,
                         "read_from": s.read_from, "download_bytes": s.download_bytes}
                        for s in self.sources],
        }


def preflight(
    recipe: Recipe,
    store_uri: str,
    *,
    out_uri: str | None = None,
    workers: int = 1,
    download_rate: float = DEFAULT_DOWNLOAD_RATE,
    measure: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> Preflight:
    """Check a recipe's models from metadata only and estimate what the merge costs.

    Reads ``config.json``, the index and safetensors headers of every model (never a
    weight byte), then runs the plan's checks on them: the vocabulary policy
    (``apply_vocab_policy``), the family check under that policy
    (``check_family_with_policy``) and every tensor's merge spec (``tensor_specs``).
    Problems are collected, never raised: see :meth:`Preflight.raise_for_problems`.

    Args:
        recipe: A validated recipe.
        store_uri: The artifact store the merge mirrors into.
        out_uri: The output folder: its filesystem must have room for the merged shards.
        workers: Units merged at once (the memory bound's multiplier).
        download_rate: Bytes/s the download time assumes.
        measure: Measure this machine's IO rates (:func:`measure_io`, ~64 MiB written
            and read back) for the time estimate; False leaves the merge time unknown.
        token, endpoint, source_options, store_options: As for
            :func:`dareflow.sources.headers.read_source_headers`.

    Returns:
        The :class:`Preflight` report.
    """
    report = Preflight(recipe)
    for spec in source_specs(recipe):
        try:
            report.sources.append(read_source_headers(
                spec, store_uri, token=token, endpoint=endpoint,
                source_options=source_options, store_options=store_options))
        except (ValueError, OSError) as exc:  # OSError: FileNotFound, Permission, Connection
            report.errors.append(exc)
            report.problems.append(f"{spec['role']} model {spec['model']!r}: {exc}")
    opened = {(s.role, s.model): s.checkpoint for s in report.sources if s.checkpoint}
    report.notes += [f"{s.role} model {s.model!r}: {s.note}" for s in report.sources if s.note]
    base = opened.get(("base", recipe.base_model)) if recipe.base_model else None
    models = {m.model: opened[("fine-tuned", m.model)] for m in fine_tunes(recipe)
              if ("fine-tuned", m.model) in opened}
    reference = base if recipe.base_model else next(iter(models.values()), None)
    if reference is None:
        report.notes.append("the family was not checked: the reference model (the base, or "
                            "the first model without one) could not be read")
        return report
    models = apply_vocab_policy(recipe, base, models)
    report.vocabulary = _vocabulary(recipe, reference, models)
    compared = models if recipe.base_model else dict(list(models.items())[1:])
    if compared or len(models) == len(fine_tunes(recipe)):  # as plan_merge checks them
        # as the plan: row differences left to the recipe's vocabulary policy
        _collect(report, lambda: check_family_with_policy(recipe, reference, compared))
    else:
        report.notes.append("the family was not checked: no model to compare with the "
                            "reference could be read")
    report.out_dtype = output_dtype(recipe, reference)
    _collect(report, lambda: tensor_specs(recipe, report.out_dtype, reference.tensors))
    inputs = ([base] if base is not None else []) + list(models.values())
    io = measure_io(_probe_dir(store_uri, store_options)) if measure else None
    report.estimate = _estimate(recipe, report, reference, inputs, workers, download_rate,
                                io)
    if out_uri is not None:
        try:
            check_space(out_uri, report.estimate.output_disk_bytes)
        except OSError as exc:
            report.errors.append(exc)
            report.problems.append(str(exc))
    return report


def _collect(report: Preflight, check: Callable[[], object]) -> None:
    """Run one of the plan's checks; its ValueError becomes a problem of the report."""
    try:
        check()
    except ValueError as exc:
        report.errors.append(exc)
        report.problems.append(str(exc))


def _vocabulary(recipe: Recipe, reference: Checkpoint, models: dict[str, Checkpoint]
                ) -> list[str]:
    """Rows of the vocabulary tensors per model, and the recipe's vocabulary settings."""
    names = vocab_tensor_names(reference)
    if not names:
        return ["no embedding or output-head tensor recognised: no vocabulary check"]
    label = "base" if recipe.base_model else "reference"
    lines, counts = [], set()
    for name in names:
        rows = {label: reference.info(name).shape[0]}
        rows |= {repr(mid): m.info(name).shape[0] for mid, m in models.items() if name in m}
        counts |= set(rows.values())
        lines.append(f"{name} rows: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    data = recipe_to_dict(recipe)
    settings = {key: data[key] for key in ("tokenizer_source", "tokenizer", "chat_template")
                if key in data}
    settings["vocab_mismatch"] = data.get("parameters", {}).get("vocab_mismatch",
                                                                "refuse (default)")
    lines.append("every model has the same rows" if len(counts) == 1 else
                 "rows differ: the vocabulary settings decide")
    return lines + ["settings: " + ", ".join(f"{k}: {v}" for k, v in settings.items())]


def _estimate(recipe: Recipe, report: Preflight, reference: Checkpoint,
              inputs: list[Checkpoint], workers: int, download_rate: float,
              io: IORates | None) -> Estimate:
    itemsize = _ITEMSIZE.get(report.out_dtype or "", 4)

    def out_bytes(t: TensorInfo) -> int:
        return t.numel * itemsize if t.is_floating_point else t.nbytes

    units = plan_units(reference.tensors)
    report.units, report.tensors = len(units), len(reference.tensors)
    memory = {u.name: sum(out_bytes(reference.tensors[n]) + sum(
        c.info(n).nbytes for c in inputs if n in c) for n in u.tensors) for u in units}
    largest = max(memory, key=memory.__getitem__) if memory else "-"
    seen: set[tuple[str, str]] = set()
    download = 0
    for s in report.sources:  # a model listed twice is mirrored once
        key = (s.source.safe_id, s.source.revision)
        download += 0 if key in seen else s.download_bytes
        seen.add(key)
    return Estimate(
        download_bytes=download,
        unit_bytes=sum(out_bytes(t) for t in reference.tensors.values()),
        input_bytes=sum(c.info(n).nbytes for n in reference.tensors for c in inputs if n in c),
        largest_unit=largest,
        unit_memory_bytes=memory.get(largest, 0),
        workers=max(1, workers),
        download_rate=download_rate,
        io=io,
        floor_ratio=FLOOR_RATIO.get(recipe.merge_method, FLOOR_RATIO_OTHER),
    )


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _probe_dir(store_uri: str, store_options: dict | None) -> str:
    fs, path = storage.get_fs(store_uri, **(store_options or {}))
    return _existing(path) if localdisk.is_local(fs) else tempfile.gettempdir()


def measure_io(folder: str, nbytes: int = PROBE_BYTES) -> IORates:
    """This machine's IO rates in ``folder``: ``nbytes`` written with fsync, then read back.

    The read comes from the page cache, as the benchmark's inputs did; a store on another
    machine (s3) is not measured, so the rates are those of a local temporary folder.

    Returns:
        The read and write rates (bytes/s) and a sentence saying how they were measured.
    """
    block = os.urandom(1 << 20)  # incompressible, so no filesystem shortcut
    try:
        fd, path = tempfile.mkstemp(prefix=".dareflow-io-probe-", dir=folder)
    except OSError:  # not writable (the store's nearest existing folder may be anything)
        folder = tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix=".dareflow-io-probe-", dir=folder)
    try:
        started = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, nbytes // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        written = time.perf_counter() - started
        started = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
        read = time.perf_counter() - started
    finally:
        os.unlink(path)
    size = max(1, nbytes // len(block)) * len(block)
    return IORates(size / max(read, 1e-9), size / max(written, 1e-9),
                   f"{size >> 20} MiB written with fsync and read back in {folder}")
