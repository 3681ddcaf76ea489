"""Custom `torch.autograd.Function`s on ShardedTensors (shardtensor/function.py): a user's own
Function and reentrant `torch.utils.checkpoint` give serial values and gradients; without the
bridge their gradient path was silently cut (parameters before a reentrant checkpoint got no
gradient at all)."""
import copy
import gc
import weakref

import pytest
import torch
from hypothesis import given, strategies as hs
from torch.utils.checkpoint import checkpoint

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run
from strategies import WORLDS, shapes, specs

from ops.test_elementwise import make


class MulAdd(torch.autograd.Function):
    """x * y + x, written the way users write Functions: saved tensors, needs_input_grad."""

    @staticmethod
    def forward(ctx, x, y, scale):
        ctx.save_for_backward(x, y)
        ctx.scale = scale
        return (x * y + x) * scale

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = g * (y + 1) * ctx.scale if ctx.needs_input_grad[0] else None
        gy = g * x * ctx.scale if ctx.needs_input_grad[1] else None
        return gx, gy, None


class SplitStats(torch.autograd.Function):
    """Two outputs, the second marked non-differentiable; the first a view-free new tensor."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        pos = (x > 0).to(x.dtype)
        ctx.mark_non_differentiable(pos)
        return x.tanh(), pos

    @staticmethod
    def backward(ctx, g, _gpos):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


def _full(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _megatron_mlp(pg, out_features):
    """Linear(8, 16) column parallel then Linear(16, out) row parallel, and serial copies."""
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, out_features)
    ref1, ref2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
    st.split_row(fc1.weight, pg), st.split_row(fc1.bias, pg), st.split_col(fc2.weight, pg)
    return fc1, fc2, ref1, ref2


def _muladd(rank, shape, xspec, yspec, y_grad, seed):
    pg = st.ProcessGroup()
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=y_grad)
    w = torch.randn(shape, dtype=torch.float64)
    sx = make(x, xspec, pg, rank, seed)
    sy = make(y, yspec, pg, rank, seed + 1)
    h = sx * 1.5   # the Function's input is an activation, not a leaf
    out = MulAdd.apply(h, sy, 0.5)
    (_full(out) * w).sum().backward()
    return _full(out).detach(), x.grad, y.grad


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_custom_function_matches_serial(world, data):
    shape = data.draw(shapes(max_dims=3, max_side=7))
    xspec = data.draw(specs(shape, world))
    yspec = data.draw(hs.one_of(hs.none(), specs(shape, world)))
    y_grad = data.draw(hs.booleans())
    seed = data.draw(hs.integers(0, 2 ** 16))
    res = run(world, _muladd, shape, xspec, yspec, y_grad, seed)
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=y_grad)
    w = torch.randn(shape, dtype=torch.float64)
    ref = MulAdd.apply(x * 1.5, y, 0.5)
    (ref * w).sum().backward()
    # a partial input's summands each get the whole gradient; from_global's gradient is gathered
    xs = [g for _, g, _ in res]
    if xspec.is_partial:
        xs = [xs[0]]   # rank 0's summand holds x itself
    for out, gx, gy in res:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for gx in xs:
        torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-12)
    if y_grad:
        gys = [g for _, _, g in res]
        if yspec is not None and yspec.is_partial:
            gys = gys[:1]
        for gy in gys:
            torch.testing.assert_close(gy, y.grad, rtol=1e-12, atol=1e-12)
    else:
        assert all(g is None for _, _, g in res)


def _two_outputs(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, pg.tp_world_size()))
    t, pos = SplitStats.apply(sx * 2)
    out = (t * pos).sum()
    flags = (isinstance(t, st.ShardedTensor), t.spec, pos.requires_grad, t.requires_grad)
    _full(out).backward(retain_graph=True)
    first = x.grad.clone()
    _full(out).backward()    # the graph was retained: the Function's node runs again
    return flags, first, x.grad


def test_two_outputs_non_differentiable_and_retain_graph():
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    t, pos = SplitStats.apply(x * 2)
    (t * pos).sum().backward()
    for flags, first, twice in run(2, _two_outputs):
        assert flags == (True, st.ShardSpec(1, 2), False, True)
        torch.testing.assert_close(first, x.grad)
        torch.testing.assert_close(twice, 2 * x.grad)


def _no_leak(rank):
    pg = st.ProcessGroup()
    x = torch.randn(64, 64, requires_grad=True)
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(0, pg.tp_world_size()))
    out = MulAdd.apply(sx * 2, sx, 1.0)
    ref = weakref.ref(out.to_local())
    out.sum().full().backward()
    del out
    gc.collect()
    return ref() is None


def test_bridge_frees_its_graph():
    assert all(run(2, _no_leak))


def _plain_untouched(rank):
    x = torch.randn(5, requires_grad=True)
    y = MulAdd.apply(x, x.detach(), 2.0)
    y.sum().backward()
    return type(y).__name__, y.grad_fn.__class__.__name__, x.grad


def test_plain_calls_go_straight_to_torch():
    name, fn, g = run(1, _plain_untouched)[0]
    assert name == "Tensor" and fn == "MulAddBackward"


def _reentrant(rank, arch, reentrant):
    pg = st.ProcessGroup()
    serial = build(arch, "eager")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for(arch)
    losses = []
    for m in (serial, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = m(**batch).loss
        loss.backward()
        losses.append(_full(loss).item())
    missing, worst = [], 0.0
    for (name, p), q in zip(serial.named_parameters(), model.parameters()):
        if (p.grad is None) != (q.grad is None):
            missing.append(name)
        elif p.grad is not None:
            worst = max(worst, ((_full(q.grad) - p.grad).abs().max()
                                / p.grad.abs().max().clamp_min(1e-6)).item())
    return losses, missing, worst


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reentrant_gradient_checkpointing_equals_serial(arch):
    for (ls, lp), missing, worst in run(2, _reentrant, arch, True):
        assert abs(ls - lp) <= 1e-5 * abs(ls)
        assert not missing, f"no gradient for {missing[:4]}"
        assert worst < 1e-4


def _mlp(a, l1, l2):
    return l2(torch.nn.functional.gelu(l1(a)))


def _mlp_checkpoint(rank, reentrant):
    """A hand-written column -> row MLP under torch.utils.checkpoint: Megatron's activation
    recomputation. The backward re-runs the forward (its all-reduce included)."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    fc1, fc2, ref1, ref2 = _megatron_mlp(pg, 8)
    x = torch.randn(4, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()

    with st.CommTrace() as tr:
        out = checkpoint(_mlp, x, fc1, fc2, use_reentrant=reentrant)
        _full(out).pow(2).sum().backward()
    checkpoint(_mlp, xr, ref1, ref2, use_reentrant=reentrant).pow(2).sum().backward()
    err = max(((_full(a.grad) - b.grad).abs().max() / b.grad.abs().max()).item()
              for a, b in [(fc1.weight, ref1.weight), (fc1.bias, ref1.bias),
                           (fc2.weight, ref2.weight), (fc2.bias, ref2.bias), (x, xr)])
    kinds = sorted((e.phase, e.kind) for e in tr.events)
    return err, kinds


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_megatron_mlp(reentrant):
    for err, kinds in run(2, _mlp_checkpoint, reentrant):
        assert err < 1e-5
        # the forward all-reduce, f's backward all-reduce, and (reentrant) the forward's again
        # when the block is recomputed, as Megatron's recomputation does; the non-reentrant
        # checkpoint stops recomputing once fc2's saved input is back, before the all-reduce
        assert [k for _, k in kinds] == ["all_reduce"] * (3 if reentrant else 2), kinds


def _checkpoint_with_old_torch_backward(rank):
    """torch < 2.10's `torch.autograd.backward` asks no `__torch_function__`, so reentrant
    checkpoint's backward ran the engine on the wrappers and every gradient stayed None; on such
    a torch shardtensor installs `function._autograd_backward` in its place. Here torch's own
    is made to ignore `__torch_function__` as before 2.10, and the replacement installed."""
    from shardtensor import function
    saved, orig = torch.autograd.backward, function._ORIG_AUTOGRAD_BACKWARD

    def old_torch_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                           grad_variables=None, inputs=None):   # torch 2.4's, in short
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = (grad_tensors,) if isinstance(grad_tensors, torch.Tensor) else \
            tuple(grad_tensors or (None,) * len(tensors))
        grads = torch.autograd._make_grads(tensors, grads, is_grads_batched=False)
        torch.autograd.graph._engine_run_backward(
            tensors, grads, create_graph if retain_graph is None else retain_graph,
            create_graph, tuple(inputs or ()), allow_unreachable=True, accumulate_grad=True)

    function._ORIG_AUTOGRAD_BACKWARD = old_torch_backward
    torch.autograd.backward = function._autograd_backward
    try:
        return _mlp_checkpoint(rank, True)
    finally:
        torch.autograd.backward, function._ORIG_AUTOGRAD_BACKWARD = saved, orig


def test_old_torch_autograd_backward_routes_sharded_tensors_to_the_shards():
    from shardtensor import function
    installed = torch.autograd.backward is function._autograd_backward
    assert installed == (not function._asks_torch_function(function._ORIG_AUTOGRAD_BACKWARD))
    for err, kinds in run(2, _checkpoint_with_old_torch_backward):
        assert err < 1e-5
        assert [k for _, k in kinds] == ["all_reduce"] * 3, kinds


def _residual_checkpoint_plain_input(rank):
    """`h + checkpoint(block, h)` with a plain, non-leaf `h` (no ShardedTensor goes into the
    checkpoint, sharded parameters inside it): the bridge's backward walks `h`'s history
    through the Function's node, and the outer backward walks it again by the residual. The
    inner backward freed it first (RuntimeError: backward through the graph a second time)."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    fc1, fc2, ref1, ref2 = _megatron_mlp(pg, 8)
    x = torch.randn(4, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()

    for inp, l1, l2 in ((x, fc1, fc2), (xr, ref1, ref2)):
        h = inp.tanh()
        out = h + checkpoint(_mlp, h, l1, l2, use_reentrant=True)
        _full(out).pow(2).sum().backward()
    return max(((_full(a.grad) - b.grad).abs().max() / b.grad.abs().max()).item()
               for a, b in [(fc1.weight, ref1.weight), (fc2.weight, ref2.weight), (x, xr)])


def test_reentrant_checkpoint_of_a_plain_residual_input():
    assert all(err < 1e-5 for err in run(2, _residual_checkpoint_plain_input))


class GeluFn(torch.autograd.Function):
    """BLOOM's `GeLUFunction` pattern: the backward differentiates again with autograd.grad."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = torch.nn.functional.gelu(x)
            return torch.autograd.grad(y, x, g)[0]


def _mlp_function(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    fc1, fc2, ref1, ref2 = _megatron_mlp(pg, 8)
    x = torch.randn(4, 8)
    with st.CommTrace() as tr:
        out = fc2(GeluFn.apply(fc1(x)))
        _full(out).pow(2).sum().backward()
    ref2(GeluFn.apply(ref1(x))).pow(2).sum().backward()
    errs = [None if a.grad is None else ((_full(a.grad) - b.grad).abs().max()
                                         / b.grad.abs().max()).item()
            for a, b in [(fc1.weight, ref1.weight), (fc1.bias, ref1.bias),
                         (fc2.weight, ref2.weight), (fc2.bias, ref2.bias)]]
    return errs, sorted(e.kind for e in tr.events)


@pytest.mark.parametrize("world", WORLDS)
def test_function_between_column_and_row_linears(world):
    """Before the bridge fc1's gradient was None (the path through the Function was cut)."""
    for errs, kinds in run(world, _mlp_function):
        assert all(e is not None and e < 1e-5 for e in errs), errs
        # the row linear's forward all-reduce; x needs no gradient, so no backward one
        assert kinds == (["all_reduce"] if world > 1 else [])


def _penalty(rank):
    """A gradient penalty (WGAN-GP style): autograd.grad(create_graph=True) then backward."""
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    fc1, fc2, ref1, ref2 = _megatron_mlp(pg, 1)
    x = torch.randn(4, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    try:
        y = _full(fc2(torch.tanh(fc1(x)))).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        g.pow(2).sum().backward()
    except NotImplementedError as e:
        return str(e), None
    (gr,) = torch.autograd.grad(ref2(torch.tanh(ref1(xr))).sum(), xr, create_graph=True)
    gr.pow(2).sum().backward()
    return None, ((_full(fc1.weight.grad) - ref1.weight.grad).abs().max()
                  / ref1.weight.grad.abs().max()).item()


@pytest.mark.parametrize("world", WORLDS)
def test_second_order_gradients_through_collectives(world):
    """Once silently wrong (rel err 0.3-1: raw backward collectives), then refused; now the
    collectives' backwards build a graph of their conjugates (tests/test_double_backward.py)."""
    for err, rel in run(world, _penalty):
        assert err is None and rel < 1e-5, (err, rel)


class ExpSaved(torch.autograd.Function):
    """Saves its own output (the exp/sigmoid/softmax fused-op pattern): torch detaches the saved
    output in C++, which once reached ShardedTensor's __torch_dispatch__."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


class KwFn(torch.autograd.Function):
    """setup_context style, called with keyword arguments."""

    @staticmethod
    def forward(x, y):
        return x * y.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y.sin(), g * x * y.cos()


def _kw_call(x, y, all_keywords=True):
    """KwFn with its arguments by keyword where torch's apply takes keywords (torch 2.11's
    Function.apply takes none; later ones do), else positionally."""
    try:
        return KwFn.apply(x=x, y=y) if all_keywords else KwFn.apply(x, y=y)
    except TypeError as e:
        if "takes no keyword arguments" not in str(e):
            raise
        return KwFn.apply(x, y)


def _saved_and_keywords(rank):
    pg = st.ProcessGroup()
    d = pg.tp_world_size()
    torch.manual_seed(0)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    sa = st.ShardedTensor.from_global(a, pg, st.ShardSpec(1, d))
    sb = st.ShardedTensor.from_global(b, pg, st.ShardSpec(1, d))
    out = _full(ExpSaved.apply(sa * 0.5)).sum() + _full(_kw_call(sa * 1.0, sb)).sum() \
        + _full(_kw_call(sa * 2.0, sb, False)).sum()
    out.backward()
    try:   # second order through the bridge: refused (it is first order), not silently lost
        (g,) = torch.autograd.grad(_full(ExpSaved.apply(sa * 1.0)).sum(), a, create_graph=True)
        refused = None
    except NotImplementedError as e:
        refused = str(e)
    return a.grad, b.grad, refused


@pytest.mark.parametrize("world", [1, 2])
def test_saved_outputs_keyword_arguments_and_second_order(world):
    torch.manual_seed(0)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (ExpSaved.apply(a * 0.5).sum() + _kw_call(a * 1.0, b).sum()
     + _kw_call(a * 2.0, b, False).sum()).backward()
    for ga, gb, refused in run(world, _saved_and_keywords):
        torch.testing.assert_close(ga, a.grad)
        torch.testing.assert_close(gb, b.grad)
        assert refused is not None and "create_graph=True" in refused


class Dirty(torch.autograd.Function):
    """In place, marked dirty: not supported on ShardedTensors."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _error(fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001 (the test compares kinds and messages)
        return type(e).__name__, str(e)
    return None


def _autograd_checks(rank):
    """What autograd checks on a Function's saved tensors, serial and sharded side by side."""
    pg = st.ProcessGroup()
    d = pg.tp_world_size()
    res = {}
    for name, lift in (("serial", lambda t: t),
                       ("sharded", lambda t: st.ShardedTensor.from_global(t, pg, st.ShardSpec(1, d)))):
        x = torch.randn(4, 6, requires_grad=True)
        sx = lift(x)
        # a second backward without retain_graph, the Function's inputs leaves: it accumulated
        loss = _full(MulAdd.apply(sx, sx, 1.0)).sum()
        loss.backward()
        second = _error(loss.backward)
        # an input the Function saved, changed in place after the call: the check was lost
        h = sx * 2
        y = MulAdd.apply(h, sx, 1.0)
        with torch.no_grad():
            h.add_(1)
        changed = _error(lambda: _full(y).sum().backward())
        # an output the Function saved, changed in place after the call
        y = ExpSaved.apply(sx * 1.0)
        with torch.no_grad():
            y.mul_(2)
        changed_out = _error(lambda: _full(y).sum().backward())
        res[name] = (second, changed, changed_out)
    res["dirty"] = _error(lambda: Dirty.apply(lift(torch.randn(4, 6, requires_grad=True)) * 1.0))
    return res


@pytest.mark.parametrize("world", [1, 2])
def test_saved_tensor_checks_as_in_serial(world):
    """Second backward without retain_graph, and in-place changes to saved inputs/outputs, fail
    as they do in serial (before: the second backward silently doubled the gradients, the
    in-place changes silently gave wrong ones); mark_dirty gives a clear error (it was a
    SystemError from inside torch's C++)."""
    for res in run(world, _autograd_checks):
        serial, sharded = res["serial"], res["sharded"]
        for s, h in zip(serial, sharded):
            assert s is not None and s[0] == "RuntimeError"
            assert h is not None and h[0] == s[0], (s, h)
        assert "a second time" in sharded[0][1]
        assert "modified by an inplace operation" in sharded[1][1]
        assert "modified by an inplace operation" in sharded[2][1]
        kind, msg = res["dirty"]
        assert kind == "NotImplementedError" and "Dirty" in msg and "mark_dirty" in msg


def _inner_graph(rank):
    """The bridge's backward runs the Function's own (wrapper-level) graph: it must not reach
    the graph upstream of the Function (it ran every upstream node once more with a None
    gradient), and without retain_graph it frees the Function's saved tensors."""
    pg = st.ProcessGroup()
    x = torch.randn(4, 6, requires_grad=True)
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, pg.tp_world_size()))
    h = sx * 2
    seen = []
    h.to_local().grad_fn.register_prehook(lambda g: seen.append(g[0] is not None))
    y = MulAdd.apply(h, sx, 1.0)
    with torch._C.DisableTorchFunctionSubclass():   # the Function's own node, on the wrapper
        node = torch._C.TensorBase.grad_fn.__get__(y.to_local().grad_fn.call.outs[0])
    _full(y).sum().backward()
    freed = _error(lambda: node.saved_tensors)
    return seen, type(node).__name__, freed


def test_bridge_backward_stays_in_the_functions_graph():
    for seen, name, freed in run(2, _inner_graph):
        assert seen == [True]
        assert name == "MulAddBackward"
        if hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph"):
            assert freed is not None and "freed" in freed[1]
        else:   # torch < 2.6 cannot say whether the graph is retained: kept with the graph
            assert freed is None


def _checkpoint_inputs(rank):
    pg = st.ProcessGroup()
    fc1, fc2, ref1, ref2 = _megatron_mlp(pg, 8)
    res = {}
    for name, (a, b) in (("serial", (ref1, ref2)), ("sharded", (fc1, fc2))):
        x = torch.randn(4, 8, requires_grad=True)
        blk = lambda h: b(torch.relu(a(h)))   # noqa: E731
        res[name] = (_error(lambda: _full(checkpoint(blk, x, use_reentrant=True)).sum()
                            .backward(inputs=[x])),
                     _error(lambda: torch.autograd.grad(
                         _full(checkpoint(blk, x, use_reentrant=True)).sum(), x)),
                     _error(lambda: torch.autograd.grad(   # a penalty's first step
                         _full(checkpoint(blk, x, use_reentrant=True)).sum(), x,
                         create_graph=True)))
    return res


def test_reentrant_checkpoint_refuses_inputs_and_grad_as_in_serial():
    """Reentrant checkpoint cannot serve backward(inputs=...) or autograd.grad: serial raises.
    With a plain input and sharded parameters the bridge was not reachable from the input, so
    backward(inputs=[x]) silently gave x no gradient (and autograd.grad a misleading error)."""
    for res in run(2, _checkpoint_inputs):
        for s, h in zip(res["serial"], res["sharded"]):
            assert s is not None and "use_reentrant=True" in s[1]
            assert h == s, (h, s)
