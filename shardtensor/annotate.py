"""Annotating serial code: turn a module's parameter into a sharded parameter, in place."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .dispatch import ShardingError
from .groups import ProcessGroup
from .spec import ComputeSpec, ReplicaSpec, ShardSpec, Spec, take_shard
from .tensor import ShardedTensor, _check_spec, wrap

__all__ = ["split_row", "split_col", "replicate", "shard_param"]


def shard_param(param: torch.Tensor, pg: ProcessGroup, spec: Spec,
                compute_spec: Optional[ComputeSpec] = None) -> torch.Tensor:
    """Convert `param` in place to a ShardedTensor laid out by `spec`: afterwards the same Python
    object (still the module's parameter, still in any optimizer that holds it) is sharded, and
    its `.grad` will be a ShardedTensor with the same layout. Returns `param`."""
    return _shard_param(param, pg, spec, compute_spec, "shard_param")


def _shard_param(param, pg, spec, compute_spec, where: str):
    """shard_param, its errors naming `where` (the helper the user called)."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor or nn.Parameter, got {type(param).__name__}")
    if isinstance(param, ShardedTensor):
        raise ShardingError(f"{where}: this parameter (global shape {tuple(param.shape)}) is "
                            f"already sharded with {param.spec!r} by an earlier split_row / "
                            f"split_col / replicate / parallelize; annotate each parameter once "
                            f"(to lay it out otherwise, annotate the serial model that way)")
    spec = _check_spec(spec, param.shape, pg, where)
    with torch.no_grad():
        full = param.detach()
        if spec.is_shard:
            local = take_shard(full, spec, pg.tp_local_rank()).clone()
        elif spec.is_replicate:
            local = full
        else:
            raise ShardingError("a parameter cannot be PartialSpec: its value must be known on "
                                "every rank; use ReplicaSpec or ShardSpec")
        grad = None if param.grad is None else (
            take_shard(param.grad, spec, pg.tp_local_rank()).clone() if spec.is_shard else param.grad)
    requires_grad = param.requires_grad
    new = wrap(local, spec, pg, full.shape, compute_spec)
    if isinstance(param, nn.Parameter):
        new = nn.Parameter(new, requires_grad=requires_grad)
    else:
        new._local.requires_grad_(requires_grad)
    try:
        torch.utils.swap_tensors(param, new)
    except RuntimeError:
        # another reference may be garbage awaiting collection (a reference cycle through an
        # autograd graph built while the model was set up, e.g. peft's DoRA initialisation)
        import gc
        gc.collect()
        try:
            torch.utils.swap_tensors(param, new)
        except RuntimeError as e:
            raise ShardingError(f"{where}: could not convert the parameter of shape {tuple(full.shape)} "
                                f"in place ({e}); annotate parameters before running the "
                                f"model") from e
    if grad is not None:
        param._local.grad = grad
    return param


def split_row(param: torch.Tensor, pg: ProcessGroup, stride: int = 1,
              compute_spec: Optional[ComputeSpec] = None) -> torch.Tensor:
    """Shard dim 0 of `param` in place (an nn.Linear weight: column parallel, Megatron's
    ColumnParallelLinear; a Conv1D weight (in, out): row parallel)."""
    return _shard_param(param, pg, ShardSpec(0, pg.tp_world_size(), stride), compute_spec, "split_row")


def split_col(param: torch.Tensor, pg: ProcessGroup, stride: int = 1,
              compute_spec: Optional[ComputeSpec] = None) -> torch.Tensor:
    """Shard dim -1 of `param` in place (an nn.Linear weight: row parallel, Megatron's
    RowParallelLinear; a Conv1D weight (in, out): column parallel, e.g. GPT-2's fused c_attn with
    stride=3)."""
    return _shard_param(param, pg, ShardSpec(-1, pg.tp_world_size(), stride), compute_spec, "split_col")


def replicate(param: torch.Tensor, pg: ProcessGroup) -> torch.Tensor:
    """Mark `param` as replicated on every rank of the group (in place)."""
    return _shard_param(param, pg, ReplicaSpec(), None, "replicate")


_OPTIONS = ("stride",)


def _layout(action, pg: ProcessGroup, name: str, glob: str) -> Spec:
    """The layout plan entry `glob: action` gives parameter `name`; a bad entry is a ValueError
    naming parallelize, the entry and the parameter."""
    n = pg.tp_world_size()
    if isinstance(action, (ShardSpec, ReplicaSpec)):
        return action
    where = f"parallelize: plan entry {glob!r}: {action!r} (for parameter {name!r})"
    opts = {}
    if isinstance(action, tuple):
        if len(action) != 2 or not isinstance(action[1], dict):
            raise ValueError(f"{where}: a tuple entry is (layout, options), e.g. "
                             f"('col', {{'stride': 3}})")
        action, opts = action
        bad = [k for k in opts if k not in _OPTIONS]
        if bad:
            import difflib
            hint = {k: difflib.get_close_matches(str(k), _OPTIONS, 1) for k in bad}
            said = ", ".join(f"{k!r}" + (f" (did you mean {hint[k][0]!r}?)" if hint[k] else "")
                             for k in bad)
            raise ValueError(f"{where}: unknown option {said}; the options are {list(_OPTIONS)}")
    try:
        if action == "row":
            return ShardSpec(0, n, **opts)
        if action == "col":
            return ShardSpec(-1, n, **opts)
    except (TypeError, ValueError) as e:    # a stride that is not a positive int
        raise ValueError(f"{where}: {e}") from None
    if action == "replicate" and not opts:
        return ReplicaSpec()
    raise ValueError(f"{where}: use 'row', 'col', ('col', {{'stride': 3}}), 'replicate' or a "
                     f"ShardSpec/ReplicaSpec")


def parallelize(model: nn.Module, pg: ProcessGroup, plan: Optional[dict] = None) -> nn.Module:
    """Shard `model`'s parameters in place by `plan` ({glob over parameter names: layout}; the
    first matching glob wins, unmatched parameters are replicated), or by the built-in plan for
    the model's architecture when `plan` is None. Returns the model; its code is unchanged.
    Tied parameters (one Parameter under two names) are converted once and stay tied.

    A model wrapped by `peft.get_peft_model` (before or after an earlier `parallelize`) is
    sharded like the bare model: globs see its names without PEFT's `base_model.model.` and
    `.base_layer`, and each LoRA adapter takes Megatron-LoRA's layout from its base layer
    (column-parallel base: lora_B split like the output; row-parallel: lora_A split like the
    input; the other replicated). Already sharded parameters are left as they are where the
    plan agrees; a plan entry that asks another layout for one raises, changing nothing.
    `model.load_state_dict(sd, assign=True)` afterwards keeps the sharded parameters sharded."""
    import fnmatch
    from .plans import get_plan
    inner, prefix = _peft_inner(model)
    own_plan = plan is not None
    if plan is None:
        plan = get_plan(inner, pg.tp_world_size())
    tuners = _tuner_layers(model)
    adapters = {id(q): (layer, which) for layer in tuners.values()
                for which in ("lora_A", "lora_B") if isinstance(getattr(layer, which, None), nn.ModuleDict)
                for q in getattr(layer, which).parameters()}
    in_tuner = {id(q) for layer in tuners.values() for q in layer.parameters(recurse=True)}
    base = {id(q) for layer in tuners.values() for q in layer.get_base_layer().parameters()}
    # decide every layout (and check it) before converting anything: bad input changes nothing
    todo, decided, later, again = [], {}, [], []
    for name, p in model.named_parameters():
        if id(p) in adapters and not isinstance(p, ShardedTensor):
            later.append((name, p))
            continue
        glob = None
        if id(p) in in_tuner and id(p) not in base:   # other adapter weights: replicated
            action = "replicate"
        else:
            pname = _plan_name(name, prefix, tuners)
            glob = next((g for g in plan if fnmatch.fnmatchcase(pname, g)), None)
            action = "replicate" if glob is None else plan[glob]
        spec = _layout(action, pg, name, glob)
        if isinstance(p, ShardedTensor):   # annotated before: kept where the plan agrees
            if glob is not None:
                again.append((name, p, spec, glob, action))
            continue
        todo.append((name, p, spec, glob, action))
        decided[id(p)] = spec
    for name, p in later:
        layer, which = adapters[id(p)]
        todo.append((name, p, _lora_layout(layer, which, p, decided, pg), None, None))
    if own_plan:   # a typo in a glob would leave a correct but unparallel model: say so
        names = [_plan_name(n, prefix, tuners) for n, _ in model.named_parameters()]
        unused = [g for g in plan if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unused:
            import warnings
            warnings.warn(f"parallelize: plan entries {unused} match no parameter of "
                          f"{type(model).__name__} (names look like {names[:3]}); those "
                          f"layouts were not applied", stacklevel=2)
    checked = []
    for name, p, spec, glob, action in todo + again:
        entry = "" if glob is None else f" (plan entry {glob!r}: {action!r})"
        try:
            spec = _check_spec(spec, p.shape, pg, "parallelize")
        except ValueError as e:
            raise ValueError(f"parallelize: parameter {name!r} of shape {tuple(p.shape)}{entry}: "
                             f"{e}") from e
        if isinstance(p, ShardedTensor):
            if spec != p._spec or p._pg != pg:
                on = ("", "") if p._pg == pg else (f" on {p._pg!r}", f" on {pg!r}")
                raise ShardingError(
                    f"parallelize: parameter {name!r} of shape {tuple(p.shape)} is already "
                    f"annotated with {p._spec!r}{on[0]}, but plan entry {glob!r}: {action!r} "
                    f"asks for {spec!r}{on[1]}; a parameter is annotated once (by an earlier "
                    f"parallelize or split_row / split_col / replicate): annotate the serial "
                    f"model once, or make the plan agree")
            continue
        checked.append((p, spec))
    for p, spec in checked:
        _shard_param(p, pg, spec, None, "parallelize")
    _shard_on_assign(model)
    if callable(getattr(model, "save_pretrained", None)):   # HF / PEFT: refuse before writing
        from .hf import guard_save_pretrained
        guard_save_pretrained()
    return model


# --- models wrapped by PEFT ------------------------------------------------------------------

def _peft_inner(model: nn.Module):
    """(the model PEFT wraps, the prefix of its parameter names), or (model, "") unwrapped."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
    if inner is None and hasattr(model, "peft_config") and isinstance(getattr(model, "model", None), nn.Module):
        inner = model.model        # a LoraModel (peft_model.base_model)
    if inner is None or inner is model:
        return model, ""
    path = next((n for n, m in model.named_modules() if m is inner), "")
    return inner, path + "." if path else ""


def _tuner_layers(model: nn.Module) -> dict:
    """{name: module} of PEFT's adapter layers (they hold the original layer as `base_layer`)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "base_layer", None), nn.Module)
            and callable(getattr(m, "get_base_layer", None))}


def _plan_name(name: str, prefix: str, tuners: dict) -> str:
    """The bare model's name of a parameter: `.base_layer` of adapter layers and PEFT's prefix
    left out."""
    parts = name.split(".")
    kept = [part for i, part in enumerate(parts)
            if not (part == "base_layer" and ".".join(parts[:i]) in tuners)]
    name = ".".join(kept)
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _lora_layout(layer: nn.Module, which: str, p, decided: dict, pg: ProcessGroup) -> Spec:
    """Megatron-LoRA: lora_A (r, in) and lora_B (out, r) around a base weight split on its
    output dim: B split the same way (its output is then the base output's shard, no
    communication); split on its input dim: A split the same way (its output is then a partial
    sum, reduced together with the base output). A base weight that is not split: replicated."""
    w = getattr(layer.get_base_layer(), "weight", None)
    spec = decided.get(id(w))
    if spec is None and isinstance(w, ShardedTensor):
        spec = w._spec
    if w is None or spec is None or not spec.is_shard or w.dim() != 2:
        return ReplicaSpec()
    spec = spec.normalize(w.shape)
    out_dim = 1 if getattr(layer, "fan_in_fan_out", False) else 0   # Conv1D is (in, out)
    n = pg.tp_world_size()
    if spec.dim == out_dim:
        return ShardSpec(0, n, spec.stride) if which == "lora_B" else ReplicaSpec()
    return ShardSpec(p.dim() - 1, n, spec.stride) if which == "lora_A" and p.dim() == 2 else ReplicaSpec()


# --- load_state_dict(assign=True) --------------------------------------------------------------

_ASSIGN_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _shard_on_assign(model: nn.Module) -> None:
    """Give every module that owns a sharded parameter a load_state_dict pre-hook that, under
    `assign=True`, cuts a full tensor from the state dict to this rank's shard in the
    parameter's layout (torch would assign the full tensor: the model would silently stop
    being tensor parallel)."""
    for m in model.modules():
        if m in _ASSIGN_HOOKED or not any(isinstance(q, ShardedTensor) for q in m._parameters.values()):
            continue
        reg = getattr(m, "register_load_state_dict_pre_hook", None)
        if reg is not None:
            reg(_assign_hook)
        else:   # torch < 2.5
            m._register_load_state_dict_pre_hook(_assign_hook, with_module=True)
        _ASSIGN_HOOKED.add(m)


def _assign_hook(module, state_dict, prefix, local_metadata, *rest) -> None:
    if not local_metadata.get("assign_to_params_buffers", False):
        return
    for name, p in module._parameters.items():
        v = state_dict.get(prefix + name)
        if type(p) is not ShardedTensor or not isinstance(v, torch.Tensor) or v.shape != p.shape:
            continue   # torch reports a missing key or a size mismatch itself
        state_dict[prefix + name] = _as_layout_of(v, p)


def _as_layout_of(v: torch.Tensor, p: ShardedTensor) -> ShardedTensor:
    """`v` (a full tensor or a ShardedTensor) laid out like the parameter `p`; a shard of a full
    tensor is copied, so the full tensor is not kept alive by the parameter."""
    if type(v) is ShardedTensor:
        return v if v._spec == p._spec else v.redistribute(p._spec)
    with torch.no_grad():
        v = v.detach()
        local = take_shard(v, p._spec, p._pg.tp_local_rank()).clone() if p._spec.is_shard else v
    return wrap(local, p._spec, p._pg, p._gshape, p._compute_spec)
