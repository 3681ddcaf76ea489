"""Tensor x data parallel: gradients averaged over data-parallel replicas equal serial training
on the global batch; also across two torchrun 'nodes' over loopback."""
import json
import os
import subprocess
import sys

import pytest
import torch

import shardtensor as st
from shardtensor.launch import free_port
from shardtensor.testing import run
from test_optim import _model as _mlp   # the mixed-layout MLP, shared

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "tp_dp_train.py")


def _tp_dp(rank):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from tp_dp_train import main
    return main()


def _check(out):
    # losses to float32 rounding; weights after 5 AdamW steps (lr 1e-2) to the 1e-3 the
    # training criterion allows: Adam divides by sqrt(v), so tiny gradients' rounding shows
    for a, b in zip(out["parallel"], out["serial"]):
        assert abs(a - b) <= 1e-5 * abs(b), out
    assert out["worst"] < 1e-3, out


def test_tp2_dp2_trains_like_serial_on_the_global_batch():
    _check(run(4, _tp_dp)[0])


def _no_sync_and_counts(rank):
    pg = st.ProcessGroup(tp_degree=2, dp_degree=2)
    lin = torch.nn.Linear(4, 6)
    torch.manual_seed(pg.rank())       # replicas start different: broadcast must fix that
    with torch.no_grad():
        lin.weight.normal_()
    st.parallelize(lin, pg, plan={"weight": "row", "bias": "row"})
    sync = st.data_parallel(lin, pg)
    x = torch.full((3, 4), float(pg.dp_local_rank() + 1))
    with sync.no_sync():
        lin(x).full().sum().backward()
    local_only = lin.weight.grad.to_local().clone()
    with st.CommTrace() as trace:
        lin(x).full().sum().backward()
    dp_reduces = trace.count("all_reduce", op="data_parallel")
    w = lin.weight.full()
    return local_only, lin.weight.grad.to_local(), dp_reduces, w


def test_no_sync_accumulates_locally_then_averages():
    outs = run(4, _no_sync_and_counts)
    # replicas were made identical at setup
    assert all(torch.equal(outs[0][3], o[3]) for o in outs)
    # tp rank 0 of dp replica 0 (rank 0) and of replica 1 (rank 2)
    l0, g0, n, _ = outs[0]
    l2, g2, _, _ = outs[2]
    assert not torch.equal(l0, l2)                       # no_sync: no communication
    assert torch.allclose(g0, g2) and torch.allclose(g0, (2 * l0 + 2 * l2) / 2)
    assert n == 1                                        # one bucket, one all-reduce


def test_two_torchrun_nodes_over_loopback():
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                        "--nproc-per-node=2", f"--node-rank={node}", "--master-addr=127.0.0.1",
                        f"--master-port={port}", SCRIPT]
    procs = [subprocess.Popen(cmd(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for n in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    line = [l for l in outs[0][0].splitlines() if l.startswith("RESULT ")][0]
    out = json.loads(line[len("RESULT "):])
    assert out["world"] == 4
    _check(out)


def _half_loss(m, x, head):
    h = m[2](m[1](m[0](x)))
    h = h.full() if isinstance(h, st.ShardedTensor) else h
    return (m[3](h) if head else h).pow(2).mean()


def _unused_params(rank, optname, mode):
    """Serial on the global batch of 8 (loss: the mean of its two halves' losses) beside tp 2 x
    dp 2 (each replica one half); the last layer is left out of some steps: by both halves
    ("skip"), by the second half only ("half"), or frozen from step 2 ("freeze")."""
    pg = st.ProcessGroup(tp_degree=2, dp_degree=2)
    me = pg.dp_local_rank()
    out = {}
    for tag in ("serial", "parallel"):
        m = _mlp(None if tag == "serial" else pg)
        sync = st.data_parallel(m, pg) if tag == "parallel" else None
        opt = (torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1) if optname == "AdamW"
               else torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=0.1))
        nones = []
        for step in range(4):
            opt.zero_grad()
            if mode == "freeze" and step == 2:
                m[3].weight.requires_grad_(False)
            halves = torch.randn(8, 6, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(step)).chunk(2)
            heads = [not (mode == "skip" and step in (1, 2)),
                     not (mode in ("skip", "half") and step in (1, 2))]
            if tag == "serial":
                (sum(_half_loss(m, x, hd) for x, hd in zip(halves, heads)) / 2).backward()
            else:
                _half_loss(m, halves[me], heads[me]).backward()
            nones.append([p.grad is None for p in m.parameters()])
            opt.step()
        out[tag] = ([(p.full() if isinstance(p, st.ShardedTensor) else p).detach()
                     for p in m.parameters()], nones)
        if sync is not None:
            sync.remove()
    return out


@pytest.mark.parametrize("mode", ("skip", "half", "freeze"))
@pytest.mark.parametrize("optname", ("AdamW", "SGD"))
def test_a_parameter_no_replica_used_keeps_no_gradient(optname, mode):
    """A parameter without a gradient on every replica (left out of a step, or frozen) was given
    a zero gradient: AdamW's weight decay and SGD's momentum then moved it where serial (and
    DDP) skip it (3e-2 off after 4 steps). Used by one replica only, it gets the average."""
    for out in run(4, _unused_params, optname, mode):
        (sp, snone), (pp, pnone) = out["serial"], out["parallel"]
        assert pnone == snone
        for a, b in zip(pp, sp):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _sparse_dp(rank, tp, layout, optname):
    """nn.Embedding(sparse=True) + Linear, serial on the global batch of 4 beside tp x dp (each
    replica 2 rows); at step 1 the second replica's ids are all padding (its sparse gradient
    lists no row), at step 2 the second replica does not use the table (no gradient), at step 3
    no replica does. Returns per step the table rows the table's gradient lists (global
    numbers; None: no gradient) and the parameters after the step."""
    from shardtensor.spec import take_shard
    world = torch.distributed.get_world_size()
    pg = st.ProcessGroup(tp_degree=tp, dp_degree=world // tp)
    dp, me = pg.dp_world_size(), pg.dp_local_rank()
    out = {}
    for tag in ("serial", "parallel"):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Embedding(11, 6, padding_idx=3, sparse=True),
                                torch.nn.Linear(6, 3)).double()
        w = m[0].weight
        rows_of = torch.arange(11)
        if tag == "parallel":
            plan = {"1.weight": "col"}
            if layout != "plain":
                plan["0.weight"] = layout
            st.parallelize(m, pg, plan=plan)
            if isinstance(w, st.ShardedTensor) and w.spec.is_shard and w.spec.dim == 0:
                rows_of = take_shard(rows_of, w.spec, pg.tp_local_rank())
            sync = st.data_parallel(m, pg)
        if optname == "SparseAdam":
            opts = [torch.optim.SparseAdam([w], lr=0.05), torch.optim.AdamW(m[1].parameters(), lr=0.05)]
        else:
            opts = [torch.optim.Adagrad(m.parameters(), lr=0.1)]
        listed, params = [], []
        for step in range(4):
            ids = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(step))
            if step == 1:
                ids[2:] = 3
            for o in opts:
                o.zero_grad()
            halves = ids.chunk(dp) if tag == "parallel" else ids.chunk(2)
            mine = [(me, halves[me])] if tag == "parallel" else list(enumerate(halves))
            loss = 0
            for half, x in mine:
                skip = (step == 2 and half == 1) or step == 3
                y = m[1](x.double().unsqueeze(-1).expand(-1, -1, 6)) if skip else m(x)
                loss = loss + (y.full() if isinstance(y, st.ShardedTensor) else y).pow(2).mean() / len(mine)
            loss.backward()
            g = (w.to_local() if isinstance(w, st.ShardedTensor) else w).grad
            assert g is None or g.is_sparse
            listed.append(None if g is None else sorted(rows_of[g.coalesce().indices()[0]].tolist()))
            for o in opts:
                o.step()
            params.append([(p.full() if isinstance(p, st.ShardedTensor) else p).detach().clone()
                           for p in m.parameters()])
        out[tag] = listed, params
    sync.remove()
    return out


@pytest.mark.parametrize("world,tp,layout", [(2, 1, "plain"), (4, 2, "row"), (4, 2, "col"),
                                             (4, 2, "replicate")])
@pytest.mark.parametrize("optname", ("SparseAdam", "Adagrad"))
def test_sparse_embedding_gradients_average_over_replicas(world, tp, layout, optname):
    """data_parallel with nn.Embedding(sparse=True) raised 'reshape is not implemented for
    sparse tensors' in the backward. The averaged gradient is sparse and lists the rows any
    replica used (serial's rows on the global batch); SparseAdam / Adagrad then match serial."""
    outs = run(world, _sparse_dp, tp, layout, optname)
    for out in outs:
        (slisted, sparams), (plisted, pparams) = out["serial"], out["parallel"]
        assert [r is None for r in plisted] == [r is None for r in slisted] == [0, 0, 0, 1]
        for rows, srows in zip(plisted[:3], slisted):
            assert set(rows) <= set(srows)
        for ps, ss in zip(pparams, sparams):
            for a, b in zip(ps, ss):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for step in range(3):   # the tensor-parallel ranks of a replica list serial's rows together
        union = sorted(set().union(*(set(o["parallel"][0][step]) for o in outs[:tp])))
        assert union == outs[0]["serial"][0][step]
