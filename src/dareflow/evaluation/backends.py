"""Where and how an evaluation runs: device, backend options, GPU slots (pure, no GPU needed).

A run's *plan* is settled before any work, from the backend, the device and the backend
options, so bad requests fail at once and the cache key sees every setting:

- ``cpu``: ``hf`` only (vLLM needs a GPU), float32, batch size 1 unless given.
- ``cuda``: the visible GPUs (``CUDA_VISIBLE_DEVICES``, else every GPU torch counts) are cut
  into *slots* of ``tensor_parallel_size × data_parallel_size`` GPUs (one GPU for ``hf``). One
  benchmark runs per slot, its child process pinned to the slot's GPUs through
  ``CUDA_VISIBLE_DEVICES``, so a vLLM engine never shares a GPU with another. ``hf`` runs in
  bfloat16 with batch size ``auto`` (lm-eval finds the largest batch that fits); ``vllm``
  with batch size ``auto``: lm-eval 0.4.13 then sends every request of a task to one
  ``LLM.generate`` call and vLLM schedules the batches itself (with an int ``n`` it makes one
  call per ``n`` requests; ``1`` was one call per request).
- ``auto``: ``cuda`` when torch sees a GPU, else ``cpu``.

The options that shape the engine (``tensor_parallel_size``, ``data_parallel_size``,
``max_model_len``, ``gpu_memory_utilization``) are run options, not suite ``model_args``: a
suite says what is measured, the options say on what hardware.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dareflow.errors import unknown_choice

DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
#: Benchmarks evaluated at once on the CPU (each a process holding one model): the hf
#: backend's torch threads share the cores, so more processes than half the cores only add
#: memory.
DEFAULT_CPU_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 2))
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
#: Seconds before a benchmark's process is killed (``--timeout``; 0 or None: no limit). A 7B
#: model's longest v1 benchmarks (MMLU, HellaSwag: 40-56k loglikelihood requests) should take
#: well under 6 h on one GPU (an estimate: not measured here), so 6 h only stops a hung run (a
#: stuck NCCL or vLLM start-up, a deadlock) from blocking the flow for ever, and a killed run
#: is not retried (it would need as long again). A 7B model with hf on the CPU needs longer:
#: pass ``--timeout 0`` there.
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class BackendOptions:
    """Engine options of a run (CLI ``--tensor-parallel-size`` etc.; flow parameters).

    Attributes:
        tensor_parallel_size: GPUs one vLLM engine shards the model over.
        data_parallel_size: vLLM engine replicas per benchmark (lm-eval runs them as Ray
            actors, each ``tensor_parallel_size`` GPUs wide; needs ``ray``).
        max_model_len: longest context in tokens (vLLM ``max_model_len``, hf
            ``max_length``); None: the model's own.
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take; None: vLLM's
            default (0.9; one engine per GPU, so nothing else shares it).
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def option_problems(backend: str, options: BackendOptions) -> list[str]:
    """Every problem of ``options`` for ``backend``, each naming the flag and the fix."""
    problems = []
    for name in ("tensor_parallel_size", "data_parallel_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"--{_flag(name)} must be a positive int, got {value!r}")
        elif value > 1 and backend != "vllm":
            problems.append(f"--{_flag(name)} {value} applies to --backend vllm only (hf runs "
                            "one model per GPU): drop it or use --backend vllm")
    if options.max_model_len is not None and (
            isinstance(options.max_model_len, bool) or not isinstance(options.max_model_len, int)
            or options.max_model_len < 1):
        problems.append(f"--max-model-len must be a positive number of tokens, got "
                        f"{options.max_model_len!r}")
    gmu = options.gpu_memory_utilization
    if gmu is not None:
        if backend != "vllm":
            problems.append(f"--gpu-memory-utilization {gmu} applies to --backend vllm only: "
                            "drop it or use --backend vllm")
        elif isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1:
            problems.append(f"--gpu-memory-utilization must be in (0, 1], got {gmu!r} (the "
                            "fraction of each GPU's memory vLLM may take)")
    return problems


def _flag(name: str) -> str:
    return name.replace("_", "-")


def resolve_device(device: str, cuda_available: bool) -> str:
    """``cpu`` or ``cuda`` for a requested ``device`` (``auto``: cuda when a GPU is seen).

    Raises:
        ValueError: an unknown device.
    """
    if device not in DEVICES:
        raise ValueError(unknown_choice("device", device, DEVICES))
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    return device


def visible_gpus(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPU ids a child may be pinned to, as ``CUDA_VISIBLE_DEVICES`` spells them.

    Under ``CUDA_VISIBLE_DEVICES`` (ids or ``GPU-<uuid>``s) its first ``device_count``
    entries (CUDA stops at an invalid entry, and ``device_count`` is what torch counted
    under it); else ``0 .. device_count - 1``.
    """
    if VISIBLE_ENV in environ:
        ids = [x.strip() for x in environ[VISIBLE_ENV].split(",") if x.strip()]
        return ids[:device_count]
    return [str(i) for i in range(device_count)]


def gpu_slots(gpus: Sequence[str], width: int) -> list[list[str]]:
    """Consecutive groups of ``width`` GPUs: one slot per concurrent benchmark; GPUs left
    over (``len(gpus) % width``) stay unused.

    Raises:
        ValueError: fewer GPUs than ``width``.
    """
    if width > len(gpus):
        raise ValueError(f"one benchmark needs {width} GPUs (tensor_parallel_size × "
                         f"data_parallel_size) but {len(gpus)} are visible "
                         f"({VISIBLE_ENV}={','.join(gpus) or '<none>'}): lower "
                         "--tensor-parallel-size / --data-parallel-size or expose more GPUs")
    return [list(gpus[i:i + width]) for i in range(0, len(gpus) - width + 1, width)]


def default_model_args(backend: str, device: str) -> dict[str, Any]:
    """lm-eval ``model_args`` every run of ``backend`` on ``device`` starts from.

    hf: float32 on the CPU (bf16 matmuls are slow there and change scores), bfloat16 on a
    GPU (how 7B checkpoints ship; float32 would double the memory). vllm: the checkpoint's
    dtype (``auto``).
    """
    if backend == "hf":
        return {"dtype": "float32" if device == "cpu" else "bfloat16"}
    return {"dtype": "auto"}


def option_model_args(backend: str, options: BackendOptions) -> dict[str, Any]:
    """lm-eval ``model_args`` of the engine options (written over the defaults and a suite
    entry's ``model_args``): hf gets ``max_length``; vllm its engine arguments."""
    if backend == "hf":
        return {} if options.max_model_len is None else {"max_length": options.max_model_len}
    args: dict[str, Any] = {"tensor_parallel_size": options.tensor_parallel_size}
    if options.data_parallel_size > 1:
        args["data_parallel_size"] = options.data_parallel_size
    if options.max_model_len is not None:
        args["max_model_len"] = options.max_model_len
    if options.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    return args


def default_batch_size(backend: str, device: str) -> int | str:
    """1 for hf on the CPU (what CI runs); ``auto`` on a GPU (see the module docstring)."""
    return 1 if backend == "hf" and device == "cpu" else "auto"


def plan_run(backend: str, device: str, options: BackendOptions | None = None, *,
             batch_size: int | str | None = None, max_workers: int | None = None,
             timeout_s: float | None = DEFAULT_TIMEOUT_S, cuda_count: int = 0,
             environ: Mapping[str, str] | None = None,
             ray_available: bool = True) -> dict[str, Any]:
    """How an evaluation runs here: device, lm-eval model args, batch size, GPU slots.

    Args:
        backend: ``hf`` or ``vllm``.
        device: ``cpu``, ``cuda`` or ``auto``.
        options: engine options (default: none).
        batch_size: lm-eval batch size; None for :func:`default_batch_size`.
        max_workers: benchmarks at once; None: one per GPU slot on ``cuda``,
            :data:`DEFAULT_CPU_WORKERS` on the CPU.
        timeout_s: seconds before a benchmark's process is killed; None or 0: no limit.
        cuda_count: GPUs torch counts (under ``environ``'s ``CUDA_VISIBLE_DEVICES``).
        environ: the environment (default ``os.environ``).
        ray_available: whether ``ray`` is importable (lm-eval's data parallelism needs it).

    Returns:
        ``{"device", "batch_size", "model_args", "slots", "workers", "unused_gpus",
        "timeout_s"}``: ``model_args`` are the options' (:func:`option_model_args`; the
        device's defaults are ``runner.model_spec``'s);
        ``slots`` lists the GPU ids of each of the ``workers`` concurrent benchmarks (on the
        CPU, ``workers`` empty slots: :func:`run_slot` bounds concurrency either way).

    Raises:
        ValueError: every problem at once (vllm on the CPU, cuda without a GPU, more GPUs per
            benchmark than visible, more workers than slots, bad options).
    """
    options = options or BackendOptions()
    environ = os.environ if environ is None else environ
    problems = option_problems(backend, options)
    resolved = resolve_device(device, cuda_count > 0)
    if resolved == "cpu" and backend == "vllm":
        why = " (torch sees no GPU)" if device == "auto" else ""
        problems.append(f"--backend vllm runs on a GPU, got --device {device}{why}: use "
                        "--device cuda on a GPU machine, or --backend hf on the CPU")
    if resolved == "cuda" and cuda_count < 1:
        problems.append(f"--device cuda but torch sees no GPU ({VISIBLE_ENV}="
                        f"{environ.get(VISIBLE_ENV, '<unset>')}): use --device cpu or auto")
    if options.data_parallel_size > 1 and not ray_available:
        problems.append(f"--data-parallel-size {options.data_parallel_size} needs the ray "
                        "package (lm-eval runs the replicas as Ray actors): `pip install ray`, "
                        "or run one replica per benchmark (the GPU slots already run "
                        "benchmarks in parallel)")
    if batch_size is not None and not _valid_batch_size(batch_size):
        problems.append(f"--batch-size must be a positive int or 'auto', got {batch_size!r}")
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, (int, float)) or timeout_s < 0):
        problems.append(f"--timeout must be a number of seconds >= 0 (0: no limit), got "
                        f"{timeout_s!r}")
    if max_workers is not None and (isinstance(max_workers, bool)
                                    or not isinstance(max_workers, int) or max_workers < 1):
        problems.append(f"--max-workers must be a positive int, got {max_workers!r}")
    slots: list[list[str]] = []
    unused: list[str] = []
    if not problems and resolved == "cuda":
        width = options.tensor_parallel_size * options.data_parallel_size \
            if backend == "vllm" else 1
        gpus = visible_gpus(environ, cuda_count)
        try:
            slots = gpu_slots(gpus, width)
        except ValueError as e:
            problems.append(str(e))
        unused = gpus[len(slots) * width:]
        if slots and max_workers is not None and max_workers > len(slots):
            problems.append(f"--max-workers {max_workers} exceeds the {len(slots)} GPU slot(s) "
                            f"({len(gpus)} visible GPU(s), {width} per benchmark): each "
                            f"benchmark holds its GPUs; pass --max-workers {len(slots)} or "
                            "fewer, or leave it out")
    if problems:
        raise ValueError("evaluation settings:\n" + "\n".join(f"- {p}" for p in problems))
    if slots:
        workers = max_workers or len(slots)
        unused = [g for s in slots[workers:] for g in s] + unused
        slots = slots[:workers]
    else:  # the CPU: as many slots as workers, pinned to nothing
        workers = max_workers or DEFAULT_CPU_WORKERS
        slots = [[] for _ in range(workers)]
    return {"device": resolved,
            "batch_size": batch_size if batch_size is not None
            else default_batch_size(backend, resolved),
            "model_args": option_model_args(backend, options),
            "slots": slots, "workers": workers, "unused_gpus": unused,
            "timeout_s": timeout_s or None}


def _valid_batch_size(value: object) -> bool:
    if value == "auto":
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def plan_here(backend: str, device: str, options: BackendOptions | None = None, *,
              batch_size: int | str | None = None, max_workers: int | None = None,
              timeout_s: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """:func:`plan_run` for this machine (asks torch for the GPUs unless ``device='cpu'``)."""
    import importlib.util

    cuda_count = 0
    if device != "cpu":
        import torch  # slow to import (~1.5 s): only when a GPU may be used

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return plan_run(backend, device, options, batch_size=batch_size, max_workers=max_workers,
                    timeout_s=timeout_s, cuda_count=cuda_count,
                    ray_available=importlib.util.find_spec("ray") is not None)


def child_env(slot: Sequence[str] | None) -> dict[str, str]:
    """The environment a benchmark's child process gets on top of this one's: pinned to
    ``slot``'s GPUs (nothing on the CPU)."""
    return {VISIBLE_ENV: ",".join(slot)} if slot else {}


_POOLS: dict[tuple[tuple[str, ...], ...], queue.Queue] = {}
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def run_slot(slots: Sequence[Sequence[str]]) -> Iterator[list[str] | None]:
    """Hold one of ``slots`` (waiting until one is free) for a benchmark of this process.

    The flow's task runner runs benchmarks in threads of one process; they share one pool
    per slot layout, so two children never get the same GPUs, and no more than
    ``len(slots)`` run at once, however many threads the runner has. No slots at all:
    yields None at once (no bound).
    """
    if not slots:
        yield None
        return
    key = tuple(tuple(s) for s in slots)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = queue.Queue()
            for slot in key:
                pool.put(slot)
    slot = pool.get()
    try:
        yield list(slot)
    finally:
        pool.put(slot)
