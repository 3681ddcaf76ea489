"""shardtensor: unchanged PyTorch model code, Megatron-style tensor parallel."""
from .spec import ComputePattern, ComputeSpec, PartialSpec, ReplicaSpec, ShardSpec
from .groups import ProcessGroup, Topology, init_distributed
from .trace import CommEvent, CommTrace
from .dispatch import (ShardingError, UnsupportedOpError, UnsupportedOpInParametrizationError,
                       config, rule)
from .tensor import ShardedTensor
from . import ops  # registers the rules
from .function import install as _install_function
from .optim import install as _install_optim
from .convert import install as _install_convert
from .compat import install as _install_compat
from .hooks import install as _install_hooks
from .torch_save import install as _install_torch_save
from .annotate import parallelize, replicate, shard_param, split_col, split_row
from .plans import register_plan
from .launch import launch
from .explain import explain
from .checkpoint import CheckpointError, full_state_dict, load, save
from .hf import load_pretrained
from .data_parallel import data_parallel

_install_function()   # custom autograd.Functions on ShardedTensors (see function.py)
_install_optim()      # elementwise optimizers step on the shards (see optim.py)
_install_convert()    # vector_to_parameters into plain parameters too (see convert.py)
_install_compat()     # torch < 2.5: sharded parameters are no UninitializedParameter (compat.py)
_install_hooks()      # the deprecated register_backward_hook warns (see hooks.py)
_install_torch_save()  # a torch.save refused while pickling writes nothing (torch_save.py)

__version__ = "0.1.0"

__all__ = [
    "ShardSpec", "ReplicaSpec", "PartialSpec", "ComputePattern", "ComputeSpec",
    "ProcessGroup", "Topology", "init_distributed",
    "ShardedTensor", "CommTrace", "CommEvent", "UnsupportedOpError", "ShardingError",
    "UnsupportedOpInParametrizationError", "config",
    "rule", "parallelize", "register_plan", "split_row", "split_col", "replicate", "shard_param", "launch", "explain", "data_parallel",
    "save", "load", "full_state_dict", "load_pretrained", "CheckpointError",
]
