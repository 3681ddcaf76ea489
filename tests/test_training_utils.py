"""The training loop's torch utilities on tensor-parallel models vs the serial model:
parameters_to_vector / vector_to_parameters at worlds 1/2/4; GradScaler (an overflow on one
data-parallel replica), clip_grad_norm_ and gradient accumulation at tp 2 x dp 2."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS
from test_optim import _full, _model as _mlp   # the mixed-layout MLP, shared

F64 = torch.float64


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


# --- GradScaler, clipping and accumulation across tensor x data parallel -------------------------

def _scaled_tp_dp(rank, optname, clip, accum, where):
    """Serial on the global batch of 8 beside tp 2 x dp 2 (a half each) under GradScaler; at
    step 2 either one input row of the second half is huge, so the backward overflows on one
    replica only ("input"), or the synchronised gradient holds an inf in one tensor-parallel
    rank's shard only ("shard"): every rank must skip that step and back off the scale, as
    serial does."""
    pg = st.ProcessGroup(tp_degree=2, dp_degree=2)
    me = pg.dp_local_rank()
    out = {}
    for tag in ("serial", "parallel"):
        m = _mlp(None if tag == "serial" else pg).float()
        sync = st.data_parallel(m, pg) if tag == "parallel" else None
        opt = (torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1) if optname == "AdamW"
               else torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=1)
        scales = []
        for step in range(4):
            opt.zero_grad()
            for micro in range(accum):
                x = _x(10 * step + micro, 8).float()
                if step == 2 and micro == 0 and where == "input":
                    x[6] *= 1e30
                if tag == "parallel":
                    x = x.chunk(2)[me]
                y = m(x)
                loss = (y.full() if isinstance(y, st.ShardedTensor) else y).pow(2).mean() / accum
                last = micro == accum - 1
                with (sync.no_sync() if sync is not None and not last else nullcontext()):
                    scaler.scale(loss).backward()
            if step == 2 and where == "shard":   # row 6 of m[0].weight: the last tp rank's
                g = m[0].weight.grad
                if tag == "serial":
                    g[6, 1] = float("inf")
                elif pg.tp_local_rank() == 1:
                    g.to_local()[-1, 1] = float("inf")
            scaler.unscale_(opt)
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        out[tag] = ([_full(p) for p in m.parameters()], scales)
        if sync is not None:
            sync.remove()
    return out


@pytest.mark.parametrize("where", ("input", "shard"))
@pytest.mark.parametrize("accum", (1, 2))
@pytest.mark.parametrize("clip", (False, True))
@pytest.mark.parametrize("optname", ("AdamW", "SGD"))
def test_grad_scaler_skips_alike_on_every_rank_under_tp_and_dp(optname, clip, accum, where):
    for out in run(4, _scaled_tp_dp, optname, clip, accum, where):
        (sp, sscales), (pp, pscales) = out["serial"], out["parallel"]
        assert pscales == sscales and sscales[2] < sscales[1]   # step 2 skipped, scale backed off
        for a, b in zip(pp, sp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
