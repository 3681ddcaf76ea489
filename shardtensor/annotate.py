"""Annotating serial code: turn a module's parameter into a sharded parameter, in place."""
from __future__ import annotations

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
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"expected a tensor or nn.Parameter, got {type(param).__name__}")
    if isinstance(param, ShardedTensor):
        raise ShardingError(f"this parameter is already sharded with {param.spec!r} and global "
                            f"shape {tuple(param.shape)}; use .redistribute(spec) to change it")
    spec = _check_spec(spec, param.shape, pg, "shard_param")
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
    except RuntimeError as e:
        raise ShardingError(f"could not convert the parameter of shape {tuple(full.shape)} in "
                            f"place ({e}); annotate parameters before running the model") from e
    if grad is not None:
        param._local.grad = grad
    return param


def split_row(param: torch.Tensor, pg: ProcessGroup, stride: int = 1,
              compute_spec: Optional[ComputeSpec] = None) -> torch.Tensor:
    """Shard dim 0 of `param` in place (an nn.Linear weight: column parallel, Megatron's
    ColumnParallelLinear; a Conv1D weight (in, out): row parallel)."""
    return shard_param(param, pg, ShardSpec(0, pg.tp_world_size(), stride), compute_spec)


def split_col(param: torch.Tensor, pg: ProcessGroup, stride: int = 1,
              compute_spec: Optional[ComputeSpec] = None) -> torch.Tensor:
    """Shard dim -1 of `param` in place (an nn.Linear weight: row parallel, Megatron's
    RowParallelLinear; a Conv1D weight (in, out): column parallel, e.g. GPT-2's fused c_attn with
    stride=3)."""
    return shard_param(param, pg, ShardSpec(-1, pg.tp_world_size(), stride), compute_spec)


def replicate(param: torch.Tensor, pg: ProcessGroup) -> torch.Tensor:
    """Mark `param` as replicated on every rank of the group (in place)."""
    return shard_param(param, pg, ReplicaSpec())


def _layout(action, pg: ProcessGroup, name: str) -> Spec:
    n = pg.tp_world_size()
    if isinstance(action, (ShardSpec, ReplicaSpec)):
        return action
    opts = {}
    if isinstance(action, tuple):
        action, opts = action
    if action == "row":
        return ShardSpec(0, n, **opts)
    if action == "col":
        return ShardSpec(-1, n, **opts)
    if action == "replicate":
        return ReplicaSpec()
    raise ValueError(f"parallelize: bad plan entry {action!r} for {name!r}; use 'row', 'col', "
                     f"('col', {{'stride': 3}}), 'replicate' or a ShardSpec/ReplicaSpec")


def parallelize(model: nn.Module, pg: ProcessGroup, plan: Optional[dict] = None) -> nn.Module:
    """Shard `model`'s parameters in place by `plan` ({glob over parameter names: layout}; the
    first matching glob wins, unmatched parameters are replicated), or by the built-in plan for
    the model's architecture when `plan` is None. Returns the model; its code is unchanged.
    Tied parameters (one Parameter under two names) are converted once and stay tied."""
    import fnmatch
    from .plans import get_plan
    if plan is None:
        plan = get_plan(model, pg.tp_world_size())
    # decide every layout (and check it) before converting anything: bad input changes nothing
    todo = []
    for name, p in model.named_parameters():
        if isinstance(p, ShardedTensor):
            continue
        action = next((a for glob, a in plan.items() if fnmatch.fnmatchcase(name, glob)), "replicate")
        spec = _layout(action, pg, name)
        try:
            spec = _check_spec(spec, p.shape, pg, "parallelize")
        except ValueError as e:
            raise ValueError(f"parallelize: parameter {name!r} of shape {tuple(p.shape)}: {e}") from e
        todo.append((p, spec))
    for p, spec in todo:
        shard_param(p, pg, spec)
    return model
