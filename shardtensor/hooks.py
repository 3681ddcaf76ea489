"""The deprecated `nn.Module.register_backward_hook` on a module computing on ShardedTensors.

torch attaches such a hook to the autograd node of the module's output, which here is the node
of the output's shard (the rules compute on shards): the hook sees this rank's local gradients
of the inputs and outputs of the rule's last local op (shard shapes at tp > 1, another op than
serial's at any tp), not the module's global gradients. That cannot be mapped back in general
(torch documents the hook's grad_input as unreliable even serially), so it warns, naming
`register_full_backward_hook`, whose hooks see ShardedTensor gradients of the global shapes
(function.py). Installed on `import shardtensor`.
"""
from __future__ import annotations

import warnings

from torch import nn

from .tensor import ShardedTensor

__all__ = ["install"]

_ORIG = nn.Module.__dict__.get("_maybe_warn_non_full_backward_hook")


def _has_sharded(x) -> bool:
    from torch.utils._pytree import tree_leaves
    return any(type(t) is ShardedTensor for t in tree_leaves(x))


def _maybe_warn_non_full_backward_hook(self, inputs, result, grad_fn) -> None:
    """torch's check of a module with non-full backward hooks, run once per forward call after
    the hooks are attached; a ShardedTensor input or output adds the warning above."""
    if _has_sharded(result) or _has_sharded(inputs):
        warnings.warn(
            f"shardtensor: {type(self).__name__}.register_backward_hook (deprecated) on a module "
            f"computing on ShardedTensors: the hook is attached to the last autograd node of the "
            f"output's shard, so its grad_input / grad_output are this rank's local gradients of "
            f"that node (shard shapes at tp > 1), not the module's global gradients. Use "
            f"register_full_backward_hook: its hooks see ShardedTensor gradients of the global "
            f"shapes, with the serial values", UserWarning, stacklevel=4)
    return _ORIG(self, inputs, result, grad_fn)


def install() -> None:
    """Wrap nn.Module's check (torch >= 1.8 has it; idempotent)."""
    if _ORIG is not None and \
            nn.Module.__dict__["_maybe_warn_non_full_backward_hook"] is _ORIG:
        nn.Module._maybe_warn_non_full_backward_hook = _maybe_warn_non_full_backward_hook
