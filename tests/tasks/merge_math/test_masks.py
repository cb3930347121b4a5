"""Tests for tasks.merge_math.masks: key derivation and deterministic DARE masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.merge_math.masks import CHUNK_ELEMENTS, derive_key, drop_threshold, keep_mask

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
        "0010111011000110011110101101100001100000001110001101010111111011"
    )
    key = derive_key(42, "org/Model-B", "lm_head.weight")
    assert _bitstring(keep_mask((8, 8), 0.9, key)) == (
        "0000000001000000100000000100000000000000000000000000000001001000"
    )


def test_keep_mask_matches_its_written_definition():
    # Chunk 0: Philox(key, counter=0) raw uint64 draws, low then high 32 bits,
    # kept iff >= round(p * 2**32).
    key = derive_key(3, "m", NAME)
    n, p = 1001, 0.3
    raw = np.random.Philox(key=key, counter=0).random_raw((n + 1) // 2)
    words = np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).ravel()[:n]
    expected = words >= round(p * 2**32)
    assert torch.equal(keep_mask((n,), p, key), torch.from_numpy(expected))


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


def test_keep_mask_chunks_are_independent_streams():
    # The first chunk of a larger tensor is the mask of a one-chunk tensor: each
    # chunk depends only on (key, chunk index), so chunks can be filled in parallel.
    key = derive_key(0, "a", NAME)
    big = keep_mask((CHUNK_ELEMENTS + 1000,), 0.5, key)
    assert torch.equal(big[:CHUNK_ELEMENTS], keep_mask((CHUNK_ELEMENTS,), 0.5, key))
    # and the second chunk is not a copy of the first
    assert not torch.equal(big[CHUNK_ELEMENTS:], big[:1000])


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
