import pytest
import torch
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.spec import assemble, local_size, part_sizes, take_shard


def test_specs_are_values():
    assert st.ShardSpec(1, 2) == st.ShardSpec(1, 2, 1)
    assert hash(st.ShardSpec(1, 2, 3)) == hash(st.ShardSpec(1, 2, 3))
    assert st.ShardSpec(1, 2) != st.ShardSpec(1, 2, 3)
    assert st.ReplicaSpec() == st.ReplicaSpec() and st.PartialSpec() == st.PartialSpec()
    assert st.ReplicaSpec() != st.PartialSpec()
    assert repr(st.ShardSpec(-1, 2)) == "ShardSpec(dim=-1, degree=2)"
    assert repr(st.ShardSpec(0, 4, stride=3)) == "ShardSpec(dim=0, degree=4, stride=3)"
    with pytest.raises(Exception):
        st.ShardSpec(0, 2).dim = 1
    assert st.ComputeSpec(st.ComputePattern.TP1D) == st.ComputeSpec(st.ComputePattern.TP1D, False)
    assert len({st.ShardSpec(0, 2), st.ShardSpec(0, 2), st.ReplicaSpec()}) == 2


@pytest.mark.parametrize("bad", [dict(degree=0), dict(degree=-1), dict(stride=0)])
def test_spec_validation(bad):
    kw = dict(dim=0, degree=2, stride=1, **{}) | bad
    with pytest.raises(ValueError, match="degree|stride"):
        st.ShardSpec(**kw)


def test_dim_out_of_range_names_dim_and_shape():
    with pytest.raises(ValueError, match=r"dim 2 .*\(4, 6\)"):
        st.ShardSpec(2, 2).normalize((4, 6))
    with pytest.raises(ValueError, match="stride 3"):
        st.ShardSpec(1, 2, stride=3).normalize((4, 7))
    assert st.ShardSpec(-1, 2).normalize((4, 6)) == st.ShardSpec(1, 2)


@given(n=hs.integers(0, 40), degree=hs.integers(1, 5))
def test_part_sizes_match_tensor_split(n, degree):
    expect = [len(c) for c in torch.tensor_split(torch.arange(n), degree)]
    assert list(part_sizes(n, degree)) == expect


@given(block=hs.integers(0, 9), stride=hs.integers(1, 3), degree=hs.integers(1, 4),
       other=hs.integers(1, 3), dim=hs.integers(0, 1))
def test_take_shard_assemble_roundtrip(block, stride, degree, other, dim):
    shape = [other, other]
    shape[dim] = block * stride
    full = torch.randn(shape)
    spec = st.ShardSpec(dim, degree, stride)
    pieces = [take_shard(full, spec, r) for r in range(degree)]
    for r, p in enumerate(pieces):
        assert p.shape[dim] == local_size(block * stride, degree, stride, r)
    assert torch.equal(assemble(pieces, spec), full)
    # rank r holds part r of every block: check against an explicit construction
    blocks = torch.tensor_split(full, stride, dim=dim) if block else []
    for r, p in enumerate(pieces):
        if block:
            want = torch.cat([torch.tensor_split(b, degree, dim=dim)[r] for b in blocks], dim=dim)
            assert torch.equal(p, want)
