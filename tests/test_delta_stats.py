"""Delta statistics: exact values on known tensors, streaming over checkpoints, the gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dareflow import delta_stats as ds
from dareflow.methods import dare, derive_key
from dareflow.recipe import parse_recipe

# δ = k / 1024: exactly representable in float32 around 1.0, so every statistic is exact.
K = [-6, -3, -2, 0, 0, 1, 2, 3, 6, 8]


def _pair(k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.ones(len(k))
    return base, base + torch.tensor(k, dtype=torch.float32) / 1024


def test_tensor_stats_exact_on_known_deltas() -> None:
    s = ds.tensor_delta_stats("w", *_pair(K))
    # linear interpolation between order statistics: position q/100 * (n - 1)
    expected = []
    ordered = sorted(K)
    for q in ds.PERCENTILES:
        pos = q / 100 * 9
        lo = math.floor(pos)
        hi = min(lo + 1, 9)
        expected.append((ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])) / 1024)
    assert s.percentiles == pytest.approx(expected, abs=1e-12)
    assert s.percentiles[0] == -6 / 1024 and s.percentiles[-1] == 8 / 1024
    assert s.percentiles[5] == 0.5 / 1024
    assert s.abs_p99 == pytest.approx((6 + 0.91 * 2) / 1024, abs=1e-12)
    assert s.max_abs == 8 / 1024
    assert s.above == {0.002: 0.5, 0.005: 0.3}  # |k| >= 3: 5 of 10; |k| >= 6: 3 of 10
    assert s.zero_fraction == 0.2
    assert s.relative_norm == pytest.approx(math.sqrt(163) / 1024 / math.sqrt(10), rel=1e-12)
    assert s.exact and s.sampled == s.numel == 10


def test_tensor_stats_shape_mismatch_names_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"tensor 'x': base shape \(2,\) != fine-tuned shape \(3,\)"):
        ds.tensor_delta_stats("x", torch.zeros(2), torch.zeros(3))


def test_relative_norm_of_zero_base() -> None:
    assert ds.tensor_delta_stats("z", torch.zeros(3), torch.zeros(3)).relative_norm == 0.0
    assert ds.tensor_delta_stats("z", torch.zeros(3), torch.ones(3)).relative_norm == math.inf


def test_rank_error_bound_is_dkw() -> None:
    assert ds.rank_error_bound(10**6) == pytest.approx(math.sqrt(math.log(2000) / 2e6))
    assert ds.rank_error_bound(10**6) < 0.002
    with pytest.raises(ValueError, match="sample size must be >= 1, got 0"):
        ds.rank_error_bound(0)


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, dict, dict]:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(40, 25, generator=g) * 0.02,
            "b.weight": torch.randn(300, generator=g).to(torch.bfloat16),
            "pos": torch.arange(5)}
    tuned = {"a.weight": base["a.weight"] + torch.randn(40, 25, generator=g) * 0.002,
             "b.weight": (base["b.weight"].float() + 0.004).to(torch.bfloat16),
             "pos": torch.arange(5)}
    return (_folder(tmp_path / "base", base), _folder(tmp_path / "ft", tuned), base, tuned)


def test_streaming_stats_match_the_tensors_exactly(pair) -> None:
    base_uri, ft_uri, base, tuned = pair
    stats = ds.delta_stats(base_uri, ft_uri)
    assert [t.name for t in stats.tensors] == ["a.weight", "b.weight"]
    assert stats.skipped == [("pos", "dtype I64 is not floating point")]
    for t in stats.tensors:
        assert t == ds.tensor_delta_stats(t.name, base[t.name], tuned[t.name])
    every = torch.cat([(tuned[n].float() - base[n].float()).flatten() for n in ("a.weight", "b.weight")])
    whole = ds.tensor_delta_stats("(all)", torch.zeros_like(every), every)
    assert stats.rank_error == 0.0 and stats.overall.exact
    assert stats.overall.percentiles == pytest.approx(whole.percentiles, abs=1e-12)
    assert stats.overall.max_abs == whole.max_abs
    b_all = torch.cat([base[n].float().flatten() for n in ("a.weight", "b.weight")])
    assert stats.overall.relative_norm == pytest.approx(
        float(every.double().norm() / b_all.double().norm()), rel=1e-9)
    frame = stats.to_frame()
    assert list(frame["tensor"]) == ["a.weight", "b.weight", "(all)"]
    assert "p50" in frame and "frac>0.005" in frame and "zero_frac" in frame


def test_overall_sample_is_deterministic_and_bounded(pair) -> None:
    base_uri, ft_uri, *_ = pair
    one = ds.delta_stats(base_uri, ft_uri, overall_sample=200)
    two = ds.delta_stats(base_uri, ft_uri, overall_sample=200)
    assert one.overall == two.overall
    assert 120 < one.overall.sampled < 280  # Bernoulli(200/1300) of 1300 elements
    assert one.rank_error == pytest.approx(ds.rank_error_bound(one.overall.sampled))
    exact = ds.delta_stats(base_uri, ft_uri)
    # sums stay exact when only the percentiles are sampled
    assert one.overall.max_abs == exact.overall.max_abs
    assert one.overall.relative_norm == pytest.approx(exact.overall.relative_norm, rel=1e-12)


def test_read_sample_reads_the_same_positions_of_both_models(tmp_path: Path) -> None:
    base = torch.arange(100_000, dtype=torch.float32)
    b = _folder(tmp_path / "b", {"w": base})
    f = _folder(tmp_path / "f", {"w": base + 0.25})
    from dareflow.io.checkpoints import Checkpoint

    sb = ds.read_sample(Checkpoint.open(b), "w", 1600)
    sf = ds.read_sample(Checkpoint.open(f), "w", 1600)
    assert sb.numel() == 1600 and torch.equal(sf - sb, torch.full((1600,), 0.25))
    # 16 windows of 100 contiguous elements, one in each 1/16 of the tensor
    starts = sb[::100].long().tolist()
    assert all(i * 6250 <= s <= (i + 1) * 6250 - 100 for i, s in enumerate(starts))
    assert torch.equal(sb, ds.read_sample(Checkpoint.open(b), "w", 1600))
    # a file truncated after it was opened: named, with the fix
    ckpt = Checkpoint.open(f)
    path = Path(f) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200_000])
    with pytest.raises(ValueError, match=r"model\.safetensors' ends inside tensor 'w'.*download it again"):
        ds.read_sample(ckpt, "w", 1600)


def test_a_dare_merged_source_shows_its_zeros(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, 100, generator=g) * 0.02
    delta = torch.randn(200, 100, generator=g) * 0.002
    merged = base + dare(delta, 0.7, derive_key(0, "m", "w"))
    stats = ds.delta_stats(_folder(tmp_path / "b", {"w": base}), _folder(tmp_path / "m", {"w": merged}))
    assert stats.overall.zero_fraction == pytest.approx(0.7, abs=0.02)


def _wrong_base(tmp_path: Path, src: Path) -> str:
    """The same architecture with unrelated (re-initialised) weights."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "unrelated"
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(123)
    tensors = {n: (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype) if t.is_floating_point()
               else t for n, t in load_file(src / "model.safetensors").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _recipe(base: str, model: str, gate: dict | None = None) -> object:
    data = {"merge_method": "dare_linear", "base_model": base,
            "models": [{"model": model}], "parameters": {"drop_rate": 0.9}}
    if gate is not None:
        data["gate"] = gate
    return parse_recipe(data)


def test_gate_passes_sft_deltas_and_refuses_the_wrong_base(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    ft = tmp_path / "ft"
    shutil.copytree(tiny_llama_dir, ft)
    g = torch.Generator().manual_seed(7)
    tensors = {n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(t.dtype)
               for n, t in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})

    ok = ds.check_gate(_recipe(str(tiny_llama_dir), str(ft)), str(tiny_llama_dir), {"ft": str(ft)})
    assert [v.passed for v in ok] == [True]
    assert ok[0].abs_p99 == pytest.approx(0.002 * 2.576, rel=0.15)  # Gaussian p99 of |δ|

    wrong = _wrong_base(tmp_path, tiny_llama_dir)
    with pytest.raises(ValueError) as e:
        ds.check_gate(_recipe(wrong, str(ft)), wrong, {"my-ft": str(ft)})
    msg = str(e.value)
    assert msg.startswith(f"DARE does not apply to 'my-ft' measured against base '{wrong}': "
                          "99th percentile of |delta| is ")
    assert "> max_abs_delta_p99 0.03; ||delta|| / ||base|| is " in msg
    assert "Worst tensors: " in msg and "(rel norm " in msg
    # the hint names the user's models, not the paper's
    assert (f"merge 'my-ft' against the model it was fine-tuned from, not against '{wrong}'."
            in msg)
    assert "CodeLlama" not in msg
    assert msg.endswith("To merge anyway set gate: {mode: warn} (or off) in the recipe; "
                        f"see `dareflow inspect {wrong} my-ft`.")

    warned = ds.check_gate(_recipe(wrong, str(ft), {"mode": "warn"}), wrong, {"my-ft": str(ft)})
    assert [v.passed for v in warned] == [False] and warned[0].message == msg
    assert ds.check_gate(_recipe(wrong, str(ft), {"mode": "off"}), wrong, {"my-ft": str(ft)}) == []
    # magnitude pruning is not gated by default
    mp = parse_recipe({"merge_method": "magnitude_linear", "base_model": wrong,
                       "models": [{"model": str(ft)}], "parameters": {"drop_rate": 0.9}})
    assert ds.check_gate(mp, wrong, {"my-ft": str(ft)}) == []


def test_gate_config_is_strict() -> None:
    from dareflow.recipe import ProblemsError

    with pytest.raises(ProblemsError, match=r"gate.mode: .*'refuse', 'warn' or 'off'"):
        _recipe("b", "m", {"mode": "maybe"})
    with pytest.raises(ProblemsError, match=r"gate.max_p99: unknown key"):
        _recipe("b", "m", {"max_p99": 0.1})


def test_format_table_and_plot(pair, tmp_path: Path) -> None:
    base_uri, ft_uri, *_ = pair
    stats = ds.delta_stats(base_uri, ft_uri)
    text = ds.format_table(stats)
    assert text.splitlines()[0].split()[:3] == ["tensor", "p0", "p10"]
    assert text.splitlines()[-2].startswith("(all)")
    assert "overall percentiles exact; 1 tensor(s) skipped: pos (dtype I64" in text
    png = ds.plot_delta_stats(stats, str(tmp_path / "plots" / "d.png"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(stats.overall.relative_norm)
