"""Sharded checkpoints: every tensor-parallel rank writes its shards, rank 0 writes one index.

A checkpoint is a directory:

    index.json                       written last; names every tensor and every file
    tp00000-of-00002.safetensors     tp rank 0's shards, and every replicated tensor
    tp00001-of-00002.safetensors     tp rank 1's shards

Only data-parallel rank 0 of each tensor-parallel group writes (the replicas are identical).
`index.json` holds, per tensor, its global shape, dtype and layout (`{"type": "shard", "dim",
"degree", "stride"}` or `{"type": "replicate"}`) and its pieces: which file holds which global
index ranges along the sharded dim, in the file's local order. It also holds each file's sha256
and size, the names of tied tensors (`aliases`), and for an optimizer its hyperparameters.

Loading computes, for each tensor, the global index ranges this rank needs under the *loading*
model's layout (any tp x dp degree) and reads only those byte ranges from the files (a plain
safetensors parser over `os.preadv`: no pickle, no mmap). Every check (checksums, names, shapes,
dtypes) runs before the model is touched and its outcome is agreed over the whole world, so a
bad checkpoint raises the same error on every rank and changes nothing.

Saving is atomic: files go to `<path>.partial/`, are fsynced, and the finished directory replaces
`<path>` by two renames (`<path>` -> `<path>.old`, `<path>.partial` -> `<path>`). A crash leaves
either the previous checkpoint at `<path>` or, between the two renames, at `<path>.old`, which
`load` falls back to.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .checkpoint_io import (CheckpointError, SafetensorsFile, checked, fsync_dir, gather_bytes,
                            overlap, world_info, write_durable, agree, blocks, dtype_name,
                            sha256_file, spec_to_json)
from .groups import ProcessGroup
from .materialise import computed_buffers, fill, install_buffers
from .spec import ReplicaSpec, local_shape
from .tensor import ShardedTensor

__all__ = ["save", "load", "full_state_dict", "CheckpointError"]

FORMAT, VERSION, INDEX = "shardtensor.checkpoint", 1, "index.json"
REPLICA = ReplicaSpec()

# What the last load on this rank read: {"bytes_read": payload bytes (checksums aside), "files": [...]}
last_load: dict = {}

# Test hook: called as _crash_hook(stage) at "shards_written" and "swapping"; crash tests make it
# sleep there and kill the process.
_crash_hook = None


# --- what a model or state dict holds ------------------------------------------------------------

class Entry:
    """One tensor to save: its local data, global shape and layout."""
    __slots__ = ("name", "local", "shape", "dtype", "spec")

    def __init__(self, name, t, like=None):
        self.name = name
        if like is not None:  # a plain local shard laid out like the ShardedTensor `like`
            self.local, self.shape, self.spec, self.dtype = t, tuple(like._gshape), like._spec, t.dtype
            return
        if isinstance(t, ShardedTensor):
            if t._spec.is_partial:
                raise CheckpointError(f"tensor {name!r} is PartialSpec (a pending sum); call "
                                      f".redistribute(ReplicaSpec()) before saving it")
            self.local, self.shape, self.spec = t._local, tuple(t._gshape), t._spec
        else:
            self.local, self.shape, self.spec = t, tuple(t.shape), REPLICA
        self.dtype = t.dtype

    def meta(self) -> dict:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "spec": spec_to_json(self.spec)}


def tie_key(t: torch.Tensor):
    """What makes state entries one tensor: the same view (offset, shape, strides, dtype) of the
    same memory, for a ShardedTensor that of its shard under the same layout. `state_dict()`
    without keep_vars gives every name a fresh detached tensor, so identity alone misses ties.
    A tensor without memory (meta, empty) is only tied to itself."""
    local = t._local if isinstance(t, ShardedTensor) else t
    try:
        ptr = 0 if local.is_meta else local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage to ask (sparse, ...)
        ptr = 0
    if ptr == 0:
        return id(t)
    layout = (t._spec, tuple(t._gshape)) if isinstance(t, ShardedTensor) else None
    return (local.device, ptr, local.storage_offset(), tuple(local.shape), local.stride(),
            local.dtype, layout)


def unique_tensors(state: Dict[str, object]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tied tensors (one tensor, see `tie_key`, under several names) once, under their first
    name, + aliases."""
    first: Dict[object, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        key = tie_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t
    return tensors, aliases


def pg_of(tensors) -> Optional[ProcessGroup]:
    return next((t._pg for t in tensors if isinstance(t, ShardedTensor)), None)


# --- save ---------------------------------------------------------------------------------------

def save(obj, path: str, *, model: Optional[nn.Module] = None) -> None:
    """Collective: write `obj` (an nn.Module, a state dict of tensors/ShardedTensors, or a
    torch.optim optimizer with `model=` naming its parameters) as a sharded checkpoint directory
    at `path`, atomically (the previous checkpoint there stays loadable until the new one is
    complete)."""
    extra: dict = {}
    if isinstance(obj, torch.optim.Optimizer):
        from .optim_state import optimizer_entries
        entries, aliases, extra, pg = optimizer_entries(obj, model)
        kind = "optimizer"
    else:
        state = obj.state_dict(keep_vars=True) if isinstance(obj, nn.Module) else dict(obj)
        tensors, aliases = unique_tensors(state)
        entries = [Entry(n, t) for n, t in tensors.items()]
        kind, pg = "model", pg_of(tensors.values())
    write(entries, aliases, path, kind, extra, pg)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with storage of its own (safetensors refuses shared storage)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def write(entries: List[Entry], aliases: Dict[str, str], path: str, kind: str, extra: dict,
          pg: Optional[ProcessGroup]) -> None:
    rank, world = world_info()
    if pg is not None and pg.topology.pp_degree > 1:
        raise NotImplementedError("shardtensor.save: pipeline-parallel groups are not supported yet")
    tp_rank, tp = (pg.tp_local_rank(), pg.tp_world_size()) if pg else (0, 1)
    writer = (pg.dp_local_rank() == 0) if pg else rank == 0
    final = os.path.abspath(path)
    tmp, old = final + ".partial", final + ".old"

    def prepare():
        if os.path.exists(final) and not os.path.exists(os.path.join(final, INDEX)):
            raise CheckpointError(f"shardtensor.save: {final} exists and is not a shardtensor "
                                  f"checkpoint; refusing to replace it")
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        os.makedirs(tmp)
    checked(prepare if rank == 0 else (lambda: None))

    name = f"tp{tp_rank:05d}-of-{tp:05d}.safetensors"
    meta = json.dumps([[e.name, e.meta()] for e in entries] + [aliases, kind], sort_keys=True)
    record = b""

    def write_shards():
        from safetensors.torch import save as st_save
        mine = {e.name: _own(e.local) for e in entries if e.spec.is_shard or tp_rank == 0}
        data = st_save(mine, metadata={"format": "pt"})
        write_durable(os.path.join(tmp, name), data)
        return hashlib.sha256(data).hexdigest().encode() + struct.pack("<Q", len(data))
    if writer:
        record = checked(write_shards)
    else:
        agree(None)
    if _crash_hook:
        _crash_hook("shards_written")
    digest = hashlib.sha256(meta.encode()).hexdigest().encode()
    records = gather_bytes(digest + record, 200) if world > 1 else [digest + record]

    def finish():
        if any(r[:64] != digest for r in records):
            bad = [i for i, r in enumerate(records) if r[:64] != digest]
            raise CheckpointError(f"shardtensor.save: ranks {bad} hold different tensors (names, "
                                  f"shapes, dtypes or layouts) than rank 0; every rank must save "
                                  f"the same model")
        files = {}
        for r in (pg.tp_rank_list() if pg else [0]):
            rec = records[r][64:]
            t = pg.tp_rank_list().index(r) if pg else 0
            files[f"tp{t:05d}-of-{tp:05d}.safetensors"] = {
                "sha256": rec[:64].decode(), "bytes": struct.unpack("<Q", rec[64:72])[0]}
        tensors = {}
        for e in entries:
            m = e.meta()
            if e.spec.is_shard:
                m["pieces"] = [{"file": f"tp{t:05d}-of-{tp:05d}.safetensors", "key": e.name,
                                "blocks": [list(b) for b in blocks(e.shape, e.spec, t)]}
                               for t in range(tp)]
            else:
                m["pieces"] = [{"file": f"tp{0:05d}-of-{tp:05d}.safetensors", "key": e.name,
                                "blocks": [[None, 0, 0, 0]]}]
            tensors[e.name] = m
        index = {"format": FORMAT, "version": VERSION, "kind": kind,
                 "saved_with": {"tp_degree": tp, "world_size": world},
                 "files": files, "tensors": tensors, "aliases": aliases, **extra}
        write_durable(os.path.join(tmp, INDEX), json.dumps(index, indent=1).encode())
        fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        if _crash_hook:
            _crash_hook("swapping")
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
        shutil.rmtree(old, ignore_errors=True)
    checked(finish if rank == 0 else (lambda: None))


# --- load ---------------------------------------------------------------------------------------

def resolve(path: str) -> str:
    """The complete checkpoint at `path`, or at `path`.old if a save died between its renames."""
    final = os.path.abspath(path)
    if os.path.exists(os.path.join(final, INDEX)):
        return final
    if os.path.exists(os.path.join(final + ".old", INDEX)):
        warnings.warn(f"shardtensor.load: {final} is incomplete (a save was interrupted); "
                      f"loading the previous checkpoint {final}.old")
        return final + ".old"
    raise CheckpointError(f"no shardtensor checkpoint at {final} (no {INDEX})")


def read_index(root: str) -> dict:
    p = os.path.join(root, INDEX)
    try:
        with open(p, "rb") as f:
            index = json.loads(f.read())
    except ValueError as e:
        raise CheckpointError(f"checkpoint index {p} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a shardtensor checkpoint index")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{p} has format version {index.get('version')}; this shardtensor "
                              f"reads version {VERSION}")
    return index


class Target:
    """A tensor to fill: its global shape, dtype, layout and this rank's local shape."""
    __slots__ = ("name", "shape", "dtype", "spec", "rank")

    def __init__(self, name, t):
        self.name = name
        if isinstance(t, ShardedTensor):
            self.shape, self.spec, self.rank = tuple(t._gshape), t._spec, t._pg.tp_local_rank()
        else:
            self.shape, self.spec, self.rank = tuple(t.shape), REPLICA, 0
        self.dtype = t.dtype

    @classmethod
    def like(cls, name, shape, dtype, spec, rank) -> "Target":
        t = cls.__new__(cls)
        t.name, t.shape, t.dtype, t.spec, t.rank = name, tuple(shape), dtype, spec, rank
        return t

    def local_shape(self):
        return local_shape(self.shape, self.spec, self.rank)


class Reader:
    """Reads the pieces a rank needs from a checkpoint's files, verifying each file once."""

    def __init__(self, root: str, index: dict, verify: bool = True):
        self.root, self.index, self.verify, self.files = root, index, verify, {}

    def file(self, fname: str) -> SafetensorsFile:
        f = self.files.get(fname)
        if f is None:
            path = os.path.join(self.root, fname)
            info = self.index["files"].get(fname) if self.verify else None
            if self.verify:
                if info is None:
                    raise CheckpointError(f"checkpoint file {path} is not listed in {INDEX}")
                if not os.path.exists(path):
                    raise CheckpointError(f"checkpoint file {path} is missing")
                size = os.path.getsize(path)
                if size != info["bytes"]:
                    raise CheckpointError(f"checkpoint file {path} has {size} bytes, the index "
                                          f"says {info['bytes']} (truncated or replaced?)")
                if sha256_file(path) != info["sha256"]:
                    raise CheckpointError(f"checkpoint file {path} fails its sha256 checksum "
                                          f"(corrupted, or the index does not belong to it)")
            f = self.files[fname] = SafetensorsFile(path)
        return f

    def fill(self, target: Target, meta: dict, out: torch.Tensor) -> None:
        """Fill `out` (this rank's local piece of `target`) from the pieces listed in `meta`."""
        covered = 0
        shape = target.shape
        for tb in blocks(shape, target.spec, target.rank):
            for piece in meta["pieces"]:
                f = self.file(piece["file"])
                key = piece["key"]
                if key not in f.entries:
                    raise CheckpointError(f"checkpoint file {f.path} has no tensor {key!r}")
                dt, fshape, _ = f.entries[key]
                if dt != out.dtype:
                    raise CheckpointError(f"checkpoint file {f.path}: tensor {key!r} is {dt}, "
                                          f"the index says {out.dtype}")
                for sb in piece["blocks"]:
                    box = overlap(shape, tb, tuple(sb))
                    if box is None:
                        continue
                    if any(s0 + n > fs for (_, s0, n), fs in zip(box, fshape)) or len(fshape) != len(shape):
                        raise CheckpointError(f"checkpoint file {f.path}: tensor {key!r} of shape "
                                              f"{list(fshape)} does not hold the piece the index "
                                              f"says")
                    part = f.read(key, [(s0, n) for _, s0, n in box])
                    out[tuple(slice(t0, t0 + n) for t0, _, n in box)].copy_(part)
                    covered += part.numel()
        if covered != out.numel():
            raise CheckpointError(f"checkpoint {self.root}: the pieces of {target.name!r} cover "
                                  f"{covered} of the {out.numel()} elements this rank needs")

    def close(self):
        last_load.update(bytes_read=sum(f.bytes_read for f in self.files.values()),
                         files=sorted(self.files))
        for f in self.files.values():
            f.close()
        self.files.clear()


def match(targets: Dict[str, List[str]], index: dict, where: str,
          strict: bool = True) -> Tuple[Dict[str, str], List[str], List[str]]:
    """Target name -> checkpoint tensor name, through tied names, and the names (every tied
    name) missing from the checkpoint and unexpected in it; with `strict` either is an error."""
    names, aliases = index["tensors"], index.get("aliases", {})
    found, missing = {}, []
    for name, all_names in targets.items():
        hit = next((aliases.get(n, n) for n in all_names if aliases.get(n, n) in names), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    unexpected = sorted(set(names) - set(found.values()))
    if strict and (missing or unexpected):
        msg = f"checkpoint {where} does not match the model:"
        if missing:
            msg += f" missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)});"
        if unexpected:
            msg += (f" unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                    f" ({len(unexpected)})")
        raise CheckpointError(msg + " (st.load(..., strict=False) loads the tensors that match)")
    gone = set(unexpected)
    unexpected_keys = sorted(unexpected + [a for a, n in aliases.items() if n in gone])
    return found, [n for m in missing for n in targets[m]], unexpected_keys


def check_meta(target: Target, meta: dict, where: str) -> None:
    if list(target.shape) != meta["shape"] or dtype_name(target.dtype) != meta["dtype"]:
        raise CheckpointError(f"checkpoint {where}: tensor {target.name!r} is {meta['dtype']} "
                              f"{meta['shape']}, the model's is {dtype_name(target.dtype)} "
                              f"{list(target.shape)}")


def stage(targets: Dict[str, Target], found: Dict[str, str], reader: Reader, where: str):
    """Read every target's local piece into new tensors (the model is not touched)."""
    out = {}
    for name, tgt in targets.items():
        meta = reader.index["tensors"][found[name]]
        check_meta(tgt, meta, where)
        buf = torch.empty(tgt.local_shape(), dtype=tgt.dtype)
        reader.fill(tgt, meta, buf)
        out[name] = buf
    return out


def load(obj, path: str, *, model: Optional[nn.Module] = None, strict: bool = True):
    """Collective: load the checkpoint at `path` into `obj` (an nn.Module, or an optimizer with
    `model=`), at whatever tp x dp layout `obj` has now. Verifies checksums, names, shapes and
    dtypes first; on any problem raises CheckpointError on every rank and changes nothing.
    A model built on the meta device is materialised (as `load_pretrained` does). For a model,
    returns torch's (missing_keys, unexpected_keys); `strict=False` loads what matches, as
    `load_state_dict(strict=False)` does, instead of refusing a checkpoint that differs."""
    if isinstance(obj, torch.optim.Optimizer):
        from .optim_state import load_optimizer
        return load_optimizer(obj, path, model)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"shardtensor.load: expected an nn.Module or a torch.optim optimizer, got "
                        f"{type(obj).__name__}")
    tensors, aliases = unique_tensors(obj.state_dict(keep_vars=True))
    names: Dict[str, List[str]] = {n: [n] for n in tensors}
    for a, n in aliases.items():
        names[n].append(a)
    reader = None

    def prepare():
        nonlocal reader
        root = resolve(path)
        index = read_index(root)
        if index.get("kind") != "model":
            raise CheckpointError(f"checkpoint {root} holds a {index.get('kind')} state, not a "
                                  f"model's")
        where = os.path.join(root, INDEX)
        found, missing, unexpected = match(names, index, where, strict)
        params = {id(p) for p in obj.parameters()}
        empty = [n for n, t in tensors.items() if n not in found and t.is_meta and id(t) in params]
        if empty:   # (strict=False)
            raise CheckpointError(f"shardtensor.load: parameters {empty[:5]} are on the meta "
                                  f"device and not in the checkpoint {root}: nothing to fill "
                                  f"them with")
        buffers = computed_buffers(obj, [id(tensors[n]) for n in found],
                                   f"shardtensor.load: checkpoint {root}: ")
        reader = Reader(root, index)
        targets = {n: Target(n, tensors[n]) for n in found}
        return stage(targets, found, reader, where), buffers, missing, unexpected
    try:
        staged, buffers, missing, unexpected = checked(prepare)
    finally:
        if reader is not None:
            reader.close()
    with torch.no_grad():
        for name, buf in staged.items():
            fill(tensors[name], buf)   # copies in place; materialises a meta tensor
        install_buffers(buffers)   # meta buffers outside the checkpoint, computed above
    return _IncompatibleKeys(missing, unexpected)


# --- gathering a full state dict -----------------------------------------------------------------

def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Collective: global rank 0 gets `model.state_dict()` as plain full tensors (the serial
    model's names; tied names share one tensor, as HF's state dict has them); others get {}."""
    from .collectives import redistribute_local
    rank, _ = world_info()
    state = model.state_dict(keep_vars=True)
    pg = pg_of(state.values())
    if rank != 0 and (pg is None or pg.tp_rank_list()[0] != 0):
        return {}  # only the tensor-parallel group holding rank 0 gathers
    done: Dict[object, torch.Tensor] = {}
    out = {}
    with torch.no_grad():
        for name, t in state.items():
            key = tie_key(t)
            if key not in done:
                if isinstance(t, ShardedTensor):
                    # contiguous, as the serial parameter is (a gathered dim-1 split is a
                    # view; safetensors' save_file refuses non-contiguous tensors)
                    full = redistribute_local(t._local.detach(), t._spec, REPLICA, t._gshape,
                                              t._pg, "full_state_dict").contiguous()
                else:
                    full = t.detach()
                done[key] = full
            out[name] = done[key]
    return out if rank == 0 else {}
