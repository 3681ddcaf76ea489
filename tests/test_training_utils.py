"""The training loop's torch utilities on tensor-parallel models vs the serial model at worlds
1/2/4: parameters_to_vector / vector_to_parameters, ..."""
import pytest
import torch
import torch.nn as nn

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS

F64 = torch.float64


def _mlp(pg=None):
    """Row- and column-split layers (uneven shards at worlds 2 and 4), a replicated bias and a
    plain (serial) layer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Linear(7, 5), nn.Linear(5, 3)).double()
    if pg is not None:
        st.split_row(m[0].weight, pg)
        st.split_row(m[0].bias, pg)
        st.split_col(m[2].weight, pg)
        st.replicate(m[2].bias, pg)
    return m


def _full(t):
    return (t.full() if isinstance(t, st.ShardedTensor) else t).detach().clone()


def _x(step=0, n=4):
    return torch.randn(n, 6, dtype=F64, generator=torch.Generator().manual_seed(10 + step))


def _loss(m, step=0):
    out = m(_x(step))
    return (out.full() if isinstance(out, st.ShardedTensor) else out).pow(2).sum()


# --- parameters_to_vector / vector_to_parameters ------------------------------------------------

def _vectors(rank, serial):
    pg = None if serial else st.ProcessGroup()
    m = _mlp(pg)
    vec = nn.utils.parameters_to_vector(m.parameters())
    out = [_full(vec)]
    nn.utils.vector_to_parameters(vec * 2 + 1, m.parameters())      # back into the model
    out += [_full(p) for p in m.parameters()]
    plain = torch.linspace(-1, 1, vec.numel(), dtype=F64)            # a plain (serial) vector
    nn.utils.vector_to_parameters(plain, m.parameters())
    out += [_full(p) for p in m.parameters()]
    serial_copy = _mlp()                                             # into a plain model
    nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(m.parameters()) - 1,
                                  serial_copy.parameters())
    out += [p.detach().clone() for p in serial_copy.parameters()]
    loss = _loss(m)                                                  # the model still trains
    loss.backward()
    out += [loss.detach(), *[_full(p.grad) for p in m.parameters()]]
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_parameters_to_vector_and_back_match_serial(world):
    """vector_to_parameters with the ShardedTensor vector of a model with a plain layer gave the
    plain parameters the wrapper's storage (torch's `.data` setter asks no rule when the tensor
    set is plain): a segmentation fault at their next read, at every world size."""
    ref = _vectors(0, True)
    for out in run(world, _vectors, False):
        assert len(out) == len(ref)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
