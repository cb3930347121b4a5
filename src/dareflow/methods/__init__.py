"""Pure merge math for dareflow: masks, sparsification, fusion, the methods table.

Pure torch + numpy (+ numba-compiled CPU kernels); never imports prefect, fsspec,
yaml, lm_eval or pydantic.
"""

from dareflow.methods.fuse import (
    DisjointMerge,
    SignElection,
    disjoint_merge,
    elect_sign,
    linear,
    task_arithmetic,
    ties_consensus,
)
from dareflow.methods.masks import derive_key, keep_mask
from dareflow.methods.sparsify import (
    L1_EPS,
    Rescale,
    SparsifyMethod,
    dare,
    magnitude_keep_count,
    magnitude_prune,
    sparsify,
)
from dareflow.methods.table import (
    MERGELM_TIES_TRIM,
    METHODS,
    MergeSpec,
    MethodRow,
    ModelParams,
    get_method,
    merge_tensor,
)

__all__ = [
    "L1_EPS",
    "MERGELM_TIES_TRIM",
    "METHODS",
    "DisjointMerge",
    "MergeSpec",
    "MethodRow",
    "ModelParams",
    "Rescale",
    "SignElection",
    "SparsifyMethod",
    "dare",
    "derive_key",
    "disjoint_merge",
    "elect_sign",
    "get_method",
    "keep_mask",
    "linear",
    "magnitude_keep_count",
    "magnitude_prune",
    "merge_tensor",
    "sparsify",
    "task_arithmetic",
    "ties_consensus",
]
