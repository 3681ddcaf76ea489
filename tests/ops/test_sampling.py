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
