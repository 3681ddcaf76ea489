"""torch's elementwise optimizers step on the shards (shardtensor/optim.py): every one of them,
each kernel path (for-loop, foreach, fused), on sharded (uneven too), replicated and plain
parameters together, follows the serial trajectory, and its state is laid out like its
parameter; inside the step the groups list the shards, outside they list the parameters (torch's
step hooks see the parameters); an error in the step puts everything back; state laid out
otherwise, and optimizers that are not elementwise, step through the rules, also as serial."""
import inspect

import pytest
import torch
import torch.nn as nn

import shardtensor as st
from shardtensor.optim import _ELEMENTWISE
from shardtensor.testing import run
from strategies import WORLDS

F64 = torch.float64

# every elementwise optimizer of torch.optim, with options that touch each kind of state
OPTIMS = {
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": dict(lr=0.02, weight_decay=0.05, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
    "Adamax": dict(lr=0.02, weight_decay=0.01),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "ASGD": dict(lr=0.05, t0=1),
    "NAdam": dict(lr=0.02, decoupled_weight_decay=True, weight_decay=0.01),
    "RAdam": dict(lr=0.02, weight_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Rprop": dict(lr=0.01),
}
FUSED = ("SGD", "Adam", "AdamW", "Adagrad")


def test_every_elementwise_optimizer_is_listed():
    names = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)}
    # the rest are not elementwise: LBFGS (global dot products), Adafactor (row/column
    # factors), Muon (orthogonalised matrices); SparseAdam (sparse gradients only) is tested below
    assert set(_ELEMENTWISE) == set(OPTIMS) | {"SparseAdam"}
    assert set(_ELEMENTWISE) <= names
    assert names - set(_ELEMENTWISE) <= {"LBFGS", "Adafactor", "Muon", "Optimizer"}


def _model(pg=None):
    """Sharded parameters with uneven shards at worlds 2 and 4 (7 and 5 rows), a replicated
    bias, and a plain layer: the optimizer's lists mix all three."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Linear(7, 5), nn.Linear(5, 3)).double()
    if pg is not None:
        st.split_row(m[0].weight, pg)
        st.split_row(m[0].bias, pg)
        st.split_col(m[2].weight, pg)
        st.replicate(m[2].bias, pg)
    return m


def _set_grads(m, step, pg):
    g = torch.Generator().manual_seed(100 + step)
    for p in m.parameters():
        full = torch.randn(p.shape, generator=g, dtype=F64)
        p.grad = st.ShardedTensor.from_global(full, pg, p.spec) if isinstance(
            p, st.ShardedTensor) else full


def _full(t):
    return (t.full() if isinstance(t, st.ShardedTensor) else t).detach().clone()


def _train(rank, name, kernel, serial, steps=3):
    pg = None if serial else st.ProcessGroup()
    m = _model(pg)
    kw = dict(OPTIMS[name])
    if kernel is not None:
        kw[kernel] = True
    elif "foreach" in inspect.signature(getattr(torch.optim, name)).parameters:
        kw["foreach"] = None   # torch's default
    opt = getattr(torch.optim, name)(m.parameters(), **kw)
    events = []
    for step in range(steps):
        _set_grads(m, step, pg)
        with st.CommTrace() as trace:
            opt.step()
        events += trace.events
        opt.zero_grad()
    ps = list(m.parameters())
    states = [{k: _full(v) if isinstance(v, torch.Tensor) else v
               for k, v in sorted(opt.state[p].items())} for p in ps]
    layouts = [{k: (v.spec, tuple(v.shape)) for k, v in opt.state[p].items()
                if isinstance(v, st.ShardedTensor)} for p in ps]
    param_layouts = [(p.spec, tuple(p.shape)) if isinstance(p, st.ShardedTensor) else None
                     for p in ps]
    return ([_full(p) for p in ps], states, layouts, param_layouts, len(events),
            sorted(map(repr, opt.state.keys())) == sorted(map(repr, ps)))


def _check(out, ref):
    params, states, layouts, param_layouts, n_events, keyed_by_params = out
    rparams, rstates = ref[0], ref[1]
    for p, r in zip(params, rparams):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    assert len(states) == len(rstates)
    for s, r in zip(states, rstates):
        assert s.keys() == r.keys()
        for k in r:
            torch.testing.assert_close(s[k], r[k], rtol=1e-12, atol=1e-12)
    for lay, s, pl in zip(layouts, states, param_layouts):
        if pl is None:
            assert lay == {}                           # a plain parameter's state stays plain
            continue
        # every state tensor with the parameter's shape is laid out like the parameter
        want = {k for k, v in s.items() if isinstance(v, torch.Tensor) and tuple(v.shape) == pl[1]
                and (v.dim() or k != "step")}
        assert set(lay) == want and want, (lay, want)
        assert all(v == pl for v in lay.values())
    assert n_events == 0                               # the step is local
    assert keyed_by_params                             # no shard left as a state key


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kernel", (None, "foreach"))
@pytest.mark.parametrize("name", list(OPTIMS))
def test_elementwise_optimizer_matches_serial(world, kernel, name):
    if kernel == "foreach" and "foreach" not in inspect.signature(getattr(torch.optim, name)).parameters:
        pytest.fail(f"{name} takes no foreach")
    ref = _train(0, name, kernel, True)
    for out in run(world, _train, name, kernel, False):
        _check(out, ref)


@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("name", FUSED)
def test_fused_optimizer_matches_serial(world, name):
    ref = _train(0, name, "fused", True)
    for out in run(world, _train, name, "fused", False):
        _check(out, ref)


def _inside_and_outside(rank):
    """What a closure (run inside `step`) and torch's step hooks (outside it) see."""
    pg = st.ProcessGroup()
    m = _model(pg)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    group_list = opt.param_groups[0]["params"]
    seen = {}
    def hook(when):
        def record(o, args, kwargs):
            seen[when] = [type(p).__name__ for p in o.param_groups[0]["params"]]
        return record
    opt.register_step_pre_hook(hook("pre"))
    opt.register_step_post_hook(hook("post"))

    def closure():
        seen["inside"] = [type(p).__name__ for p in opt.param_groups[0]["params"]]
        seen["grads"] = [type(p.grad).__name__ for p in opt.param_groups[0]["params"]]
        return torch.tensor(0.0)

    _set_grads(m, 0, pg)
    opt.step(closure)
    after = [type(p).__name__ for p in opt.param_groups[0]["params"]]
    return seen, after, opt.param_groups[0]["params"] is group_list


def test_the_step_sees_shards_and_everything_else_sees_parameters():
    for seen, after, same_list in run(2, _inside_and_outside):
        sharded = ["ShardedTensor"] * 4 + ["Parameter"] * 2
        assert seen["pre"] == sharded and seen["post"] == sharded and after == sharded
        assert seen["inside"] == ["Tensor"] * 4 + ["Parameter"] * 2
        assert seen["grads"] == ["Tensor"] * 6
        assert same_list


class _Boom(Exception):
    pass


def _error_in_step(rank):
    pg = st.ProcessGroup()
    m = _model(pg)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    _set_grads(m, 0, pg)
    opt.step()
    before = [_full(p) for p in m.parameters()]
    keys = list(opt.state.keys())
    states = [dict(opt.state[p]) for p in m.parameters()]

    def closure():
        raise _Boom("in the closure")
    with pytest.raises(_Boom):
        opt.step(closure)
    ps = list(m.parameters())
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], ps))
    assert list(opt.state.keys()) == keys
    assert [dict(opt.state[p]) for p in ps] == states            # the very same state objects
    assert all(torch.equal(_full(p), b) for p, b in zip(ps, before))
    opt.step()                                                   # and it still steps
    return [_full(p) for p in ps]


def test_an_error_in_the_step_puts_parameters_and_state_back():
    torch.manual_seed(0)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for step in range(2):
        g = torch.Generator().manual_seed(100)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        opt.step()
    ref = [p.detach() for p in m.parameters()]
    for out in run(2, _error_in_step):
        for p, r in zip(out, ref):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def _other_layout_state(rank, serial):
    """A state tensor laid out unlike its parameter (a user's assignment): the step goes
    through the rules, which handle the mixed row."""
    pg = None if serial else st.ProcessGroup()
    m = _model(pg)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _set_grads(m, 0, pg)
    opt.step()
    w = m[0].weight
    buf = torch.full(w.shape, 0.5, dtype=F64)
    opt.state[w]["momentum_buffer"] = buf if serial else st.ShardedTensor.from_global(
        buf, pg, st.ReplicaSpec())
    for step in (1, 2):
        _set_grads(m, step, pg)
        opt.step()
    return [_full(p) for p in m.parameters()], _full(opt.state[w]["momentum_buffer"])


def test_state_laid_out_unlike_its_parameter_steps_through_the_rules():
    ref, rbuf = _other_layout_state(0, True)
    for out, buf in run(2, _other_layout_state, False):
        for p, r in zip(out, ref):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(buf, rbuf, rtol=1e-12, atol=1e-12)


def _closure_train(rank, name, serial):
    pg = None if serial else st.ProcessGroup()
    m = _model(pg)
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    opt = getattr(torch.optim, name)(m.parameters(), lr=0.1)
    inside = set()

    def closure():
        inside.update(type(p).__name__ for p in opt.param_groups[0]["params"])
        opt.zero_grad()
        loss = m(x).pow(2).sum()
        loss.backward()
        return loss
    for _ in range(1 if name == "LBFGS" else 3):   # LBFGS: 20 evaluations per step; near
        opt.step(closure)                         # its minimum rounding differences grow
    return [_full(p) for p in m.parameters()], inside


@pytest.mark.parametrize("name", [n for n in ("LBFGS", "Adafactor") if hasattr(torch.optim, n)])
def test_optimizers_that_are_not_elementwise_step_through_the_rules(name):
    ref, _ = _closure_train(0, name, True)
    for out, inside in run(2, _closure_train, name, False):
        for p, r in zip(out, ref):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        assert inside == {"ShardedTensor", "Parameter"}   # the step saw the parameters


def _grads_from_loss(m, step):
    """A real backward (the gradients' layouts are autograd's, not set by hand)."""
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(10 + step))
    out = m(x)
    (out.full() if isinstance(out, st.ShardedTensor) else out).pow(2).sum().backward()


def _serial_state_dict_resume(rank, name, serial):
    """2 serial steps, the serial optimizer's `state_dict()` loaded by torch's `load_state_dict`
    into an optimizer over the (sharded) model holding the serial weights, 2 more steps."""
    ms = _model()
    opt = getattr(torch.optim, name)(ms.parameters(), **OPTIMS[name])
    for step in range(2):
        opt.zero_grad()
        _grads_from_loss(ms, step)
        opt.step()
    sd = opt.state_dict()
    pg = None if serial else st.ProcessGroup()
    m = _model(pg)
    with torch.no_grad():
        for p, q in zip(m.parameters(), ms.parameters()):
            p.copy_(st.ShardedTensor.from_global(q.detach().clone(), pg, p.spec)
                    if isinstance(p, st.ShardedTensor) else q)
    opt = getattr(torch.optim, name)(m.parameters(), **OPTIMS[name])
    opt.load_state_dict(sd)
    for step in range(2, 4):
        opt.zero_grad()
        _grads_from_loss(m, step)
        opt.step()
    ps = list(m.parameters())
    states = [{k: _full(v) if isinstance(v, torch.Tensor) else v
               for k, v in sorted(opt.state[p].items())} for p in ps]
    layouts_ok = all(v.spec == p.spec for p in ps if isinstance(p, st.ShardedTensor)
                     for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim())
    return [_full(p) for p in ps], states, layouts_ok


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(OPTIMS))
def test_a_serial_optimizers_state_dict_loads_and_continues_the_serial_run(world, name):
    """torch's load_state_dict only casts the serial state: its full tensors are laid out like
    their parameters at the next step (they met the shards' gradients with the full shape:
    a size mismatch at tp > 1)."""
    rparams, rstates, _ = _serial_state_dict_resume(0, name, True)
    for params, states, layouts_ok in run(world, _serial_state_dict_resume, name, False):
        for p, r in zip(params, rparams):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        for s, r in zip(states, rstates):
            assert s.keys() == r.keys()
            for k in r:
                torch.testing.assert_close(s[k], r[k], rtol=1e-12, atol=1e-12)
        assert layouts_ok


def _sparse_embedding(rank, name, layout, vocab, pad, serial):
    """nn.Embedding(sparse=True) with its table split by vocab (stride 1 and 2), by hidden, or
    replicated, trained by SparseAdam / Adagrad; returns the rows each step's sparse gradient
    lists (global row numbers) and the table after every step."""
    from shardtensor.spec import take_shard
    pg = None if serial else st.ProcessGroup()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(vocab, 6, padding_idx=pad, sparse=True),
                      nn.Linear(6, 3)).double()
    w = m[0].weight
    if pg is not None:
        if layout == "col":
            st.split_col(w, pg)
        elif layout == "rep":
            st.replicate(w, pg)
        else:
            st.split_row(w, pg, stride=2 if layout == "row2" else 1)
    rows_of = torch.arange(vocab)
    if pg is not None and w.spec.is_shard and w.spec.dim == 0:
        rows_of = take_shard(rows_of, w.spec, pg.tp_local_rank())
    opt = (torch.optim.SparseAdam([w], lr=0.05) if name == "SparseAdam"
           else torch.optim.Adagrad([w], lr=0.1))
    listed, tables = [], []
    for step in range(3):
        ids = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out = m(ids)
        (out.full() if isinstance(out, st.ShardedTensor) else out).pow(2).sum().backward()
        g = (w.to_local() if pg is not None else w).grad
        assert g.is_sparse
        listed.append(sorted(rows_of[g.coalesce().indices()[0]].tolist()))
        opt.step()
        tables.append(_full(w))
    return listed, tables


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout,vocab,pad", [("row", 11, None), ("row", 11, 3), ("row", 3, None),
                                              ("row2", 12, 5), ("col", 11, 3), ("rep", 11, None)])
@pytest.mark.parametrize("name", ("SparseAdam", "Adagrad"))
def test_sparse_embedding_gradients_and_optimizers_match_serial(world, name, layout, vocab, pad):
    """A vocab-split table's sparse gradient listed row 0 of every rank (with zeros) for the
    ids other ranks hold: SparseAdam then decayed those rows' moments and moved them, and
    SparseAdam had no path at all (Tensor.coalesce has no rule): it now steps on the shards.
    Every rank's gradient lists a subset of serial's rows, and all ranks' together list
    serial's rows exactly."""
    rlisted, rtables = _sparse_embedding(0, name, layout, vocab, pad, True)
    outs = run(world, _sparse_embedding, name, layout, vocab, pad, False)
    for step in range(3):
        union = sorted(set().union(*(set(o[0][step]) for o in outs)))
        assert union == rlisted[step]
    for listed, tables in outs:
        for rows, rrows in zip(listed, rlisted):
            assert set(rows) <= set(rrows)
        for t, r in zip(tables, rtables):
            torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-12)
