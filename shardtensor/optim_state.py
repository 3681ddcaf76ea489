"""Optimizer state in sharded checkpoints, keyed by parameter names so it reshards.

A state tensor shaped like its parameter (Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer) is
saved with the parameter's layout, whether it is a ShardedTensor ("param") or the plain local
shard an optimizer over `p.to_local()` tensors makes ("local"). Anything else (Adam's `step`) is a
plain replicated tensor ("plain"); Python numbers and the param groups' hyperparameters go in the
index. Loading lays every state tensor out like the loading model's parameter, at its tp degree,
as the loading optimizer would make it: a ShardedTensor for a ShardedTensor parameter, a plain
tensor for a plain one (e.g. an optimizer over `p.to_local()` shards).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .checkpoint import (INDEX, REPLICA, Entry, Reader, Target, pg_of, read_index, resolve,
                         stage)
from .checkpoint_io import CheckpointError, checked
from .tensor import ShardedTensor, wrap


def _param_names(optimizer, model: Optional[nn.Module]) -> Dict[int, str]:
    """id(param) -> name, for the optimizer's params (a ShardedTensor's shard maps too)."""
    if model is None:
        return {id(p): f"group{g}.param{i}" for g, grp in enumerate(optimizer.param_groups)
                for i, p in enumerate(grp["params"])}
    names = {}
    for n, p in model.named_parameters():
        names[id(p)] = n
        if isinstance(p, ShardedTensor):
            names.setdefault(id(p._local), n)
    return names


def _params_by_name(optimizer, model) -> Dict[str, torch.Tensor]:
    """name -> the model's parameter (the ShardedTensor, even if the optimizer holds its shard)."""
    if model is None:
        return {f"group{g}.param{i}": p for g, grp in enumerate(optimizer.param_groups)
                for i, p in enumerate(grp["params"])}
    return dict(model.named_parameters())


def _name(names, p) -> str:
    try:
        return names[id(p)]
    except KeyError:
        raise CheckpointError(f"an optimizer parameter of shape {tuple(p.shape)} is not a "
                              f"parameter of the model passed as model=") from None


def _to_json(key, v):
    if isinstance(v, tuple):
        return {"__tuple__": [_to_json(key, x) for x in v]}
    if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor) and v.numel() == 1:
        return {"__tensor__": v.item(), "dtype": str(v.dtype).replace("torch.", ""),
                "shape": list(v.shape)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_to_json(key, x) for x in v]
    raise CheckpointError(f"optimizer setting {key!r} = {v!r} cannot be saved in the index")


def _from_json(v):
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_from_json(x) for x in v["__tuple__"])
    if isinstance(v, dict) and "__tensor__" in v:
        return torch.tensor(v["__tensor__"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def optimizer_entries(optimizer, model):
    """The entries, aliases, index extras and process group for saving `optimizer`."""
    names = _param_names(optimizer, model)
    params = _params_by_name(optimizer, model)
    entries: List[Entry] = []
    groups, state_meta = [], {}
    for g, grp in enumerate(optimizer.param_groups):
        pnames = [_name(names, p) for p in grp["params"]]
        groups.append({"params": pnames, **{k: _to_json(k, v) for k, v in grp.items() if k != "params"}})
        for p, pname in zip(grp["params"], pnames):
            st = optimizer.state.get(p)
            if not st:
                continue
            param = params[pname]
            meta = state_meta[pname] = {}
            for key, v in st.items():
                ename = f"state.{pname}.{key}"
                if not isinstance(v, torch.Tensor):
                    meta[key] = {"value": _to_json(key, v)}
                    continue
                if isinstance(v, ShardedTensor):
                    entries.append(Entry(ename, v))
                    kind = "param"
                elif (isinstance(param, ShardedTensor) and v.dim() > 0
                      and v.shape == param._local.shape):
                    entries.append(Entry(ename, v, like=param))
                    kind = "local"
                else:
                    kind = "param" if (v.dim() > 0 and v.shape == param.shape) else "plain"
                    entries.append(Entry(ename, v))
                meta[key] = {"tensor": ename, "kind": kind}
    extra = {"optimizer": {"type": type(optimizer).__name__, "param_groups": groups,
                           "state": state_meta}}
    return entries, {}, extra, pg_of(params.values())


def _placed(value: torch.Tensor, local: torch.Tensor, key: str, group: dict) -> torch.Tensor:
    """Where and in what dtype torch's Optimizer.load_state_dict puts a state tensor: 'step'
    stays as saved (on the CPU) unless the group is fused or capturable (then float32 on the
    parameter's device); the rest goes to the parameter's device, floating in its dtype."""
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return value.to(dtype=torch.float32, device=local.device)
        return value
    if local.is_floating_point():
        return value.to(dtype=local.dtype, device=local.device)
    return value.to(device=local.device)


def _first_difference(mine: List[List[str]], theirs: List[List[str]]) -> str:
    """Where the loading optimizer's parameter names first differ from the saved ones."""
    sizes = f"(groups of {[len(m) for m in mine]} parameters here, {[len(t) for t in theirs]} saved)"
    for g, (m, t) in enumerate(zip(mine, theirs)):
        for i, (a, b) in enumerate(zip(m, t)):
            if a != b:
                hint = ""
                if a.startswith("group") != b.startswith("group"):
                    hint = ("; 'groupG.paramI' names an optimizer saved or loaded without model=: "
                            "pass the model to both st.save and st.load")
                return f"group {g} parameter {i} is {a!r} here, {b!r} saved {sizes}{hint}"
    return f"the numbers differ {sizes}"


def load_optimizer(optimizer, path: str, model: Optional[nn.Module]) -> None:
    names = _param_names(optimizer, model)
    params = _params_by_name(optimizer, model)
    reader = None

    def prepare():
        nonlocal reader
        root = resolve(path)
        index = read_index(root)
        where = os.path.join(root, INDEX)
        if index.get("kind") != "optimizer":
            raise CheckpointError(f"checkpoint {where} holds a {index.get('kind')} state, not an "
                                  f"optimizer's")
        saved = index["optimizer"]
        if saved["type"] != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {where} holds {saved['type']} state, the "
                                  f"optimizer is {type(optimizer).__name__}")
        mine = [[_name(names, p) for p in grp["params"]] for grp in optimizer.param_groups]
        theirs = [grp["params"] for grp in saved["param_groups"]]
        if mine != theirs:
            raise CheckpointError(f"checkpoint {where}: the optimizer's parameters differ from "
                                  f"the saved ones: {_first_difference(mine, theirs)}")
        targets, found = {}, {}
        for pname, meta in saved["state"].items():
            param = params[pname]
            for key, m in meta.items():
                if "tensor" not in m:
                    continue
                ename, tmeta = m["tensor"], index["tensors"].get(m["tensor"])
                if tmeta is None:
                    raise CheckpointError(f"checkpoint {where} lists no tensor {ename!r}")
                dtype = getattr(torch, tmeta["dtype"])
                if m["kind"] == "plain":
                    targets[ename] = Target.like(ename, tmeta["shape"], dtype, REPLICA, 0)
                else:
                    t = Target(ename, param)
                    targets[ename] = Target.like(ename, t.shape, dtype, t.spec, t.rank)
                found[ename] = ename
        reader = Reader(root, index)
        return saved, stage(targets, found, reader, where)
    try:
        saved, staged = checked(prepare)
    finally:
        if reader is not None:
            reader.close()
    # everything is read and checked on every rank: now replace the state
    by_name = {}
    for grp in optimizer.param_groups:
        for p in grp["params"]:
            by_name[_name(names, p)] = p
    group_of = {id(p): sgrp for grp, sgrp in zip(optimizer.param_groups, saved["param_groups"])
                for p in grp["params"]}
    optimizer.state.clear()
    for pname, meta in saved["state"].items():
        p = by_name[pname]
        local = p._local if isinstance(p, ShardedTensor) else p
        new = {}
        for key, m in meta.items():
            if "value" in m:
                new[key] = _from_json(m["value"])
                continue
            buf = _placed(staged[m["tensor"]], local, key, group_of[id(p)])
            if m["kind"] != "plain" and isinstance(p, ShardedTensor):
                buf = wrap(buf, p._spec, p._pg, p._gshape)   # laid out like the param
            new[key] = buf
        optimizer.state[p] = new
    for grp, sgrp in zip(optimizer.param_groups, saved["param_groups"]):
        for k, v in sgrp.items():
            if k != "params":
                grp[k] = _from_json(v)
