"""Custom `torch.autograd.Function`s called on ShardedTensors.

`Function.apply` is C++ that records the function's backward node on the tensors it is handed:
for a ShardedTensor that is the wrapper, while a ShardedTensor's gradients live on its shard
(every rule computes on the shards). Left alone, the gradient path through any custom Function
(reentrant `torch.utils.checkpoint`, a user's fused op) would be silently cut.

So `apply` with a ShardedTensor argument builds two graphs and joins them: the Function runs as
written, on detached wrapper leaves, recording its node on wrappers (its `ctx`, saved tensors,
`needs_input_grad`, `mark_non_differentiable` all as torch implements them); one local-level
node (`_Bridge`) then stands for it in the shards' graph. Its backward hands the shard
gradients (as ShardedTensors) to the Function's node through the engine and returns the input
gradients' shards. The Function's own backward runs on ShardedTensors, through the rules, like
its forward. Calls without a ShardedTensor argument go straight to torch's `apply`.

The bridge saves the shards of what the Function saved, so autograd's own checks hold as in
serial: an in-place change to a saved input or output after the call, and a second backward
without `retain_graph`, fail with torch's errors. In-place Functions (`ctx.mark_dirty`) on
ShardedTensors are refused with a clear error.
"""
from __future__ import annotations

import weakref

import torch

from .ops._util import to_layout
from .spec import grad_spec
from .tensor import ShardedTensor, wrap

__all__ = ["install"]

ST = ShardedTensor
_Function = torch.autograd.Function
_ORIG_APPLY = _Function.__dict__["apply"].__func__
_DisableTF = torch._C.DisableTorchFunctionSubclass
_run_backward = torch.autograd.graph._engine_run_backward
_requires_grad = torch._C.TensorBase.requires_grad.__get__
_grad_fn = torch._C.TensorBase.grad_fn.__get__
# whether the backward running now keeps its graph (retain_graph); torch < 2.6 cannot say
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def _c_requires_grad(t) -> bool:
    """The wrapper's own autograd flag (not the shard's, which the rules answer)."""
    with _DisableTF():
        return _requires_grad(t)


class _Capture(_Function):
    """The Function's input number `k` at the wrapper level: its backward records the gradient
    the Function's node computed for it (no tensor op on it: the engine's own accumulation and
    `AccumulateGrad` are C++, which a ShardedTensor must not reach)."""

    @staticmethod
    def forward(ctx, token, call, k, local, boxed):
        ctx.call, ctx.k = weakref.ref(call), k   # weak: the bridge's ctx owns the call
        x = boxed[0]   # boxed: not an input of this node (its own history stays out)
        if type(x) is ST:
            return wrap(local, x._spec, x._pg, x._gshape, x._compute_spec)
        return local.view_as(local)

    @staticmethod
    def backward(ctx, g):
        got = ctx.call().got
        k = ctx.k
        got[k] = g if got[k] is None or g is None else got[k] + g
        return None, None, None, None, None


class _Bridge(_Function):
    """Stands in the shards' graph for one call of a custom Function (see the module doc)."""

    @staticmethod
    def forward(ctx, call, *inputs):
        ctx.call, ctx.n = call, len(inputs)
        # aliases: the call keeps the Function's outputs (the engine's roots) but not these,
        # whose history is this node (no reference cycle through the call)
        outs = tuple(x.detach() for x in call.out_locals)
        # the shards of what the Function saved: autograd checks their versions here (the
        # wrapper-level saved tensors never see an in-place change made through the rules), and
        # a second backward without retain_graph fails here as in serial
        ctx.save_for_backward(*call.saved_in, *[outs[j] for j in call.saved_out])
        call.saved_in = call.saved_out = None
        return outs

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        if call.checkpoint and not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(   # serial's reentrant checkpoint raises it in its backward
                "When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad() or "
                "passing an `inputs` parameter to .backward(). To resolve this error, you can "
                "either set use_reentrant=False, or call .backward() without passing the "
                "`inputs` argument.")
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "shardtensor: a second-order gradient (backward/autograd.grad with "
                "create_graph=True) through a custom autograd.Function called on ShardedTensors "
                "is not supported; its bridge to the shards is first order")
        ctx.saved_tensors   # noqa: B018 (the checks above)
        outs, gouts = [], []
        for o, g in zip(call.outs, grads):
            if g is None:
                continue
            outs.append(o)
            if type(o) is ST:   # a partial output's gradient: replicated (that of the sum)
                g = wrap(g, grad_spec(o._spec), o._pg, o._gshape)
            gouts.append(g)
        call.got = [None] * len(call.inputs)
        if outs:
            # no `inputs=`: reentrant checkpoint refuses a backward that names them. Without
            # captured inputs (only plain tensors went in) the Function's node links to their
            # history, which this backward walks and the outer one may walk again (a residual
            # `h + checkpoint(block, h)`): that graph is kept for the outer backward
            _run_backward(tuple(outs), tuple(gouts), _keep_graph() or not call.inputs, False,
                          (), True, True)
        got, call.got = call.got, None
        res = tuple(_shard_of(g, a) for g, a in zip(got, call.inputs))
        return (None,) + res + (None,) * (ctx.n - len(res))


def _shard_of(g, layout):
    """The gradient `g` of a Function input laid out as `layout` ((spec, pg) of a
    ShardedTensor, None for a plain tensor), as that input's own graph expects it."""
    if g is None or layout is None:
        return g.full() if type(g) is ST else g
    spec, pg = layout
    # a summand's gradient is the sum's (replicated); a plain gradient is a replicated value
    return to_layout(g, grad_spec(spec), pg)


class _Call:
    __slots__ = ("inputs", "got", "outs", "out_locals", "saved_in", "saved_out", "checkpoint",
                 "__weakref__")


def _sharded_apply(cls, args, kwargs):
    """A ShardedTensor among the arguments: every input needing grad enters the Function
    through a `_Capture` node, so its gradient comes back to the shards' graph by the bridge."""
    grad = torch.is_grad_enabled()
    call = _Call()
    call.checkpoint = cls.__name__ == "CheckpointFunction"
    call.inputs, locals_in = [], []   # the layouts (not the tensors) of inputs needing grad
    token = []

    def enter(a):
        """The Function's view of argument `a` (see the module doc)."""
        if not isinstance(a, torch.Tensor):
            return a
        if type(a) is ST:
            if not (grad and a._local.requires_grad):
                v = wrap(a._local.detach(), a._spec, a._pg, a._gshape, a._compute_spec)
                views.append((v, a._local))
                return v
        elif not (grad and a.requires_grad):
            return a
        if not token:
            token.append(torch.zeros((), requires_grad=True))
        # detached: `a` may carry another call's wrapper-level history, and its shard the
        # outer graph, which a backward through this node must not reach (it would free it)
        c = _ORIG_APPLY(_Capture, token[0], call, len(call.inputs),
                        (a._local if type(a) is ST else a).detach(), (a,))
        call.inputs.append((a._spec, a._pg) if type(a) is ST else None)
        locals_in.append(a._local if type(a) is ST else a)
        views.append((c, locals_in[-1]))
        return c

    views = []   # (what the Function sees, the tensor an in-place change reaches)
    new = [enter(a) for a in args]
    kw = {k: enter(v) for k, v in kwargs.items()}
    out = _ORIG_APPLY(cls, *new, **kw)
    if not call.inputs:
        return out
    return _bridge(cls, out, call, locals_in, new + list(kw.values()), views)


def _bridge(cls, out, call, locals_in, args, views=()):
    """Give the Function's differentiable outputs the bridge's history (see the module doc);
    `views` pairs the tensors the Function was handed with those in-place changes reach."""
    single = not isinstance(out, tuple)
    outs = [out] if single else list(out)
    diff = [j for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and _c_requires_grad(o)]
    if not diff:
        return out
    for j in diff:
        if any(outs[j] is x for x in args):
            raise NotImplementedError(
                f"{cls.__name__}.apply returned one of its inputs unchanged; return a new "
                f"tensor (e.g. x.clone()) from a custom Function's forward")
    call.outs = [outs[j] for j in diff]
    call.out_locals = [o._local if type(o) is ST else o.detach() for o in call.outs]
    _find_saved(call, outs[diff[0]], views)
    if not locals_in:   # the outputs' history reaches the inputs' own graphs directly
        locals_in = [torch.zeros((), requires_grad=True)]
    locs = _Bridge.apply(call, *locals_in)
    call.out_locals = None
    for j, o, loc in zip(diff, call.outs, locs):
        # the caller gets new tensors (the same storage) whose history is the bridge
        outs[j] = wrap(loc, o._spec, o._pg, o._gshape, o._compute_spec) if type(o) is ST else loc
    return outs[0] if single else tuple(outs)


def _find_saved(call, out, views) -> None:
    """Which inputs (by the tensor in-place changes reach) and outputs the Function saved."""
    call.saved_in, call.saved_out = [], []
    with _DisableTF():
        node = _grad_fn(out)
    saved = getattr(node, "saved_tensors", ())
    for s in saved:
        if s is None:
            continue
        hit = next((loc for v, loc in views if s is v), None)
        if hit is not None:
            call.saved_in.append(hit)
            continue
        sl = s._local if type(s) is ST else s
        for j, o in enumerate(call.out_locals):
            if sl.data_ptr() == o.data_ptr() and sl.shape == o.shape:
                call.saved_out.append(j)
                break


_PLUMBING: dict = {}


def _torch_plumbing(cls) -> bool:
    """torch's own Functions, which torch's code expects to find as they are (the non-reentrant
    checkpoint's `_NoopSaveInputs` looks up its node's methods), except reentrant checkpoint's
    `CheckpointFunction`, whose gradients must reach the shards. Decided once per class."""
    v = _PLUMBING.get(cls)
    if v is None:
        v = _PLUMBING[cls] = (cls.__module__.startswith("torch.")
                              and cls.__name__ != "CheckpointFunction")
    return v


_BackwardHookFunction = getattr(getattr(torch.nn.modules, "_functions", None),
                                "BackwardHookFunction", None)


def _module_hook_apply(args):
    """`BackwardHookFunction.apply(*tensors)`: how `nn.Module` full backward hooks
    (`register_full_backward_hook`, `..._pre_hook`) capture a module's input and output
    gradients. The identity runs on the shards (torch finds its node as the outputs' `grad_fn`,
    which the rules answer from the shard) and the node's `register_hook` is wrapped so the
    module's hooks see the gradients as ShardedTensors laid out like the tensors (a partial
    value's: replicated, the gradient of the sum) and may return them so, or as plain full
    values."""
    layouts = [(grad_spec(a._spec), a._pg, a._gshape)
               if type(a) is ST else None for a in args]
    outs = _ORIG_APPLY(_BackwardHookFunction, *[a._local if type(a) is ST else a for a in args])
    node = next((o.grad_fn for o in outs if o.grad_fn is not None), None)
    if node is not None:
        register = node.register_hook

        def present(grads):
            return tuple(g if g is None or lay is None else wrap(g, *lay)
                         for g, lay in zip(grads, layouts))

        def register_hook(fn):
            def on_shards(grad_inputs, grad_outputs):
                res = fn(present(grad_inputs), present(grad_outputs))
                if res is None:
                    return None
                return tuple(g if g is None or lay is None else to_layout(g, lay[0], lay[1])
                             for g, lay in zip(res, layouts))
            return register(on_shards)
        node.register_hook = register_hook
    return tuple(wrap(o, a._spec, a._pg, a._gshape, a._compute_spec) if type(a) is ST else o
                 for o, a in zip(outs, args))


def _apply(cls, *args, **kwargs):
    if _torch_plumbing(cls):
        if cls is _BackwardHookFunction and any(type(a) is ST for a in args):
            return _module_hook_apply(args)
        return _ORIG_APPLY(cls, *args, **kwargs)
    for a in (args + tuple(kwargs.values()) if kwargs else args):
        if type(a) is ST:
            if torch.compiler.is_compiling():
                break
            return _sharded_apply(cls, args, kwargs)
    out = _ORIG_APPLY(cls, *args, **kwargs)
    if type(out) is ST or (type(out) is tuple and any(type(o) is ST for o in out)):
        # no ShardedTensor went in but one came out (reentrant checkpoint of a block whose
        # parameters are sharded): plain inputs are linked to the Function's node already;
        # the bridge joins its outputs' shards to it
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            call = _Call()
            call.inputs, call.checkpoint = [], cls.__name__ == "CheckpointFunction"
            # the plain inputs needing grad are the bridge's inputs too (it returns them no
            # gradient: theirs comes through the Function's node), so a backward asked for
            # their gradient (`inputs=`, autograd.grad) reaches the bridge as in serial
            plain = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            return _bridge(cls, out, call, plain, args)
    return out


_apply.__doc__ = _ORIG_APPLY.__doc__

_FunctionCtx = torch.autograd.function.FunctionCtx
_ORIG_MARK_DIRTY = _FunctionCtx.mark_dirty


def _mark_dirty(self, *args):
    for a in args:
        if type(a) is ST:
            raise NotImplementedError(
                f"shardtensor: {type(self).__name__[:-len('Backward')] or 'a custom Function'}: "
                f"ctx.mark_dirty on a ShardedTensor (an in-place custom autograd.Function) is "
                f"not supported; return a new tensor from forward instead (the input's shard "
                f"may already have been changed by the forward's in-place op)")
    return _ORIG_MARK_DIRTY(self, *args)


_mark_dirty.__doc__ = _ORIG_MARK_DIRTY.__doc__


_ORIG_AUTOGRAD_BACKWARD = torch.autograd.backward


def _autograd_backward(tensors, *args, **kwargs):
    """`torch.autograd.backward` for a torch whose own does not ask `__torch_function__`
    (before 2.10; reentrant checkpoint's backward calls it on the recomputed outputs, which on
    ShardedTensors must run over the shards: the engine on the wrappers reaches nothing)."""
    seq = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = kwargs.get("inputs", args[4] if len(args) > 4 else None)
    seq += (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
    if any(type(t) is ST for t in seq):
        from .ops.meta import autograd_backward
        return autograd_backward(_ORIG_AUTOGRAD_BACKWARD, (tensors,) + args, kwargs)
    return _ORIG_AUTOGRAD_BACKWARD(tensors, *args, **kwargs)


def _asks_torch_function(f) -> bool:
    import inspect
    try:
        return "handle_torch_function" in inspect.getsource(f)
    except (OSError, TypeError):
        return True


def install() -> None:
    """Route `torch.autograd.Function.apply` calls that get a ShardedTensor through the bridge
    (done on `import shardtensor`; idempotent); on torch < 2.10 also `torch.autograd.backward`
    called on ShardedTensors (newer torch asks their `__torch_function__` itself)."""
    if _Function.__dict__["apply"].__func__ is not _apply:
        _Function.apply = classmethod(_apply)
        _FunctionCtx.mark_dirty = _mark_dirty
    if torch.autograd.backward is _ORIG_AUTOGRAD_BACKWARD and \
            not _asks_torch_function(_ORIG_AUTOGRAD_BACKWARD):
        _autograd_backward.__doc__ = _ORIG_AUTOGRAD_BACKWARD.__doc__
        torch.autograd.backward = _autograd_backward
    # shardtensor's own Functions (the collectives' f/g pairs, the bridge) only ever see shards:
    # they keep torch's apply, so the rules' hot path pays nothing for the bridge
    from . import collectives
    own = [c for c in vars(collectives).values()
           if isinstance(c, type) and issubclass(c, _Function)] + [_Capture, _Bridge]
    for c in own:
        c.apply = classmethod(_ORIG_APPLY)
