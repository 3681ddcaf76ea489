"""Metadata queries and autograd plumbing: answered on the wrapper or the shard, never by
communication. `detach`/`requires_grad_` make `nn.Parameter(sharded)` work; `grad` lives on the
shard (the autograd leaf) and is presented as a ShardedTensor with the parameter's layout."""
from __future__ import annotations

import copy

import torch

from ..collectives import replica_from_summand_grads
from ..spec import grad_spec
from ._util import REPLICA, ST, ShardingError, rule, to_layout, unwrap, wrap

_DisableTF = torch._C.DisableTorchFunctionSubclass
T = torch.Tensor

def _getters_and_methods(names):
    """Resolve names on torch.Tensor (properties give their getter); skip what this torch lacks."""
    out = []
    for name in names.split():
        attr = getattr(T, name, None)
        if attr is None:
            continue
        out.append(attr.__get__ if hasattr(attr, "__set__") or type(attr).__name__ in (
            "getset_descriptor", "property") else attr)
    return out


_PASSTHROUGH = _getters_and_methods("""
    shape size dim ndim ndimension numel nelement dtype device layout requires_grad
    is_contiguous is_floating_point is_complex element_size __len__ is_cuda is_cpu is_meta
    is_sparse is_quantized is_mkldnn get_device stride is_signed itemsize nbytes is_nested
    is_inference is_pinned is_shared _is_view is_xpu is_mps is_xla is_ipu is_vulkan is_mtia
    is_sparse_csr output_nr _version __dlpack_device__
""") + [torch.is_floating_point, torch.is_complex, torch.numel]


# questions about dtype or device only: the shard answers them (no disabling context needed)
_ON_SHARD = _getters_and_methods("""
    is_floating_point is_complex element_size is_cuda is_cpu is_meta is_signed itemsize
    get_device is_xpu is_mps is_quantized is_sparse is_inference is_shared is_pinned
""") + [torch.is_floating_point, torch.is_complex]
_PASSTHROUGH = [f for f in _PASSTHROUGH if f not in _ON_SHARD]


@rule(*dict.fromkeys(_ON_SHARD))
def on_shard(func, args, kwargs):
    """dtype/device questions: the shard has the same dtype and device."""
    return func(args[0]._local, *args[1:], **kwargs)


@rule(*dict.fromkeys(_PASSTHROUGH))
def passthrough(func, args, kwargs):
    """Metadata the wrapper already holds (global shape, dtype, device, ...)."""
    with _DisableTF():
        return func(*args, **kwargs)


@rule(T.is_leaf.__get__, T.grad_fn.__get__, T.retains_grad.__get__)
def on_local(func, args, kwargs):
    """Autograd state lives on the shard."""
    return func(args[0]._local)


@rule(T.detach, torch.detach)
def detach(func, args, kwargs):
    x = args[0]
    return wrap(x._local.detach(), x._spec, x._pg, x._gshape, x._compute_spec)


@rule(T.detach_)
def detach_(func, args, kwargs):
    x = args[0]
    x._local.detach_()
    with _DisableTF():
        x.requires_grad_(False)
    return x


@rule(T.requires_grad_)
def requires_grad_(func, args, kwargs):
    x = args[0]
    flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    x._local.requires_grad_(flag)
    with _DisableTF():
        T.requires_grad_(x, flag)
    return x


@rule(T.requires_grad.__set__)
def set_requires_grad(func, args, kwargs):
    x, flag = args
    x._local.requires_grad = flag
    with _DisableTF():
        T.requires_grad.__set__(x, flag)


@rule(T.retain_grad)
def retain_grad(func, args, kwargs):
    args[0]._local.retain_grad()


@rule(T.grad.__get__, T._grad.__get__)
def get_grad(func, args, kwargs):
    """The shard's gradient, presented with the tensor's layout (a partial value's gradient is
    the replicated gradient of the sum). `p.grad` itself is answered by the `ShardedTensor.grad`
    property without dispatch; this serves `Tensor.grad.__get__(p)` and `p._grad`."""
    return ST._get_grad(args[0])


@rule(T.grad.__set__, T._grad.__set__)
def set_grad(func, args, kwargs):
    x, g = args
    ST._set_grad(x, g)


@rule(T.data.__get__)
def get_data(func, args, kwargs):
    x = args[0]
    return wrap(x._local.data, x._spec, x._pg, x._gshape, x._compute_spec)


@rule(T.data.__set__)
def set_data(func, args, kwargs):
    """`x.data = new` with `new` of x's global shape: x keeps its layout and takes new's values
    (and dtype/device). A ShardedTensor laid out like x gives its shard (shared, as serial's
    `.data` shares); one laid out otherwise is redistributed, and a plain tensor (a replicated
    value: `vector_to_parameters`, `p.data = full_weight`) gives this rank's piece, copied
    when sharded (the parameter must not keep the full tensor alive)."""
    x, new = args
    if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(x._gshape):
        what = (f"shape {tuple(new.shape)}" if isinstance(new, torch.Tensor)
                else type(new).__name__)
        raise ShardingError(f"setting .data of a ShardedTensor with {x._spec!r} and shape "
                            f"{tuple(x._gshape)} needs a tensor of that global shape, got "
                            f"{what}")
    if type(new) is ST and new._spec == x._spec:
        local = new._local
    else:
        with torch.no_grad():
            local = to_layout(new.detach(), x._spec, x._pg, func)
        if type(new) is not ST and x._spec.is_shard:
            local = local.clone()
    x._local.data = local
    _refresh_wrapper(x)


@rule(torch._has_compatible_shallow_copy_type)
def compatible_shallow_copy(func, args, kwargs):
    """`nn.Module._apply` (`model.to(dtype)`, `.half()`, `.cuda()`) asks this before assigning
    `param.data = converted`: two ShardedTensors are compatible (the `.data` setter keeps the
    parameter object and converts its shard); a ShardedTensor and a plain tensor are not."""
    a, b = args[0], args[1]
    # and only where the shards are (a move to or from the meta device is not: torch then gives
    # the module a new Parameter, as serially)
    return (type(a) is ST and type(b) is ST
            and torch._has_compatible_shallow_copy_type(a._local, b._local))


def _refresh_wrapper(x) -> None:
    """After `x._local` changed dtype or device in place (`p.data = p.data.to(bf16)`), give the
    wrapper the shard's dtype/device, keeping the Python object (still the module's parameter,
    still in any optimizer): the wrapper's tensor part is swapped with a fresh one, its
    attributes kept."""
    loc = x._local
    with _DisableTF():
        same = x.dtype == loc.dtype and x.device == loc.device
    if same:
        return
    fresh = wrap(loc, x._spec, x._pg, x._gshape, x._compute_spec)
    fresh.__dict__.update({k: v for k, v in x.__dict__.items() if k not in _NOT_COPIED})
    torch.utils.swap_tensors(x, fresh)


@rule(T.backward)
def backward(func, args, kwargs):
    """`loss.backward()` runs autograd on the shards: no Python dispatch in the backward pass."""
    rest = dict(zip(("gradient", "retain_graph", "create_graph", "inputs"), args[1:]), **kwargs)
    _backward_on_shards([args[0]], [rest.pop("gradient", None)], rest)


def _seq(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _backward_on_shards(tensors, grads, rest) -> None:
    """torch.autograd.backward over the shards of `tensors` (their gradients and `inputs=`
    moved to the shards too)."""
    if rest.get("inputs") is not None:
        rest["inputs"] = [unwrap(i) for i in _seq(rest["inputs"])]
    grads = [None if g is None else _grad_local(t, g) for t, g in zip(tensors, grads)]
    torch.autograd.backward([unwrap(t) for t in tensors], grads, **rest)


@rule(torch.autograd.backward)
def autograd_backward(func, args, kwargs):
    """`torch.autograd.backward(tensors, grad_tensors, ...)` on the shards (reentrant
    `torch.utils.checkpoint` calls it from its backward)."""
    names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables",
             "inputs")
    a = dict(zip(names, args), **kwargs)
    tensors = _seq(a.pop("tensors"))
    grads = a.pop("grad_tensors", None)
    if grads is None:
        grads = a.pop("grad_variables", None)
    a.pop("grad_variables", None)
    grads = [None] * len(tensors) if grads is None else _seq(grads)
    _backward_on_shards(tensors, grads, a)


@rule(torch.autograd.grad)
def autograd_grad(func, args, kwargs):
    """`torch.autograd.grad(outputs, inputs, ...)` on the shards; each gradient is presented
    with its input's layout (a partial input's: replicated, the gradient of the sum)."""
    names = ("outputs", "inputs", "grad_outputs", "retain_graph", "create_graph", "only_inputs",
             "allow_unused", "is_grads_batched", "materialize_grads")
    a = dict(zip(names, args), **kwargs)
    if a.get("is_grads_batched"):
        raise NotImplementedError("torch.autograd.grad(is_grads_batched=True) on ShardedTensors")
    outputs, inputs = _seq(a.pop("outputs")), a.pop("inputs")
    as_dict = isinstance(inputs, dict)
    ins = list(inputs.values()) if as_dict else _seq(inputs)
    gouts = a.pop("grad_outputs", None)
    gouts = [None] * len(outputs) if gouts is None else _seq(gouts)
    res = torch.autograd.grad([unwrap(o) for o in outputs], [unwrap(i) for i in ins],
                              [None if g is None else _grad_local(o, g)
                               for o, g in zip(outputs, gouts)], **a)
    out = []
    for i, g in zip(ins, res):
        if g is not None and type(i) is ST:
            if i._spec.is_partial:
                g = wrap(replica_from_summand_grads(g, i._pg), REPLICA, i._pg, i._gshape)
            else:
                g = wrap(g, i._spec, i._pg, i._gshape)
        out.append(g)
    return dict(zip(inputs.keys(), out)) if as_dict else tuple(out)


def _grad_local(out, g):
    """This rank's part of the gradient `g` given for `out`: laid out like `out`, but for a
    partial `out` replicated (each summand's gradient is the whole sum's)."""
    if type(out) is not ST:
        return to_layout(g, REPLICA, g._pg) if type(g) is ST else g
    gspec = grad_spec(out._spec)
    if type(g) is ST:
        return g._local if g._spec == gspec else to_layout(g, gspec, g._pg)
    if gspec.is_shard:
        from ..spec import take_shard
        return take_shard(g, gspec, out._pg.tp_local_rank())
    return g


@rule(T.register_hook)
def register_hook(func, args, kwargs):
    """A hook on a ShardedTensor sees (and may replace) the gradient as a ShardedTensor, laid
    out like the tensor (a partial tensor's: replicated, the gradient of the sum)."""
    x, hook = args[0], args[1] if len(args) > 1 else kwargs["hook"]
    spec, pg, shape = grad_spec(x._spec), x._pg, x._gshape

    def local_hook(g):
        out = hook(wrap(g, spec, pg, shape))
        return None if out is None else to_layout(out, spec, pg)
    return x._local.register_hook(local_hook)


@rule(T.register_post_accumulate_grad_hook)
def register_post_accumulate_grad_hook(func, args, kwargs):
    x, hook = args[0], args[1] if len(args) > 1 else kwargs["hook"]
    import weakref
    ref = weakref.ref(x)

    def local_hook(_):
        p = ref()
        if p is not None:
            hook(p)
    return x._local.register_post_accumulate_grad_hook(local_hook)


# the wrapper's own state, and the rules' per-tensor caches (a copy rebuilds them on use)
from ..tensor import OWN_ATTRS as _NOT_COPIED   # noqa: E402


@rule(T.__deepcopy__)
def deepcopy(func, args, kwargs):
    x, memo = args[0], (args[1] if len(args) > 1 else kwargs.get("memo", {}))
    if id(x) in memo:
        return memo[id(x)]
    local = x._local.detach().clone()
    local.requires_grad_(x._local.requires_grad)
    out = wrap(local, x._spec, x._pg, x._gshape, x._compute_spec)
    if getattr(x, "_is_param", False):
        out._is_param = True
    if x._local.grad is not None:
        local.grad = x._local.grad.clone()
    for k, v in x.__dict__.items():
        if k not in _NOT_COPIED:
            out.__dict__[k] = copy.deepcopy(v, memo)
    memo[id(x)] = out
    return out


if hasattr(T, "module_load"):
    @rule(T.module_load)
    def module_load(func, args, kwargs):
        """load_state_dict under torch.__future__.set_swap_module_params_on_conversion(True):
        what replaces the parameter. assign=True: the state dict's tensor laid out like the
        parameter (a full tensor's shard copied, so the full tensor is not kept alive);
        otherwise, as torch's default, the parameter's copy of it."""
        x, other = args[0], args[1]
        assign = args[2] if len(args) > 2 else kwargs.get("assign", False)
        if not assign:
            return x.copy_(other).detach()
        if type(x) is not ST:
            return other.detach()
        local = to_layout(other.detach(), x._spec, x._pg, func)
        if type(other) is not ST and x._spec.is_shard:
            local = local.clone()
        return wrap(local, x._spec, x._pg, x._gshape, x._compute_spec)


@rule(T.__repr__, T.__str__, T.__format__)
def text(func, args, kwargs):
    x = args[0]
    if func is T.__format__ and args[1]:
        return format(x.full().item() if x.numel() == 1 else str(x), args[1])
    return ST.__repr__(x)
