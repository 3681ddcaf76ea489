"""Picking along a dim (ops/inference.py's gather rule): torch.gather, take_along_dim and
index_select of a tensor sharded on the picked dim (a partial result) or on another dim, against
serial torch at worlds 1, 2, 4: values and the input's gradient."""
import pytest
import torch

import shardtensor as st
from shardtensor.ops import inference
from shardtensor.testing import run
from strategies import WORLDS

# name -> f(x, index along dim 1); x is (3, 7): 7 is uneven over 2 and 4
CASES = {
    "gather": lambda x, i: torch.gather(x, 1, i),
    "take_along_dim": lambda x, i: torch.take_along_dim(x, i, 1),
    # take_along_dim counts -7..-1 from the end (gather and index_select refuse them)
    "take_along_dim_negative": lambda x, i: torch.take_along_dim(x, i - 7, 1),
    "take_along_dim_broadcast": lambda x, i: x.take_along_dim(i[:1] - 5, dim=1),
    "index_select": lambda x, i: torch.index_select(x, 1, i[0]),
}
if not inference._NEGATIVE_TAKE:   # torch 2.4's take_along_dim refuses negative indices
    del CASES["take_along_dim_negative"], CASES["take_along_dim_broadcast"]


def _picks(rank, names):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    i = torch.randint(0, 7, (3, 5))
    wrong = []
    for name in names:
        for d in (0, 1):   # sharded off or on the picked dim
            want = CASES[name](x, i)
            w = torch.randn(want.shape, dtype=want.dtype)
            (gw,) = torch.autograd.grad((want * w).sum(), x)
            t = st.ShardedTensor.from_global(x, pg, st.ShardSpec(d, n))
            got = CASES[name](t, i).full()
            (gg,) = torch.autograd.grad((got * w).sum(), x)
            if not torch.allclose(got, want, rtol=0, atol=1e-12) or \
                    not torch.allclose(gg, gw, rtol=0, atol=1e-12):
                wrong.append((name, d, (got - want).abs().max().item()))
    return wrong


@pytest.mark.parametrize("world", WORLDS)
def test_picking_along_a_dim_matches_serial(world):
    for wrong in run(world, _picks, list(CASES)):
        assert wrong == []
