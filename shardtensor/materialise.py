"""Filling a model whose tensors may be on the meta device, for `load` and `load_pretrained`.

A meta tensor is materialised in place (`swap_tensors`: the same Python object, so tied names
stay tied and an optimizer built before still holds it). Meta buffers outside the loaded state
(non-persistent ones such as rotary `inv_freq`) are recomputed by the model's `_init_weights`
(HF models); `uncomputable_buffers` names, before anything is touched, those nothing can fill.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn

from .checkpoint_io import CheckpointError
from .tensor import ShardedTensor, wrap

__all__ = ["fill", "materialise_buffers", "uncomputable_buffers"]


def fill(t: torch.Tensor, buf: torch.Tensor) -> None:
    """Put `buf` (this rank's local piece) into `t`: in place, or by materialising a meta `t`
    in place (the same Python object, so tied names stay tied)."""
    if not t.is_meta:
        (t._local if isinstance(t, ShardedTensor) else t).copy_(buf)
        return
    requires_grad = t.requires_grad
    new = wrap(buf, t._spec, t._pg, t._gshape, t._compute_spec) if isinstance(t, ShardedTensor) else buf
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=requires_grad)
    elif isinstance(new, ShardedTensor):
        new._local.requires_grad_(requires_grad)
    torch.utils.swap_tensors(t, new)


def _meta_buffers(model: nn.Module, filled: Iterable[int]) -> List[str]:
    skip = set(filled)
    return [f"{m}.{b}" if m else b for m, mod in model.named_modules()
            for b, v in mod._buffers.items() if v is not None and v.is_meta and id(v) not in skip]


def uncomputable_buffers(model: nn.Module, filled: Iterable[int]) -> List[str]:
    """Meta buffers that loading leaves unfilled (not among the tensors with ids `filled`) and
    that nothing recomputes (the model has no `_init_weights`)."""
    if getattr(model, "_init_weights", None) is not None:
        return []
    return _meta_buffers(model, filled)


def _sentinel(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return torch.full(t.shape, float("nan"), dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.zeros(t.shape, dtype=t.dtype)
    return torch.full(t.shape, torch.iinfo(t.dtype).min, dtype=t.dtype)


def _unfilled(t: torch.Tensor) -> bool:
    if t.dtype.is_floating_point:
        return bool(torch.isnan(t).any())
    if t.dtype == torch.bool:
        return False
    return bool((t == torch.iinfo(t.dtype).min).any())


def materialise_buffers(model: nn.Module) -> List[str]:
    """Meta buffers -> CPU, recomputed by the model's `_init_weights` (with every parameter
    marked initialised, so HF's init functions leave them alone)."""
    todo = []
    for mname, mod in model.named_modules():
        metas = [b for b, v in mod._buffers.items() if v is not None and v.is_meta]
        for b in metas:
            mod._buffers[b] = _sentinel(mod._buffers[b])
            todo.append((f"{mname}.{b}" if mname else b, mod, b))
    if not todo:
        return []
    init = getattr(model, "_init_weights", None)
    if init is not None:
        flagged = [p for p in model.parameters() if not getattr(p, "_is_hf_initialized", False)]
        for p in flagged:
            p._is_hf_initialized = True
        try:
            for mod in {id(m): m for _, m, _ in todo}.values():
                init(mod)
        finally:
            for p in flagged:
                del p._is_hf_initialized
    bad = [n for n, m, b in todo if _unfilled(m._buffers[b])]
    if bad:
        raise CheckpointError(f"buffers {bad} were on the meta device, are not in the checkpoint, "
                              f"and the model's _init_weights did not recompute them; build the "
                              f"model with buffers off the meta device")
    return [n for n, _, _ in todo]
