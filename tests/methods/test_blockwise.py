"""The blockwise merge is the reference merge, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dareflow.methods import MergeSpec, ModelParams, blockwise, keep_mask, merge_tensor
from dareflow.methods.blockwise import merge_blockwise
from dareflow.methods.masks import MaskStream, derive_key
from dareflow.methods.table import merge_tensor_reference
from tests.methods.helpers import local_randn

NAME = "model.layers.1.mlp.down_proj.weight"

VARIANTS = [
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "scale": 0.7}),
    ("dare_linear", {}),
    ("dare_linear", {"rescale": "l1"}),
    ("dare_linear", {"rescale": "none"}),
    ("dare_ties", {}),
    ("dare_ties", {"sign_election": "weighted_sum", "disjoint_merge": "sum", "rescale": "l1"}),
    ("dare_ties", {"trim_after_dare": 0.8, "rescale": "l1", "sign_election": "count",
                   "disjoint_merge": "weight"}),
    # no trim: the whole final pass runs in the compiled kernel
    ("dare_ties", {"trim_after_dare": 0.0}),
    ("dare_ties", {"trim_after_dare": 0.0, "sign_election": "count", "disjoint_merge": "weight",
                   "scale": 0.6}),
    ("dare_ties", {"trim_after_dare": 0.0, "sign_election": "weighted_sum", "rescale": "none"}),
    ("dare_ties", {"trim_after_dare": 0.0, "disjoint_merge": "sum", "rescale": "l1",
                   "scale": 1.3}),
    ("dare_linear", {"normalize": True, "scale": 0.8}),
    ("ties", {}),
    ("ties", {"sign_election": "weighted_sum", "disjoint_merge": "weight"}),
    ("ties", {"sign_election": "count", "disjoint_merge": "sum", "scale": 1.3}),
    ("magnitude_linear", {}),
    ("magnitude_linear", {"rescale": "inverse"}),
    # the paper's variants (the defaults before mergekit's became dareflow's)
    ("dare_linear", {"rescale": "inverse"}),
    ("dare_ties", {"rescale": "inverse", "sign_election": "sum", "disjoint_merge": "mean",
                   "trim_after_dare": 0.8}),
    ("dare_ties", {"rescale": "inverse", "sign_election": "sum", "disjoint_merge": "mean",
                   "trim_after_dare": 0.0}),
    ("ties", {"sign_election": "sum", "disjoint_merge": "mean"}),
]


def _family(shape, dtype, quantized, seed=0):
    base = local_randn(*shape, seed=seed) * 0.02
    if quantized:  # few distinct deltas: many ties at the magnitude threshold
        fts = [base + (local_randn(*shape, seed=seed + k + 1) * 3).round() * 1e-3
               for k in range(2)]
    else:
        fts = [base + local_randn(*shape, seed=seed + k + 1) * 2e-3 for k in range(2)]
    return base.to(dtype), [f.to(dtype) for f in fts]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _spec(method, options, rates, out_dtype):
    sparsifies = method not in ("linear", "task_arithmetic")
    models = tuple(
        ModelParams(f"m{k}", weight=w, drop_rate=r if sparsifies else 0.0)
        for k, (w, r) in enumerate(zip((0.5, 0.7), rates))
    )
    return MergeSpec(method=method, models=models, seed=3, out_dtype=out_dtype, **options)


@pytest.mark.parametrize(("method", "options"), VARIANTS)
@pytest.mark.parametrize("rates", [(0.5, 0.5), (0.9, 0.3), (0.0, 1.0)])
def test_blockwise_equals_reference_bitwise(method, options, rates):
    for dtype, quantized, out_dtype in [(torch.bfloat16, False, torch.bfloat16),
                                        (torch.bfloat16, True, torch.float32),
                                        (torch.float32, False, torch.bfloat16)]:
        base, fts = _family((37, 301), dtype, quantized)
        spec = _spec(method, options, rates, out_dtype)
        reference = merge_tensor_reference(NAME, base, fts, spec)
        assert torch.equal(_bits(merge_tensor(NAME, base, fts, spec)), _bits(reference))
        # small blocks: many block boundaries, ties spread over blocks
        small = merge_blockwise(NAME, None if method == "linear" else base, fts, spec,
                                block=1024)
        assert torch.equal(_bits(small), _bits(reference)), (dtype, quantized, out_dtype)


@pytest.mark.parametrize("block", [None, 8, 1000, 1 << 15])
def test_blockwise_equals_reference_on_a_tensor_of_many_l1_blocks(block):
    # several L1 blocks, a partial one at the end, and merge blocks that end inside
    # an L1 block: the l1 sums carry over between kernel calls in the same order
    n = (1 << 15) * 9 + 13
    base, fts = _family((n,), torch.bfloat16, False, seed=5)
    for method, options in [("dare_ties", VARIANTS[8][1]), ("dare_linear", {"rescale": "l1"}),
                            ("dare_linear", {})]:
        spec = _spec(method, options, (0.5, 0.9), torch.bfloat16)
        assert torch.equal(_bits(merge_blockwise(NAME, base, fts, spec, block=block)),
                           _bits(merge_tensor_reference(NAME, base, fts, spec)))


@pytest.mark.parametrize("block", [8, 1000, 1 << 15])
@pytest.mark.parametrize("method", ["ties", "magnitude_linear", "dare_ties"])
def test_blockwise_keeps_the_first_ties_at_the_threshold_across_blocks(block, method):
    # few distinct deltas: the k-th magnitude is shared by thousands of entries and only
    # the first of them (flat-index order) are kept; the kernels split the one piece
    # where that budget runs out, whatever the block size
    # (dare_ties: fewer drops than trims would put the threshold at 0, among the drops)
    base, fts = _family((203, 301), torch.bfloat16, True, seed=2)
    options, rates = {}, (0.55, 0.35)
    if method == "dare_ties":
        options, rates = {"trim_after_dare": 0.5}, (0.2, 0.1)
    spec = _spec(method, options, rates, torch.float32)
    merge = blockwise._Merge(NAME, base, fts, spec, block)
    merge.l1_pass()
    merge.select_pass()
    for model in merge.models:  # a threshold above 0; the budget neither none nor all ties
        assert model.select == "kth" and model.kth > 0
        assert not model.keep_all_ties and model.ties_to_keep > 0
    assert torch.equal(_bits(merge_blockwise(NAME, base, fts, spec, block=block)),
                       _bits(merge_tensor_reference(NAME, base, fts, spec)))


@pytest.mark.parametrize(("method", "options"), [v for v in VARIANTS if v[0] != "linear"])
def test_device_code_path_equals_reference_on_cpu(monkeypatch, method, options):
    # the torch-op path (what CUDA runs: masks drawn by torch integer ops) gives the
    # same bytes as the compiled kernels and the reference
    base, fts = _family((37, 301), torch.bfloat16, False)
    spec = _spec(method, options, (0.5, 0.9), torch.bfloat16)
    reference = merge_tensor_reference(NAME, base, fts, spec)
    monkeypatch.setattr(blockwise._Merge, "kernels_enabled", False)
    assert torch.equal(_bits(merge_blockwise(NAME, base, fts, spec, block=1024)),
                       _bits(reference))


def test_blockwise_refuses_blocks_that_are_not_a_multiple_of_8():
    base, fts = _family((64,), torch.bfloat16, False)
    spec = _spec("dare_linear", {}, (0.5, 0.5), torch.bfloat16)
    with pytest.raises(ValueError, match="block must be a positive multiple of 8, got 12"):
        merge_blockwise(NAME, base, fts, spec, block=12)


def test_blockwise_reads_read_only_inputs_and_fills_out():
    base, fts = _family((64, 64), torch.bfloat16, False)
    spec = _spec("dare_ties", {}, (0.5, 0.5), torch.bfloat16)
    frozen = [torch.from_numpy(t.view(torch.int16).numpy().copy()).view(torch.bfloat16)
              for t in (base, *fts)]
    out = torch.empty(64, 64, dtype=torch.bfloat16)
    result = merge_tensor(NAME, frozen[0], frozen[1:], spec, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(out), _bits(merge_tensor_reference(NAME, base, fts, spec)))
    with pytest.raises(ValueError, match="out must be contiguous"):
        merge_tensor(NAME, base, fts, spec, out=torch.empty(64, 64))


def test_blockwise_non_finite_input_still_names_the_model():
    base, fts = _family((50, 50), torch.bfloat16, False)
    fts[1][3, 4] = float("nan")
    spec = _spec("dare_linear", {}, (0.5, 0.5), torch.bfloat16)
    with pytest.raises(ValueError, match="'m1'"):
        merge_tensor(NAME, base, fts, spec)


def test_blockwise_same_bytes_with_one_or_two_torch_threads(restore_threads):
    base, fts = _family((300, 300), torch.bfloat16, True)
    spec = _spec("ties", {}, (0.5, 0.5), torch.bfloat16)
    torch.set_num_threads(1)
    one = merge_tensor(NAME, base, fts, spec)
    torch.set_num_threads(2)
    assert torch.equal(_bits(one), _bits(merge_tensor(NAME, base, fts, spec)))


@pytest.mark.parametrize(("start", "stop"), [(0, 10), (10, 70_000), (4_194_300, 4_194_310),
                                               (4_194_305, 4_194_313)])
def test_mask_stream_blocks_are_slices_of_the_mask(start, stop):
    key = derive_key(0, "m", NAME)
    n = 4_194_320
    full = keep_mask((n,), 0.3, key).numpy()
    stream = MaskStream(key, 0.3)
    assert np.array_equal(stream.block(start, stop), full[start:stop])


@pytest.mark.parametrize("method", ["ties", "magnitude_linear"])
@pytest.mark.parametrize("density", [0.55, 0.3, 0.001])
def test_blockwise_keeps_mergekit_density_count(method, density):
    # a mergekit density keeps int(density · n) entries on both paths
    base, fts = _family((37, 301), torch.bfloat16, True)
    p = round(1 - density, 12)
    models = tuple(ModelParams(f"m{k}", weight=w, drop_rate=p, density=density)
                   for k, w in enumerate((0.5, 0.7)))
    spec = MergeSpec(method=method, models=models, out_dtype=torch.float32)
    reference = merge_tensor_reference(NAME, base, fts, spec)
    assert torch.equal(_bits(merge_blockwise(NAME, base, fts, spec, block=1024)),
                       _bits(reference))
    # one model, deltas without zeros: exactly int(density · n) entries change
    base, fts = _family((37, 301), torch.float32, False)
    one = MergeSpec(method=method, models=models[:1], out_dtype=torch.float32)
    kept = int((merge_tensor(NAME, base, fts[:1], one) != base).sum())
    assert kept == max(1, int(density * 37 * 301))


@pytest.mark.parametrize("window", ["predicted", "elsewhere", "none"])
@pytest.mark.parametrize("quantized", [False, True])
def test_magnitude_threshold_by_histograms_is_the_sorted_kth(quantized, window, monkeypatch):
    # the CPU kernels' histograms find what sorting |δ| finds: the k-th largest
    # magnitude, how many are greater, how many tie with it (few distinct deltas:
    # thousands of ties; exact zeros: the +0/-0 bucket), whether the sample's window of
    # buckets holds the threshold's (one pass) or not (a second pass counts it)
    base, fts = _family((37, 301), torch.float32, quantized)
    fts[0].reshape(-1)[:500] = base.reshape(-1)[:500]  # δ = 0 exactly
    spec = _spec("ties", {}, (0.3, 0.8), torch.float32)
    merge = blockwise._Merge(NAME, base, fts, spec, 1024)
    assert merge.use_kernels
    if window == "elsewhere":  # buckets of inf and NaN: never a finite threshold's
        monkeypatch.setattr(merge, "_likely_buckets", lambda k, position: (0x7F80, 4))
    elif window == "none":
        monkeypatch.setattr(merge, "_likely_buckets", lambda k, position: (0, 0))
    passes = []
    monkeypatch.setattr(blockwise.kernels, "bucket_histogram",
                        _counting(blockwise.kernels.bucket_histogram, passes))
    n = base.numel()
    mags = [(ft - base).abs().reshape(-1).sort().values for ft in fts]
    for position in (0, 1, 499, 500, n // 2, n - 2, n - 1):
        # both models in the same passes, each at its own position
        positions = {0: position, 1: n - 1 - position}
        found = merge._kths_by_histograms(positions)
        for k, at in positions.items():
            kth, greater, ties = found[k]
            assert kth == float(mags[k][at])
            assert greater == int((mags[k] > mags[k][at]).sum())
            assert ties == int((mags[k] == mags[k][at]).sum())
        assert found == {k: merge._kth_by_sorting(k, at) for k, at in positions.items()}
    # the whole tensor is sampled here (fewer elements than THRESHOLD_SAMPLE): never missed
    assert (len(passes) > 0) == (window != "predicted")


def _counting(kernel, calls):
    def counted(*args):
        calls.append(args[1])
        return kernel(*args)
    return counted


def test_sampled_window_holds_the_threshold_and_a_miss_stays_exact(monkeypatch):
    # 620 k deltas, sampled every 9th: the predicted buckets (at most THRESHOLD_WINDOW)
    # hold the sorted threshold's at densities from 0.001 to 0.999; deltas planted at exactly the sampled
    # positions mislead the sample, and the second pass still finds the exact threshold
    base, fts = _family((2048, 303), torch.bfloat16, False)
    spec = _spec("ties", {}, (0.5, 0.5), torch.float32)
    merge = blockwise._Merge(NAME, base, fts, spec, 1 << 18)
    n = merge.n
    stride = n // blockwise.THRESHOLD_SAMPLE
    assert stride == 9
    mags = (fts[0].float() - base.float()).abs().reshape(-1).sort().values
    # (not the extremes: the largest |δ| is rarely among the sampled)
    for position in (n // 1000, n // 100, n // 3, n // 2, n - n // 10, n - n // 100):
        first, count = merge._likely_buckets(0, position)
        assert 1 <= count <= blockwise.THRESHOLD_WINDOW
        bucket = int(mags[position:position + 1].numpy().view(np.uint32)[0] >> 16)
        assert first <= bucket < first + count, (position, first, count, bucket)
    fts[1].reshape(-1)[::stride] = 1000.0  # every sampled |δ_1| is ~1000
    merge = blockwise._Merge(NAME, base, fts, spec, 1 << 18)
    passes = []
    monkeypatch.setattr(blockwise.kernels, "bucket_histogram",
                        _counting(blockwise.kernels.bucket_histogram, passes))
    positions = {0: n // 2, 1: n // 2}
    found = merge._kths_by_histograms(positions)
    assert found == {k: merge._kth_by_sorting(k, at) for k, at in positions.items()}
    # one second pass, for model 1's bucket only (model 0's was predicted)
    assert set(passes) == {int(np.float32(found[1][0]).view(np.uint32)) >> 16}
