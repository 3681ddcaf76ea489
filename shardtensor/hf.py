"""Loading a serial HuggingFace checkpoint straight into a parallelized model.

Build the model on the meta device, parallelize it (layouts only, no memory), then
`load_pretrained(model, directory)`: each rank reads only the byte ranges of its own shards from
`model.safetensors` (or the files `model.safetensors.index.json` maps) and materialises them on
the CPU. Buffers left on the meta device (non-persistent ones such as rotary `inv_freq` or
`position_ids`, or persistent ones the checkpoint lacks) are computed as the model's own
construction computes them (materialise.py), and loading refuses, changing nothing, if nothing
computes them. Parameters the checkpoint lacks (a new head) are initialised as
`from_pretrained` initialises them, by the model's `_init_weights`, and reported.

And back: HF's `save_pretrained` of a parallelized model without `state_dict=` refuses before
writing anything, naming the recipe (`guard_save_pretrained`, installed by parallelize).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List

import torch
from torch import nn

from .checkpoint import Target, last_load, unique_tensors
from .checkpoint_io import CheckpointError, SafetensorsFile, blocks, checked, overlap
from .materialise import can_init, computed_buffers, fill, init_missing, install_buffers

__all__ = ["load_pretrained", "guard_save_pretrained"]


def _weight_map(directory: str) -> Dict[str, str]:
    idx = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        f = SafetensorsFile(single)
        f.close()
        return {k: "model.safetensors" for k in f.entries}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory} "
                          f"(pickled pytorch_model.bin checkpoints are not loaded: no pickle)")


def _find(names: List[str], weight_map, prefix: str):
    for n in names:
        for key in (n, n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else None,
                    f"{prefix}.{n}" if prefix else None):
            if key and key in weight_map:
                return key
    return None


def load_pretrained(model: nn.Module, directory: str) -> Dict[str, List[str]]:
    """Collective: fill `model` (parallelized, parameters possibly on the meta device) from the
    HuggingFace `save_pretrained` directory, each rank reading only its slices; meta parameters
    are materialised on the CPU (tied ones stay tied) and meta buffers recomputed. Parameters
    the checkpoint lacks (a classification head on a base checkpoint) are initialised as
    HuggingFace's `from_pretrained` initialises them (the model's `_init_weights`; serial's
    values under the same seed), with a warning. Returns {"missing": those parameters,
    "unexpected": checkpoint keys the model has no use for, "reinitialised": buffers
    recomputed}. Raises CheckpointError on every rank, changing nothing, on a shape mismatch, a
    meta buffer nothing computes, or a missing parameter outside any module with an
    `_init_weights`."""
    tensors, aliases = unique_tensors(model.state_dict(keep_vars=True))
    names: Dict[str, List[str]] = {n: [n] for n in tensors}
    for a, n in aliases.items():
        names[n].append(a)
    param_ids = {id(p) for p in model.parameters()}
    prefix = getattr(model, "base_model_prefix", "")
    files: Dict[str, SafetensorsFile] = {}

    def prepare():
        weight_map = _weight_map(directory)
        staged, used, missing_params = {}, set(), []
        for name, t in tensors.items():
            key = _find(names[name], weight_map, prefix)
            if key is None:
                if id(t) in param_ids:
                    missing_params.append(name)
                continue  # a persistent buffer the checkpoint lacks: recomputed below
            used.add(key)
            fname = weight_map[key]
            if fname not in files:
                files[fname] = SafetensorsFile(os.path.join(directory, fname))
            f = files[fname]
            if key not in f.entries:
                raise CheckpointError(f"{f.path} has no tensor {key!r} (its index says it has)")
            tgt = Target(name, t)
            if f.entries[key][1] != tgt.shape:
                raise CheckpointError(f"{f.path}: tensor {key!r} has shape "
                                      f"{list(f.entries[key][1])}, the model's {name!r} is "
                                      f"{list(tgt.shape)}")
            buf = torch.empty(tgt.local_shape(), dtype=tgt.dtype)
            for tb in blocks(tgt.shape, tgt.spec, tgt.rank):
                box = overlap(tgt.shape, tb, (None, 0, 0, 0))
                part = f.read(key, [(s0, n) for _, s0, n in box])
                buf[tuple(slice(t0, t0 + n) for t0, _, n in box)].copy_(part)  # casts dtype
            staged[name] = buf
        if missing_params and not can_init(model, missing_params):
            raise CheckpointError(f"{directory} does not hold the model's parameters "
                                  f"{missing_params[:5]}{' ...' if len(missing_params) > 5 else ''}"
                                  f" ({len(missing_params)} missing), and the model has no "
                                  f"HuggingFace _init_weights to initialise them")
        buffers = computed_buffers(model, [id(tensors[n]) for n in staged], f"{directory}: ")
        return staged, buffers, sorted(set(weight_map) - used), missing_params
    try:
        staged, buffers, unexpected, missing = checked(prepare)
    finally:
        last_load.update(bytes_read=sum(f.bytes_read for f in files.values()), files=sorted(files))
        for f in files.values():
            f.close()

    with torch.no_grad():
        if missing:   # initialised first: loading then overwrites whatever the init touched
            init_missing(model, [tensors[n] for n in missing], [tensors[n] for n in staged])
            warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the "
                          f"model checkpoint at {directory} and are newly initialized: "
                          f"{missing}\nYou should probably TRAIN this model on a down-stream "
                          f"task to be able to use it for predictions and inference.",
                          stacklevel=2)
        for name, t in tensors.items():
            if name in staged:
                fill(t, staged.pop(name))
        reinit = install_buffers(buffers)   # computed in prepare
    return {"missing": missing, "unexpected": unexpected, "reinitialised": reinit}


# --- save_pretrained: refuse before writing anything --------------------------------------------

def guard_save_pretrained() -> None:
    """Wrap HF's `PreTrainedModel.save_pretrained` (once, where transformers is imported) so
    that, called without `state_dict=` on a model holding a tensor-parallel shard, it raises
    UnsupportedOpError naming the recipe before writing anything: it wrote config.json, then
    failed reading the first shard's memory. A serial or tp=1 model, or one given
    `state_dict=`, saves as before. PEFT's `PeftModel.save_pretrained` (where peft is
    imported), which saves the adapters only, is wrapped alike: it refuses when an adapter it
    would save is a shard (it wrote README.md, then failed reading the shard's memory)."""
    import sys
    from .materialise import hf_init_rules
    hf_init_rules()     # (not about saving: parallelize installs this where transformers is)
    for module, name, refuse in (("transformers.modeling_utils", "PreTrainedModel", _refuse_shards),
                                 ("peft.peft_model", "PeftModel", _refuse_adapter_shards)):
        cls = getattr(sys.modules.get(module), name, None)
        save = cls.__dict__.get("save_pretrained") if cls is not None else None
        if save is not None and not getattr(save, "_shardtensor_guard", False):
            cls.save_pretrained = _guarded(save, refuse)


def _guarded(save, refuse):
    import functools
    import inspect
    sig = inspect.signature(save)

    @functools.wraps(save)
    def save_pretrained(self, *args, **kwargs):
        try:
            given = sig.bind_partial(self, *args, **kwargs).arguments
        except TypeError:   # HF's own error for bad arguments
            return save(self, *args, **kwargs)
        # HF takes state_dict= as a parameter, PEFT in its **kwargs
        if given.get("state_dict", given.get("kwargs", {}).get("state_dict")) is None:
            refuse(self, f"{type(self).__name__}.save_pretrained", given)
        return save(self, *args, **kwargs)
    save_pretrained._shardtensor_guard = True
    return save_pretrained


def _refuse_adapter_shards(model: nn.Module, where: str, given: dict) -> None:
    """_refuse_shards over what PEFT's save_pretrained would save: each selected adapter's
    state dict, as PEFT computes it (LoRA's A or B is a shard in a parallelized model)."""
    adapters = given.get("selected_adapters")
    if adapters is None:            # PEFT: None is every adapter, [] is none
        adapters = list(getattr(model, "peft_config", ()))
    if any(a not in getattr(model, "peft_config", ()) for a in adapters):
        return          # PEFT's own error for an unknown adapter, raised before it writes
    try:
        from peft.utils import get_peft_model_state_dict
        sds = [get_peft_model_state_dict(model, adapter_name=a, save_embedding_layers=given.get(
            "save_embedding_layers", "auto")) for a in adapters]
    except Exception:   # another peft: check every tensor of the model
        return _refuse_shards(model, where)
    _refuse_shards(model, where, tensors=[kv for sd in sds for kv in sd.items()])


def _refuse_shards(model: nn.Module, where: str, given=None, tensors=None) -> None:
    """UnsupportedOpError (the recipe) if `model` (or `tensors`, (name, tensor) pairs) holds a
    shard of a tensor at tp > 1."""
    from .dispatch import UnsupportedOpError
    from .tensor import ShardedTensor
    if tensors is None:
        tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if type(t) is ShardedTensor and not t.spec.is_replicate and t.pg.tp_world_size() > 1:
            raise UnsupportedOpError(
                f"{where}: {name!r} is a ShardedTensor with {t.spec!r}: this rank holds only its "
                f"shard of shape {tuple(t.to_local().shape)} of the global shape "
                f"{tuple(t.shape)}, and save_pretrained reads tensors through their memory. "
                f"Nothing was written. Call on every rank model.save_pretrained(path, "
                f"state_dict=shardtensor.full_state_dict(model), "
                f"is_main_process=(torch.distributed.get_rank() == 0)), or save a sharded "
                f"checkpoint with shardtensor.save(model, path)")
