"""Backports for the oldest supported torch, installed on `import shardtensor` where needed.

torch < 2.5 counted any tensor flagged `_is_param` (a parameter that is a tensor subclass: every
sharded parameter) as an instance of every Parameter subclass, `UninitializedParameter`
included, so `torch.nn.utils.weight_norm` / `spectral_norm` refused a sharded weight as "an
uninitialized parameter". `install` puts torch 2.5's check in place on such a torch.
"""
from __future__ import annotations

import torch
from torch.nn import parameter as _parameter

__all__ = ["install"]


def _instancecheck(cls, instance) -> bool:
    """torch >= 2.5's `_ParameterMeta.__instancecheck__`: the `_is_param` flag makes a tensor
    a `Parameter`, not an instance of Parameter's subclasses."""
    if cls is _parameter.Parameter and isinstance(instance, torch.Tensor) and \
            getattr(instance, "_is_param", False):
        return True
    return super(_parameter._ParameterMeta, cls).__instancecheck__(instance)


def _flag_makes_any_parameter_subclass() -> bool:
    probe = torch.empty(0)
    probe._is_param = True
    return isinstance(probe, _parameter.UninitializedParameter)


def install() -> None:
    """On a torch whose flagged tensors pass for every Parameter subclass, install torch 2.5's
    check (idempotent; nothing on newer torch)."""
    meta = getattr(_parameter, "_ParameterMeta", None)
    if meta is not None and _flag_makes_any_parameter_subclass():
        meta.__instancecheck__ = _instancecheck
