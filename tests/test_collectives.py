"""Collectives on dtypes the backends cannot move (gloo: int16, uint16/32/64, float8; nccl:
int16): gathers (.full(), a sharded dim made replicated) and all-to-alls (a shard moved to
another dim) carry their bytes and give serial's values, uneven shards and strides included."""
import pytest
import torch
from hypothesis import given, settings, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import shapes, shard_specs

DTYPES = [d for d in (torch.int16, getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                      getattr(torch, "uint64", None), getattr(torch, "float8_e4m3fn", None),
                      torch.int32, torch.float64) if d is not None]


def _values(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _bytes(t):
    return t.clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _moves(rank, cases):
    """Per case: what differs from serial on this rank (empty when nothing does)."""
    pg = st.ProcessGroup()
    out = []
    for shape, spec, dtype, seed in cases:
        full = _values(shape, dtype, seed)
        x = st.ShardedTensor.from_global(full, pg, spec)
        other = (spec.dim + 1) % len(shape)
        bad = []
        gathered = x.full()                                        # all-gather
        moved = x.redistribute(st.ShardSpec(other, spec.degree))   # all-to-all
        part = torch.tensor_split(full, spec.degree, other)[rank]
        for what, got, want in (("full()", gathered, full), ("moved.full()", moved.full(), full),
                                ("moved shard", moved.to_local(), part),
                                ("short().full()", x.short().full(), full.short())):
            if got.dtype != want.dtype or not torch.equal(_bytes(got), _bytes(want)):
                bad.append(what)
        out.append(bad)
    return out


@pytest.mark.parametrize("world", (2, 4))
@settings(max_examples=5)
@given(data=hs.data())
def test_gathers_and_all_to_all_move_every_dtype(world, data):
    cases = []
    for _ in range(8):
        shape = data.draw(shapes(min_dims=2, max_dims=3, max_side=7))
        spec = data.draw(shard_specs(shape, world))
        dtype = data.draw(hs.sampled_from(DTYPES))
        cases.append((shape, spec.normalize(shape), dtype, data.draw(hs.integers(0, 2 ** 16))))
    for rank, per_rank in enumerate(run(world, _moves, cases)):
        for case, bad in zip(cases, per_rank):
            assert not bad, f"rank {rank}, {case}: {bad} differ from serial"


def _one_dim(rank, world):
    """1-D tensors of those dtypes gathered (uneven and strided pieces): serial's bytes."""
    pg = st.ProcessGroup()
    bad = []
    for dtype in DTYPES:
        for n in (1, 5, 7, 12):
            for stride in (1, 2, 3):
                if n % stride:
                    continue
                full = _values((n,), dtype, n)
                x = st.ShardedTensor.from_global(full, pg, st.ShardSpec(0, world, stride))
                got = x.full()
                if got.dtype != dtype or not torch.equal(_bytes(got), _bytes(full)):
                    bad.append((str(dtype), n, stride))
    return bad


@pytest.mark.parametrize("world", (2, 4))
def test_one_dim_gathers_move_every_dtype(world):
    # the bytes widened the gathered dim of a 1-D piece: gloo refused the sizes ('invalid
    # tensor size', e.g. torch.arange(7).short() sharded on dim 0 at tp 2, then .full())
    for rank, bad in enumerate(run(world, _one_dim, world)):
        assert not bad, (rank, bad)


def _float8_moves(rank, world):
    """float8 shards moved off a dim > 0 (all-to-all; its pieces are joined along that dim):
    (case, what differs from serial's bytes) per case that does."""
    pg = st.ProcessGroup()
    bad = []
    for shape, src, dst, stride in (((3, 5), 1, 0, 1), ((2, 3, 6), 2, 0, 1), ((2, 4, 3), 1, 2, 2),
                                    ((4, 7), 1, 0, 1), ((6, 2, 5), 2, 1, 1)):
        full = _values(shape, torch.float8_e4m3fn, sum(shape))
        x = st.ShardedTensor.from_global(full, pg, st.ShardSpec(src, world, stride))
        moved = x.redistribute(st.ShardSpec(dst, world))
        part = torch.tensor_split(full, world, dst)[rank]
        for what, got, want in (("shard", moved.to_local(), part), ("full", moved.full(), full)):
            if got.dtype != want.dtype or not torch.equal(_bytes(got), _bytes(want)):
                bad.append((shape, src, dst, stride, what))
    return bad


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
@pytest.mark.parametrize("world", (2, 4))
def test_float8_all_to_all_off_a_later_dim(world):
    # torch < 2.5's CPU cat has no float8 kernel along a dim > 0 for small contiguous inputs:
    # joining the received pieces raised '"cat_serial_kernel" not implemented for
    # 'Float8_e4m3fn'' (torch 2.4.1, a (3, 5) tensor sharded on dim 1 redistributed to dim 0)
    for rank, bad in enumerate(run(world, _float8_moves, world)):
        assert not bad, (rank, bad)
