"""Memory: `untyped_storage()`, `storage()`, `data_ptr()`, `share_memory_()`. A replicated
tensor's shard is the whole tensor, so its memory is the answer. A sharded (or partial) tensor
has no memory holding its global value: its shard's storage under the global shape would let
code that reads bytes through it (safetensors, HF `save_pretrained`, numpy via ctypes) write or
read one rank's shard as if it were the whole tensor, so these raise, naming how to save a
parallelized model. `share_memory_()` moves the shard (what the tensor holds) to shared memory."""
from __future__ import annotations

import torch

from .. import trace as _trace
from ..dispatch import UnsupportedOpError
from ._util import rule

T = torch.Tensor


@rule(T.untyped_storage, T.storage, T.data_ptr)
def memory(func, args, kwargs):
    x = args[0]
    if x._spec.is_replicate:
        return func(x._local, *args[1:], **kwargs)
    err = UnsupportedOpError(
        f"{_trace.func_name(func)}: a ShardedTensor with {x._spec!r} has no memory holding its "
        f"global value of shape {tuple(x._gshape)}, only this rank's shard of shape "
        f"{tuple(x._local.shape)}, so code that reads tensors through their memory "
        f"(safetensors, HuggingFace save_pretrained) cannot take it. To save a parallelized "
        f"model, call on every rank either shardtensor.save(model, path) (a sharded checkpoint, "
        f"loads at any tp degree) or, for a HuggingFace directory, model.save_pretrained(path, "
        f"state_dict=shardtensor.full_state_dict(model), "
        f"is_main_process=(torch.distributed.get_rank() == 0)); for one tensor use t.full() or "
        f"t.to_local()")
    err.gather = False   # a gathered temporary's memory would be a wrong answer
    raise err


@rule(T.share_memory_)
def share_memory_(func, args, kwargs):
    """`model.share_memory()` (Hogwild-style workers): the shard moves to shared memory (every
    rank shares its own shard with its children); the tensor object is kept."""
    x = args[0]
    x._local.share_memory_()
    return x
