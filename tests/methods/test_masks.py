"""Tests for dareflow.methods.masks: key derivation and deterministic DARE masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dareflow.methods.kernels import _philox
from dareflow.methods.masks import (
    MaskStream,
    derive_key,
    drop_threshold,
    keep_mask,
    philox_draws_torch,
    philox_words,
)

NAME = "model.layers.0.mlp.up_proj.weight"


def _bitstring(mask: torch.Tensor) -> str:
    return "".join("1" if kept else "0" for kept in mask.flatten().tolist())


# --- derive_key ---------------------------------------------------------------------


def test_derive_key_golden_values():
    # Pinned: a change here changes every mask, so cached merges must be invalidated.
    assert derive_key(0, "model-a", NAME) == 0x0E4AB1F4346DAE2F5C92C5204C0FD2E5
    assert derive_key(42, "org/Model-B", "lm_head.weight") == 0xA0DCA29B611A7CB18AE0615C12EDE3DA


def test_derive_key_is_128_bit_and_deterministic():
    key = derive_key(7, "m", NAME)
    assert key == derive_key(7, "m", NAME)
    assert 0 <= key < 2**128


def test_derive_key_distinguishes_every_field():
    keys = {
        derive_key(0, "a", "w"),
        derive_key(1, "a", "w"),
        derive_key(-1, "a", "w"),
        derive_key(0, "b", "w"),
        derive_key(0, "a", "v"),
    }
    assert len(keys) == 5


def test_derive_key_encoding_is_unambiguous():
    # Plain concatenation would make these collide.
    assert derive_key(0, "ab", "c") != derive_key(0, "a", "bc")
    assert derive_key(1, "2", "x") != derive_key(12, "", "x")


@pytest.mark.parametrize(
    "args",
    [(1.5, "m", "w"), (True, "m", "w"), (0, 3, "w"), (0, "m", None)],
)
def test_derive_key_rejects_wrong_types(args):
    with pytest.raises(TypeError, match="must be"):
        derive_key(*args)


# --- keep_mask: definition and determinism -------------------------------------------


def test_keep_mask_golden_values():
    key = derive_key(0, "model-a", NAME)
    assert _bitstring(keep_mask((64,), 0.5, key)) == (
        "0100001110110111111011100010001100100011111100101010011000111111"
    )
    key = derive_key(42, "org/Model-B", "lm_head.weight")
    assert _bitstring(keep_mask((8, 8), 0.9, key)) == (
        "0000000000000000000100001001000010000001000000000000101000000000"
    )


def _philox_by_the_book(counter, key):
    """Philox-4x32-10 as Random123 defines it, in plain Python ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF,
                          (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _draws_by_the_book(key, start, stop):
    k0, k1, n0, n1 = [(key >> s) & 0xFFFFFFFF for s in (0, 32, 64, 96)]
    return [_philox_by_the_book((i // 4 & 0xFFFFFFFF, i // 4 >> 32, n0, n1), (k0, k1))[i % 4]
            for i in range(start, stop)]


# Random123's known-answer vectors for philox4x32_10: (counter, key, output)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert _philox_by_the_book(counter, key) == expected
    c0, c1, c2, c3 = counter
    compiled = _philox(np.uint64(c0 | c1 << 32), *(np.uint64(v) for v in (*key, c2, c3)))
    assert tuple(int(w) for w in compiled) == expected


def test_keep_mask_matches_its_written_definition():
    # element i: word i % 4 of Philox-4x32-10 at counter (i // 4, n0, n1) under the
    # key's low 64 bits, (n0, n1) its high 64 bits; kept iff >= round(p * 2**32)
    key = derive_key(3, "m", NAME)
    n, p = 1001, 0.3
    expected = np.array(_draws_by_the_book(key, 0, n)) >= round(p * 2**32)
    assert torch.equal(keep_mask((n,), p, key), torch.from_numpy(expected))
    assert philox_words(key) == tuple((key >> s) & 0xFFFFFFFF for s in (0, 32, 64, 96))


@pytest.mark.parametrize(("start", "stop"), [(0, 0), (0, 1), (1, 4), (2, 11), (3, 1030),
                                               (2**34 - 6, 2**34 + 7), (2**40 + 1, 2**40 + 2)])
def test_draws_of_any_range_follow_the_definition(start, stop):
    # any start (no alignment), and element indices past 2**34 (counter word 1 in use)
    key = derive_key(5, "m", NAME)
    stream = MaskStream(key, 0.5)
    expected = _draws_by_the_book(key, start, stop)
    assert stream.draws(start, stop).tolist() == expected
    assert philox_draws_torch(key, start, stop, torch.device("cpu")).tolist() == expected


def test_torch_draws_equal_the_compiled_kernel_on_a_large_range():
    key = derive_key(9, "model-a", NAME)
    stream = MaskStream(key, 0.3)
    start, stop = 12_345, 12_345 + 300_001
    torch_draws = philox_draws_torch(key, start, stop, torch.device("cpu"))
    assert torch.equal(torch_draws, torch.from_numpy(stream.draws(start, stop).astype(np.int64)))
    keep = stream.keep_on(torch.device("cpu"), start, stop)
    assert keep.dtype == torch.float32
    assert torch.equal(keep.bool(), torch.from_numpy(stream.block(start, stop)))


def test_keep_mask_shape_and_dtype():
    mask = keep_mask((3, 4, 5), 0.5, 1)
    assert mask.shape == (3, 4, 5)
    assert mask.dtype == torch.bool
    assert keep_mask((), 0.5, 1).shape == ()
    assert keep_mask((0, 7), 0.5, 1).shape == (0, 7)


def test_keep_mask_extremes():
    assert bool(keep_mask((1000,), 0.0, 5).all())
    assert not bool(keep_mask((1000,), 1.0, 5).any())


def test_keep_mask_same_key_is_identical_and_keys_differ():
    a = keep_mask((256, 256), 0.7, derive_key(0, "a", NAME))
    assert torch.equal(a, keep_mask((256, 256), 0.7, derive_key(0, "a", NAME)))
    assert not torch.equal(a, keep_mask((256, 256), 0.7, derive_key(0, "b", NAME)))
    assert not torch.equal(a, keep_mask((256, 256), 0.7, derive_key(0, "a", NAME + "x")))
    assert not torch.equal(a, keep_mask((256, 256), 0.7, derive_key(1, "a", NAME)))


def test_keep_mask_ignores_torch_threads_and_global_rng(restore_threads):
    key = derive_key(0, "a", NAME)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    one = keep_mask((512, 300), 0.9, key)
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    torch.rand(1000)  # consume the global RNG: must not matter
    two = keep_mask((512, 300), 0.9, key)
    assert torch.equal(one, two)


def test_keep_mask_depends_on_element_order_not_shape():
    key = derive_key(0, "a", NAME)
    assert torch.equal(keep_mask((6, 4), 0.5, key), keep_mask((24,), 0.5, key).reshape(6, 4))


def test_keep_mask_of_a_large_tensor_is_filled_piecewise_without_seams():
    # keep_mask fills 2**20 draws at a time: the pieces meet exactly
    key = derive_key(0, "a", NAME)
    n = (1 << 20) * 2 + 1000
    big = keep_mask((n,), 0.5, key).numpy()
    stream = MaskStream(key, 0.5)
    for start in (0, (1 << 20) - 3, (2 << 20) - 1):
        assert np.array_equal(big[start:start + 10], stream.block(start, start + 10))
    assert not np.array_equal(big[1 << 20:(1 << 20) + 1000], big[:1000])


# --- keep_mask: statistics ------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99, 0.999])
def test_kept_fraction_within_5_sigma(p):
    n = 1_000_000
    kept = int(keep_mask((n,), p, derive_key(11, "stat", f"p={p}")).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma


def test_threshold_resolution_is_not_bf16():
    # bf16 would give 0.98828125 for 0.99 (and rand_like(bf16) has 256 levels).
    assert abs(drop_threshold(0.99) / 2**32 - 0.99) < 1e-9
    assert drop_threshold(0.0) == 0
    assert drop_threshold(1.0) == 2**32


# --- keep_mask: errors ----------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_keep_mask_rejects_drop_rate_out_of_range(p):
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\].*density = 1 - p"):
        keep_mask((4,), p, 1)


@pytest.mark.parametrize("key", [-1, 2**128, 1.0])
def test_keep_mask_rejects_bad_keys(key):
    with pytest.raises(ValueError, match="key must be an int"):
        keep_mask((4,), 0.5, key)
