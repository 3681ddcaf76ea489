"""`torch.nn.utils.vector_to_parameters` with a ShardedTensor vector.

`parameters_to_vector` over a model with sharded parameters returns a ShardedTensor, and torch's
`vector_to_parameters` then runs `param.data = vec[a:b].view_as(param).data` for every
parameter. For a sharded parameter the `.data` setter's rule lays the piece out like it; for a
plain parameter (a layer left serial) torch's setter never asks the rules (it checks only the
tensor being set), and the plain parameter took over the wrapper's storage, which has no memory:
a segmentation fault at its next read. Here a plain parameter gets the piece's global value.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.utils as _utils
import torch.nn.utils.convert_parameters as _convert

from .tensor import ShardedTensor

__all__ = ["install"]

_ORIG = _convert.vector_to_parameters


def vector_to_parameters(vec: torch.Tensor, parameters: Iterable[torch.Tensor]) -> None:
    if type(vec) is not ShardedTensor:
        return _ORIG(vec, parameters)
    param_device = None
    pointer = 0
    for param in parameters:
        param_device = _convert._check_param_device(param, param_device)
        num_param = param.numel()
        piece = vec[pointer: pointer + num_param].view_as(param)
        if type(param) is not ShardedTensor and type(piece) is ShardedTensor:
            with torch.no_grad():
                piece = piece.full()
        param.data = piece.data
        pointer += num_param


vector_to_parameters.__doc__ = _ORIG.__doc__
vector_to_parameters._shardtensor = True


def install() -> None:
    """Put the version above where torch's is looked up (done on `import shardtensor`;
    idempotent). A name bound by `from torch.nn.utils import vector_to_parameters` before
    `import shardtensor` keeps torch's."""
    for mod in (_convert, _utils):
        if not getattr(mod.vector_to_parameters, "_shardtensor", False):
            mod.vector_to_parameters = vector_to_parameters
