"""Hypothesis strategies shared by the tests: shapes, layouts, world sizes."""
import torch
from hypothesis import strategies as hs

import shardtensor as st

WORLDS = (1, 2, 4)
# F.scaled_dot_product_attention takes enable_gqa (fewer kv heads than query heads) from torch 2.5;
# on older torch grouped-query attention is not a call one can make, so no test draws it there
SDPA_GQA = torch.__version__ >= (2, 5)


def shapes(min_dims=1, max_dims=4, min_side=1, max_side=9):
    return hs.lists(hs.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@hs.composite
def shard_specs(draw, shape, degree, allow_stride=True):
    """A ShardSpec valid for `shape` (any dim, uneven allowed, stride dividing the dim)."""
    dim = draw(hs.integers(-len(shape), len(shape) - 1))
    n = shape[dim]
    strides = [s for s in (1, 2, 3) if n % s == 0] if allow_stride else [1]
    stride = draw(hs.sampled_from(strides))
    return st.ShardSpec(dim, degree, stride)


@hs.composite
def specs(draw, shape, degree, partial=True):
    kinds = ["shard", "shard", "replica"] + (["partial"] if partial else [])
    kind = draw(hs.sampled_from(kinds))
    if kind == "shard":
        return draw(shard_specs(shape, degree))
    return st.ReplicaSpec() if kind == "replica" else st.PartialSpec()
