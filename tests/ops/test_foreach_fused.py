"""Fused optimizer kernels (`torch._fused_adam_`, ...: `fused=True`; ops/foreach.py): one local
kernel call on the shards equals the serial kernel on the full tensors, on every non-partial
layout, with plain rows and plain step counts; mismatched rows are refused naming the row; SGD,
Adam, AdamW and Adagrad with fused=True on a parallelized GPT-2 follow the serial fused run and
the sharded foreach run."""
import copy
import inspect
import re

import pytest
import torch
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.dispatch import RULES
from shardtensor.models_testing import build, inputs_for, weight_error
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

F64 = torch.float64
KERNELS = ("adam", "adamw", "sgd", "adagrad")
# the optimizers torch offers fused=True for, and the kernel each one calls
OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "Adagrad": "adagrad"}


def test_every_fused_optimizer_kernel_has_the_rule():
    fused = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
             and "fused" in inspect.signature(getattr(torch.optim, n).__init__).parameters}
    assert fused == set(OPTIMIZERS), fused          # what this torch offers (CPU included)
    kernels = {n for n in dir(torch) if n.startswith("_fused_") and n.endswith("_")}
    assert kernels == {f"_fused_{k}_" for k in KERNELS}, kernels
    assert all(getattr(torch, n) in RULES for n in kernels)
    assert len({RULES[getattr(torch, n)] for n in kernels}) == 1   # one rule serves them all


# --- the kernels on lists of tensors --------------------------------------------------------

def _lists(kernel, fulls, amsgrad):
    """(params, grads, *states) lists of full tensors, a seeded draw per row; plain steps."""
    g = torch.Generator().manual_seed(len(fulls))
    rnd = [lambda s: torch.randn(s, generator=g, dtype=F64),
           lambda s: torch.rand(s, generator=g, dtype=F64) + 0.1]
    n_states = {"adam": 3 if amsgrad else 2, "adamw": 3 if amsgrad else 2, "sgd": 1,
                "adagrad": 1}[kernel]
    out = [[rnd[0](s) for s in fulls], [rnd[0](s) for s in fulls]]
    out += [[rnd[k > 0 or kernel == "adagrad"](s) for s in fulls] for k in range(n_states)]
    if kernel in ("adam", "adamw") and not amsgrad:
        out.append([])                                  # max_exp_avg_sqs
    if kernel != "sgd":
        out.append([torch.tensor(3.0) for _ in fulls])  # state_steps (after the step's += 1)
    return out


def _call(kernel, lists, opts):
    func = getattr(torch, f"_fused_{kernel}_")
    kw = dict(lr=opts["lr"], weight_decay=0.05, maximize=opts["maximize"])
    for k in ("grad_scale", "found_inf"):
        if opts[k] is not None:
            kw[k] = torch.tensor(opts[k])
    if kernel in ("adam", "adamw"):
        kw.update(beta1=0.9, beta2=0.99, eps=1e-8, amsgrad=opts["amsgrad"])
    elif kernel == "sgd":
        kw.update(momentum=0.9, dampening=0.1, nesterov=opts["nesterov"], is_first_step=False)
    else:
        kw.update(lr_decay=0.01, eps=1e-10)
    if opts["tensor_lr"]:
        kw["lr"] = torch.tensor(kw["lr"])
    return func(*lists, **kw)


def _fused_sharded(rank, kernel, fulls, layouts, opts):
    pg = st.ProcessGroup()
    lists = _lists(kernel, fulls, opts["amsgrad"])
    shards = [[t if lay is None or t.dim() == 0 else st.ShardedTensor.from_global(t, pg, lay)
               for t, lay in zip(ts, layouts)] for ts in lists]
    keep = [list(ts) for ts in shards]
    with st.CommTrace() as trace:
        res = _call(kernel, shards, opts)
    assert res is None
    assert all(a is b for ts, ks in zip(shards, keep) for a, b in zip(ts, ks))  # in place
    specs_ = [[t.spec if isinstance(t, st.ShardedTensor) else None for t in ts] for ts in shards]
    fulls_ = [[t.full() if isinstance(t, st.ShardedTensor) else t for t in ts] for ts in shards]
    return fulls_, specs_, [e.kind for e in trace.events]


@hs.composite
def fused_cases(draw, world):
    k = draw(hs.integers(1, 4))
    fulls = [draw(shapes(max_dims=3, max_side=7)) for _ in range(k)]
    layouts = [draw(hs.one_of(hs.none(), specs(s, world, partial=False))) for s in fulls]
    opts = dict(lr=draw(hs.sampled_from([0.1, 0.01])), maximize=draw(hs.booleans()),
                amsgrad=draw(hs.booleans()), nesterov=draw(hs.booleans()),
                tensor_lr=draw(hs.booleans()),
                grad_scale=draw(hs.sampled_from([None, 2.0])),
                found_inf=draw(hs.sampled_from([None, 0.0, 1.0])))
    return draw(hs.sampled_from(KERNELS)), fulls, layouts, opts


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_fused_kernel_on_shards_matches_serial(world, data):
    kernel, fulls, layouts, opts = data.draw(fused_cases(world))
    ref = _lists(kernel, fulls, opts["amsgrad"])
    _call(kernel, ref, opts)
    for got, specs_, kinds in run(world, _fused_sharded, kernel, fulls, layouts, opts):
        assert kinds == []                               # one local kernel call
        for ts, rs, ss in zip(got, ref, specs_):
            assert len(ts) == len(rs)
            for t, r, s, lay in zip(ts, rs, ss, layouts):
                torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-12)
                if r.dim():                              # layouts kept
                    assert s == (None if lay is None else lay.normalize(r.shape))


def _mismatch(rank, case):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    fulls = [(6, 4), (5, 3)]
    lists = _lists("adam", fulls, False)
    lay = [st.ShardSpec(0, n), st.ShardSpec(1, n)]
    shards = [[st.ShardedTensor.from_global(t, pg, s) if t.dim() else t for t, s in zip(ts, lay)]
              for ts in lists]
    if case == "spec":           # a gradient laid out otherwise than its parameter
        shards[1][1] = st.ShardedTensor.from_global(lists[1][1], pg, st.ReplicaSpec())
    elif case == "plain":        # a full plain state beside a sharded parameter
        shards[3][1] = lists[3][1]
    elif case == "partial":      # a partial parameter
        shards[0][0] = st.ShardedTensor.from_global(lists[0][0], pg, st.PartialSpec())
    elif case == "plain param":  # a sharded state beside a plain parameter
        shards[0][1] = lists[0][1]
    before = [t.full() for t in shards[0] if isinstance(t, st.ShardedTensor)]
    with pytest.raises(st.ShardingError) as err:
        _call("adam", shards, dict(lr=0.1, maximize=False, amsgrad=False, tensor_lr=False,
                                   grad_scale=None, found_inf=None))
    after = [t.full() for t in shards[0] if isinstance(t, st.ShardedTensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))   # nothing was updated
    return str(err.value)


@pytest.mark.parametrize("case, pattern", [
    ("spec", r"torch\._fused_adam_: row 1 .*self\[1\] is ShardSpec\(dim=1, .*grads\[1\] is Repl"),
    ("plain", r"torch\._fused_adam_: row 1 .*exp_avg_sqs\[1\] is a plain tensor of shape \(5, 3\)"),
    ("partial", r"torch\._fused_adam_: row 0: self\[0\] is PartialSpec\(\)"),
    ("plain param", r"torch\._fused_adam_: row 1 .*self\[1\] is a plain tensor .*grads\[1\] is Sh"),
])
def test_fused_kernel_refuses_mismatched_rows(case, pattern):
    msgs = run(2, _mismatch, case)
    assert msgs[0] == msgs[1]
    assert len(msgs[0]) < 600, msgs[0]
    assert re.search(pattern, msgs[0]), msgs[0]


# --- fused=True optimizers on a parallelized GPT-2 -------------------------------------------

def _optimizer(name, params, **how):
    kw = {"SGD": dict(lr=0.05, momentum=0.9), "Adam": dict(lr=1e-2),
          "AdamW": dict(lr=1e-2, weight_decay=0.1), "Adagrad": dict(lr=1e-2)}[name]
    return getattr(torch.optim, name)(params, **kw, **how)


def _gathered(model, like):
    """A plain copy of `like` holding `model`'s (full) weights."""
    out = copy.deepcopy(like)
    with torch.no_grad():
        for q, p in zip(out.parameters(), model.parameters()):
            q.copy_(p.full() if isinstance(p, st.ShardedTensor) else p)
    return out


def _train_fused(rank, name, steps=3):
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa")
    fused, foreach = copy.deepcopy(serial), copy.deepcopy(serial)
    st.parallelize(fused, pg)
    st.parallelize(foreach, pg)
    runs = [(serial, _optimizer(name, serial.parameters(), fused=True)),
            (fused, _optimizer(name, fused.parameters(), fused=True)),
            (foreach, _optimizer(name, foreach.parameters(), foreach=True))]
    for step in range(steps):
        batch = inputs_for("gpt2", seed=step)
        for model, opt in runs:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    n_sharded = sum(isinstance(p, st.ShardedTensor) and p.spec.is_shard
                    for p in fused.parameters())
    return (weight_error(fused, serial), weight_error(_gathered(fused, serial),
                                                      _gathered(foreach, serial)),
            weight_error(fused, build("gpt2", "sdpa")), n_sharded)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimizers_on_gpt2_match_serial_and_foreach(world, name):
    for vs_serial, vs_foreach, moved, n_sharded in run(world, _train_fused, name):
        assert vs_serial < 1e-4, vs_serial
        assert vs_foreach < 1e-4, vs_foreach
        assert moved > 1e-3                              # the steps did update the weights
        assert n_sharded >= 4                            # the plan really shards the model


def _scaled_fused(rank):
    """GradScaler hands the fused kernel grad_scale and found_inf (plain tensors)."""
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa")
    model = st.parallelize(copy.deepcopy(serial), pg)
    for m in (serial, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            opt.zero_grad()
            scaler.scale(m(**inputs_for("gpt2", seed=step)).loss).backward()
            scaler.step(opt)
            scaler.update()
    return weight_error(model, serial)


def test_fused_adamw_with_grad_scaler_matches_serial():
    for err in run(2, _scaled_fused):
        assert err < 1e-4, err
