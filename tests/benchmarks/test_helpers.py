"""Smoke tests of the benchmark's helpers (the benchmark itself is a script)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.family import FamilySpec, generate_family
from benchmarks.measure import io_floor, run_measured
from benchmarks.report import (
    MERGES,
    Agreement,
    DareStats,
    dare_agrees,
    dareflow_recipe,
    format_table,
    mergekit_config,
)
from dareflow.recipe import parse_recipe

TINY = FamilySpec(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=128)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return generate_family(tmp_path_factory.mktemp("family"), TINY, log=lambda *a: None)


def test_family_is_bf16_llama_with_small_deltas_and_cached(family, tmp_path):
    from safetensors.torch import load_file

    assert sorted(family) == ["base", "ft0", "ft1"]
    base = load_file(family["base"] / "model.safetensors")
    ft = load_file(family["ft0"] / "model.safetensors")
    assert sum(t.numel() for t in base.values()) == TINY.num_params()
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    name = "model.layers.0.mlp.up_proj.weight"
    assert 0.0015 < float((ft[name].float() - base[name].float()).std()) < 0.0025
    assert json.loads((family["base"] / "config.json").read_text())["num_key_value_heads"] == 2
    stamp = (family["base"].parent / "family.json").stat().st_mtime_ns
    generate_family(family["base"].parent.parent, TINY, log=lambda *a: None)  # cached
    assert (family["base"].parent / "family.json").stat().st_mtime_ns == stamp


def test_streamed_family_has_the_same_tensors_and_config(family, tmp_path):
    from safetensors.torch import load_file

    streamed = generate_family(tmp_path, TINY, log=lambda *a: None, streamed=True)
    for role in ("base", "ft0", "ft1"):
        a = load_file(family[role] / "model.safetensors")
        b = load_file(streamed[role] / "model.safetensors")
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype == torch.bfloat16
            assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
        config = json.loads((streamed[role] / "config.json").read_text())
        assert config == json.loads((family[role] / "config.json").read_text())


@pytest.mark.parametrize("method", list(MERGES))
def test_recipes_are_valid_and_name_both_fine_tunes(method):
    recipe = parse_recipe(dareflow_recipe(method, "/b", ["/f0", "/f1"]))
    assert recipe.merge_method == method and len(recipe.models) == 2
    config = mergekit_config(method, "/b", ["/f0", "/f1"])
    assert config["models"][0] == {"model": "/b"} and config["dtype"] == "bfloat16"


def test_format_table_has_both_modes_speedups_and_floor_ratios():
    table = format_table([
        {"merge": "dare_ties", "dareflow_wall": 10.0, "dareflow_server_wall": 9.0,
         "mergekit_wall": 45.0, "io_floor_wall": 5.0, "direct_floor_wall": 4.0,
         "dareflow_cpu": 15.0, "mergekit_cpu": 40.0,
         "dareflow_rss": 900.0, "mergekit_rss": 4000.0, "dareflow_anon": 500.0,
         "mergekit_anon": 3500.0},
        {"merge": "ties", "dareflow_wall": 12.0, "io_floor_wall": 5.0},
    ])
    lines = table.splitlines()
    assert len(lines) == 4 and "dareflow s plain / server" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["dare_ties", "10.0 / 9.0", "45.0", "4.5x / 5.0x", "5.0",
                     "2.00x / 1.80x", "4.0", "15.0 / 40.0", "900 / 4000", "500 / 3500"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:6] == ["ties", "12.0 / —", "—", "—x / —x", "5.0", "2.40x / —x"]


def test_agreement_counts_bf16_rounding_as_equal():
    a = torch.tensor([1.0, 0.5, 0.02], dtype=torch.bfloat16)
    b = a.float() + torch.tensor([2**-8, 0.0, 0.001])
    agreement = Agreement()
    agreement.add(a, b.to(torch.bfloat16), [a])
    assert agreement.elements == 3 and agreement.within == 2


def test_dare_stats_agree_for_the_same_process_and_not_for_another():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=g)
    fts = [base + torch.randn(200_000, generator=g) * 0.01 for _ in range(2)]
    x = sum(0.5 * (f - base) for f in fts)

    def merged(seed, keep=0.5):
        mask = torch.rand(200_000, generator=torch.Generator().manual_seed(seed)) < keep
        return base + torch.where(mask, x / keep, 0.0)

    a, b, c = DareStats(), DareStats(), DareStats()
    a.add(base, merged(1), fts, [0.5, 0.5])
    b.add(base, merged(2), fts, [0.5, 0.5])
    c.add(base, merged(3, keep=0.3), fts, [0.5, 0.5])
    assert dare_agrees(a, b)[0]
    assert not dare_agrees(a, c)[0]


def test_run_measured_reports_time_cpu_and_memory(tmp_path):
    code = "x = bytearray(64 << 20); x[::4096] = b'1' * len(x[::4096])"
    stats = run_measured([sys.executable, "-c", code], log_path=str(tmp_path / "log"))
    assert stats.returncode == 0 and stats.wall_s > 0 and stats.cpu_s > 0
    assert stats.maxrss_mb >= 64


@pytest.mark.parametrize("direct", [False, True])
def test_io_floor_reads_inputs_and_removes_its_output(tmp_path, direct):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x" * 100_000)
    stats = io_floor([str(src)], str(tmp_path / "out.tmp"), 50_001, direct=direct)
    assert stats.wall_s > 0 and not (tmp_path / "out.tmp").exists()


def test_dareflow_phases_from_a_prefect_log():
    import time

    from benchmarks.report import dareflow_phases

    started = time.mktime((2025, 1, 2, 10, 0, 0, 0, 0, -1))
    lines = [
        "10:00:04.000 | INFO    | Flow run 'x' - Beginning flow run 'x' for flow 'dare-merge'",
        "10:00:06.500 | INFO    | Task run 'plan-merge-1' - planned 18 units (147 tensors)",
        "10:00:16.500 | INFO    | Task run 'assemble-model-1' - published merged model to /o",
    ]
    phases = dareflow_phases(lines, started, 17.0)
    assert phases == pytest.approx({"startup": 4.0, "gate+plan": 2.5, "merge": 10.0,
                                    "finish": 0.5})
    assert dareflow_phases(lines[:1], started, 17.0) == {}


def test_cuda_section_skips_cleanly_without_a_gpu(family, monkeypatch, capsys):
    from benchmarks import merge_vs_mergekit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    merge_vs_mergekit.cuda_section(family, ["dare_ties"])
    assert "no CUDA device here" in capsys.readouterr().out


def test_device_section_runs_the_accelerator_code_path_on_cpu(family, monkeypatch, capsys):
    # what --device cuda runs, on the CPU with the torch-op path accelerators take
    from benchmarks import merge_vs_mergekit
    from dareflow.methods import blockwise

    monkeypatch.setattr(blockwise._Merge, "kernels_enabled", False)
    rates = merge_vs_mergekit.device_section(family, ["dare_ties", "ties"], torch.device("cpu"))
    out = capsys.readouterr().out
    assert set(rates) == {"dare_ties", "ties"} and all(r > 0 for r in rates.values())
    assert out.count("identical to the CPU result: True") == 2
    assert "cpu: measured copy bandwidth" in out and "of copy bandwidth" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_merge_is_byte_identical_to_cpu(family, capsys):
    from benchmarks import merge_vs_mergekit

    merge_vs_mergekit.cuda_section(family, ["dare_ties", "ties"])
    out = capsys.readouterr().out
    assert "identical to the CPU result: True" in out and "False" not in out


def test_drop_from_cache_evicts_the_file_pages(tmp_path):
    import mmap
    import os

    from benchmarks.measure import drop_from_cache

    path = tmp_path / "input.bin"
    path.write_bytes(os.urandom(8 << 20))
    os.sync()

    def major_faults() -> int:
        stat = Path("/proc/self/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[9])

    def resident_pages() -> int:
        # mincore is not in the stdlib: a page is resident if touching it through a
        # mapping is no major fault (one that reads the disk)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            before = major_faults()
            for i in range(0, len(m), mmap.PAGESIZE):
                m[i]
            return len(m) // mmap.PAGESIZE - (major_faults() - before)

    path.read_bytes()
    assert resident_pages() == 2048  # read once: every page cached
    drop_from_cache([str(path)])
    assert resident_pages() < 2048  # evicted: reading faults on the disk again


def test_disk_space_check_names_the_need_and_the_fix(monkeypatch, tmp_path):
    import shutil

    import benchmarks.merge_vs_mergekit as bench

    monkeypatch.setattr(bench, "BENCH", tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(0, 0, 70e9))
    spec = bench.SIZES["7b"]
    with pytest.raises(SystemExit) as caught:
        bench.check_disk_space(spec, outputs=3)
    assert str(caught.value) == (
        f"error: the 7.24 B family needs ~87 GB under {tmp_path} (3 models + 3 outputs of "
        "14.5 GB); 70 GB are free. Free space, skip the comparison with --no-checks (one "
        "output fewer), or run a smaller --size")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(0, 0, 76e9))
    bench.check_disk_space(spec, outputs=2)  # 72.5 GB + 3 %: fits
