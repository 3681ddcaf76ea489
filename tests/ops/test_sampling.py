"""Sampling after a gather (ops/inference.py, collectives.py): torch.multinomial draws its
exponentials in the memory order of its input, so a sharded model draws serial's tokens only if
what it samples from is laid out in memory like serial's tensor. A gathered tensor (`.full()`,
top-p's sort over the vocab-sharded dim) is laid out like its shards."""
import pytest
import torch

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS


def sample_top_p(probs, p):
    """Meta's llama generation.py."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def _draws(rank, world):
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(0)
    out = {}
    for vocab in (13, 61):
        probs = torch.softmax(torch.randn(3, vocab, generator=g) * 3, -1)
        sp = st.ShardedTensor.from_global(probs, pg, st.ShardSpec(1, world))
        for p in (0.5, 0.9, 1.0):
            for seed in range(4):
                torch.manual_seed(seed)
                ref = sample_top_p(probs, p)
                torch.manual_seed(seed)
                got = sample_top_p(sp, p)
                out[(vocab, p, seed)] = (got.full() if isinstance(got, st.ShardedTensor)
                                         else got).tolist() == ref.tolist()
    # sampling straight from vocab-sharded probabilities laid out column-major (elementwise ops
    # on a transposed tensor keep its memory order, serially too): the draws follow that order
    for seed in range(4):
        e = (torch.randn(61, 3, generator=g).t() * 2).exp()
        probs = e / e.sum(-1, keepdim=True)
        sp = st.ShardedTensor.from_global(probs, pg, st.ShardSpec(1, world))
        sp = sp * 1.0   # (an op on the shard: its memory order is the shard's own)
        torch.manual_seed(seed)
        ref = torch.multinomial(probs, 1)
        torch.manual_seed(seed)
        out[("column-major", seed)] = torch.multinomial(sp, 1).full().tolist() == ref.tolist()
    # .full() keeps the shards' memory order: a contiguous tensor and a transposed one
    x = torch.randn(5, 7, generator=g)
    xt = torch.randn(7, 5, generator=g).t()
    layouts = []
    for t in (x, xt):
        for spec in (st.ShardSpec(0, world), st.ShardSpec(1, world)):
            full = st.ShardedTensor.from_global(t, pg, spec).full()
            torch.manual_seed(9)
            a = torch.multinomial(full.abs(), 2).tolist()
            torch.manual_seed(9)
            b = torch.multinomial(t.abs(), 2).tolist()
            layouts.append((full.stride() == t.stride(), torch.equal(full, t), a == b))
    return out, layouts


@pytest.mark.parametrize("world", WORLDS)
def test_top_p_after_the_vocab_gather_draws_serials_tokens(world):
    # torch.sort over the sharded vocab gathered the row into a column-major tensor (the pieces'
    # movedim): multinomial on it drew other tokens than serial's for the same seed
    draws, layouts = run(world, _draws, world)[0]
    bad = [k for k, ok in draws.items() if not ok]
    assert not bad, bad
    assert all(all(case) for case in layouts), layouts


def _gathered_strides(rank, world):
    """Gathers along every dim of shapes with size-1 dims (uneven pieces too): the result has
    the strides of serial's contiguous tensor, and a grouped conv_transpose2d (whose CPU kernel
    refuses a contiguous input with other strides on a size-1 dim) runs on it."""
    pg = st.ProcessGroup()
    bad, g = [], torch.Generator().manual_seed(0)
    for shape in ((2, 1, 1), (1, 3, 1), (2, 1, 5), (1, 1), (3, 1, 2, 1)):
        t = torch.randn(shape, dtype=torch.float64, generator=g)
        for d in range(len(shape)):
            full = st.ShardedTensor.from_global(t, pg, st.ShardSpec(d, world)).full()
            if full.stride() != t.stride() or not torch.equal(full, t):
                bad.append((shape, d, full.stride(), t.stride()))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 1, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, 2, 2, 2, dtype=torch.float64).requires_grad_()
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, world))
    out = torch.nn.functional.conv_transpose2d(sx, w, None, 1, 0, 0, 2, 1)
    out.full().sum().backward()
    return bad, x.grad.tolist()


@pytest.mark.parametrize("world", WORLDS)
def test_gathered_tensors_have_serials_strides(world):
    # a gather along a dim next to size-1 dims returned a contiguous tensor with strides of its
    # own on the size-1 dims ((1, 2, 1) for a (2, 1, 1) tensor): conv_transpose2d's backward
    # raised 'grad_weight needs to be contiguous' at tp 4 (test_conv_transpose, a random case)
    bad, grad = run(world, _gathered_strides, world)[0]
    assert not bad, bad
    torch.manual_seed(0)
    x = torch.randn(2, 1, 1, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, 2, 2, 2, dtype=torch.float64).requires_grad_()
    torch.nn.functional.conv_transpose2d(x, w, None, 1, 0, 0, 2, 1).sum().backward()
    assert grad == x.grad.tolist()
