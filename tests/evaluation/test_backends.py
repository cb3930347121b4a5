"""Run planning without a GPU: devices, GPU slots for 1, 2 and 8 visible GPUs, each child's
environment, lm-eval's model arguments, and every refusal."""

from __future__ import annotations

import threading
import time

import pytest

from dareflow.evaluation.backends import (
    DEFAULT_CPU_WORKERS,
    DEFAULT_TIMEOUT_S,
    BackendOptions,
    child_env,
    gpu_slots,
    plan_run,
    resolve_device,
    run_slot,
    visible_gpus,
)
from dareflow.evaluation.runner import model_spec

NO_ENV: dict[str, str] = {}


def _plan(backend: str, gpus: int, environ: dict[str, str] | None = None, **kw):
    options = BackendOptions(**{k: kw.pop(k) for k in list(kw)
                                if k in BackendOptions.__dataclass_fields__})
    return plan_run(backend, kw.pop("device", "auto"), options, cuda_count=gpus,
                    environ=NO_ENV if environ is None else environ, **kw)


@pytest.mark.parametrize(("gpus", "tp", "slots"), [
    (1, 1, [["0"]]),
    (2, 1, [["0"], ["1"]]),
    (2, 2, [["0", "1"]]),
    (8, 1, [[str(i)] for i in range(8)]),
    (8, 2, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),
    (8, 4, [["0", "1", "2", "3"], ["4", "5", "6", "7"]]),
    (8, 8, [[str(i) for i in range(8)]]),
])
def test_vllm_one_engine_per_gpu_group(gpus: int, tp: int, slots: list[list[str]]) -> None:
    plan = _plan("vllm", gpus, tensor_parallel_size=tp)
    assert plan["device"] == "cuda" and plan["slots"] == slots
    assert plan["workers"] == len(slots) == gpus // tp and plan["unused_gpus"] == []
    assert plan["batch_size"] == "auto"  # one LLM.generate call per task: vLLM batches
    assert plan["model_args"] == {"tensor_parallel_size": tp}
    assert [child_env(s) for s in plan["slots"]] == [
        {"CUDA_VISIBLE_DEVICES": ",".join(s)} for s in slots]
    assert plan["timeout_s"] == DEFAULT_TIMEOUT_S == 6 * 3600


def test_vllm_engine_options_reach_lm_eval() -> None:
    plan = _plan("vllm", 8, tensor_parallel_size=2, data_parallel_size=2, max_model_len=4096,
                 gpu_memory_utilization=0.85)
    assert plan["slots"] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert plan["model_args"] == {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                  "max_model_len": 4096, "gpu_memory_utilization": 0.85}
    # what lm-eval gets: the device's defaults, a suite entry's model_args, then the options
    name, args = model_spec("/m", "vllm", plan["device"],
                            {"max_model_len": 2048, "seed": 1, **plan["model_args"]})
    assert (name, args) == ("vllm", {
        "pretrained": "/m", "dtype": "auto", "trust_remote_code": False, "seed": 1,
        "tensor_parallel_size": 2, "data_parallel_size": 2, "max_model_len": 4096,
        "gpu_memory_utilization": 0.85})


def test_visible_devices_are_the_ids_children_get() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3, 5,GPU-aa,7"}
    plan = _plan("vllm", 4, env, tensor_parallel_size=2)
    assert plan["slots"] == [["3", "5"], ["GPU-aa", "7"]]
    assert child_env(plan["slots"][1]) == {"CUDA_VISIBLE_DEVICES": "GPU-aa,7"}
    # torch counted fewer than listed (CUDA stops at an invalid id): the first ones
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,9,2"}, 1) == ["1"]
    assert visible_gpus({}, 3) == ["0", "1", "2"]
    # GPUs left over by the group width stay unused; fewer workers leave slots unused
    assert _plan("vllm", 3, tensor_parallel_size=2)["unused_gpus"] == ["2"]
    few = _plan("hf", 8, max_workers=3)
    assert few["slots"] == [["0"], ["1"], ["2"]] and few["workers"] == 3
    assert few["unused_gpus"] == ["3", "4", "5", "6", "7"]
    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]


def test_hf_on_a_gpu_is_bf16_batch_auto_one_gpu_per_benchmark() -> None:
    plan = _plan("hf", 2)
    assert plan["device"] == "cuda" and plan["slots"] == [["0"], ["1"]]
    assert plan["model_args"] == {} and plan["batch_size"] == "auto"
    assert model_spec("/m", "hf", plan["device"], plan["model_args"])[1] == {
        "pretrained": "/m", "dtype": "bfloat16", "trust_remote_code": False}
    assert _plan("hf", 2, max_model_len=2048)["model_args"] == {"max_length": 2048}


def test_hf_on_the_cpu_as_before() -> None:
    for device in ("auto", "cpu"):
        plan = _plan("hf", 0, device=device)
        assert plan["device"] == "cpu" and plan["model_args"] == {}
        assert model_spec("/m", "hf", "cpu")[1]["dtype"] == "float32"
        assert plan["batch_size"] == 1 and plan["workers"] == DEFAULT_CPU_WORKERS
        assert plan["slots"] == [[]] * DEFAULT_CPU_WORKERS and child_env([]) == {}
    assert _plan("hf", 4, device="cpu")["device"] == "cpu"  # asked for: GPUs ignored
    plan = _plan("hf", 0, batch_size=8, max_workers=3, timeout_s=0)
    assert (plan["batch_size"], plan["workers"], plan["timeout_s"]) == (8, 3, None)
    assert resolve_device("auto", True) == "cuda" and resolve_device("auto", False) == "cpu"


def test_refusals_name_the_flag_and_the_fix() -> None:
    def problems(*args, **kw) -> str:
        with pytest.raises(ValueError) as e:
            _plan(*args, **kw)
        return str(e.value)

    assert problems("vllm", 0) == (
        "evaluation settings:\n- --backend vllm runs on a GPU, got --device auto (torch sees "
        "no GPU): use --device cuda on a GPU machine, or --backend hf on the CPU")
    assert "--backend vllm runs on a GPU, got --device cpu:" in problems("vllm", 8,
                                                                          device="cpu")
    assert problems("hf", 0, device="cuda") == (
        "evaluation settings:\n- --device cuda but torch sees no GPU "
        "(CUDA_VISIBLE_DEVICES=<unset>): use --device cpu or auto")
    assert problems("vllm", 2, tensor_parallel_size=4) == (
        "evaluation settings:\n- one benchmark needs 4 GPUs (tensor_parallel_size × "
        "data_parallel_size) but 2 are visible (CUDA_VISIBLE_DEVICES=0,1): lower "
        "--tensor-parallel-size / --data-parallel-size or expose more GPUs")
    assert problems("vllm", 8, tensor_parallel_size=2, max_workers=5) == (
        "evaluation settings:\n- --max-workers 5 exceeds the 4 GPU slot(s) (8 visible GPU(s), "
        "2 per benchmark): each benchmark holds its GPUs; pass --max-workers 4 or fewer, or "
        "leave it out")
    assert "--data-parallel-size 2 needs the ray package" in problems(
        "vllm", 8, data_parallel_size=2, ray_available=False)
    # everything wrong at once, each named
    many = problems("hf", 1, tensor_parallel_size=2, gpu_memory_utilization=0.5,
                    max_model_len=0, batch_size="big", timeout_s=-1, max_workers=0)
    assert many.splitlines() == [
        "evaluation settings:",
        ("- --tensor-parallel-size 2 applies to --backend vllm only (hf runs one model per "
         "GPU): drop it or use --backend vllm"),
        "- --max-model-len must be a positive number of tokens, got 0",
        ("- --gpu-memory-utilization 0.5 applies to --backend vllm only: drop it or use "
         "--backend vllm"),
        "- --batch-size must be a positive int or 'auto', got 'big'",
        "- --timeout must be a number of seconds >= 0 (0: no limit), got -1",
        "- --max-workers must be a positive int, got 0"]
    assert "--gpu-memory-utilization must be in (0, 1], got 1.5" in problems(
        "vllm", 1, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="unknown device 'gpu'; did you mean 'cpu'\\? choices: auto, cpu, cuda"):
        resolve_device("gpu", True)


def test_run_slot_hands_each_slot_to_one_run_at_a_time() -> None:
    slots = [["0", "1"], ["2", "3"]]
    held: list[list[str]] = []
    peak, lock = [0], threading.Lock()

    def run() -> None:
        with run_slot(slots) as slot:
            with lock:
                assert slot not in held
                held.append(slot)
                peak[0] = max(peak[0], len(held))
            time.sleep(0.05)
            with lock:
                held.remove(slot)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and held == []
    with run_slot([]) as none:
        assert none is None
