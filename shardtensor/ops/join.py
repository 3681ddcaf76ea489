"""Slicing and joining: narrow, select, split/chunk/tensor_split/unbind, indexing, cat/stack.

A slice of a sharded dim is local when every rank's part of the slice is exactly its shard of
the result: a fused q|k|v dim (a stride-3 shard) split into its three blocks gives three plain
shards; otherwise the dim is gathered, sliced and re-sharded. Concatenating shards along their
sharded dim gives a strided shard when the parts have equal blocks (q|k|v again).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch

from ..collectives import copy_to_region
from ..dispatch import UnsupportedOpError
from ..spec import shard_ranges
from ..tensor import copy_view
from ._util import (PARTIAL, REPLICA, ST, ShardSpec, check_index, group_of, local_index, rule,
                    shard_spec, spec_of, to_layout, wrap)

T = torch.Tensor


# --- slicing a sharded dim ----------------------------------------------------------------------

def _merge(ranges):
    out = []
    for a, l in ranges:
        if not l:
            continue
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + l)
        else:
            out.append((a, l))
    return out


@lru_cache(maxsize=4096)
def slice_plan(size: int, spec: ShardSpec, start: int, length: int):
    """(stride of the result's shard, ((local start, local length) per rank)) when the slice
    [start, start+length) of a sharded dim of `size` is local on every rank, else None."""
    n, s = spec.degree, spec.stride
    block = size // s
    cands = [1]
    if block and length and start % block == 0 and length % block == 0 and length // block > 1:
        cands.append(length // block)
    stop = start + length
    for s2 in cands:
        per = []
        for r in range(n):
            got, lstart, before = [], None, 0
            for a, l in shard_ranges(size, n, s, r):
                lo, hi = max(a, start), min(a + l, stop)
                if hi > lo:
                    got.append((lo - start, hi - lo))
                    if lstart is None:
                        lstart = before + lo - a
                before += l
            if _merge(got) != _merge(shard_ranges(length, n, s2, r)):
                break
            per.append((lstart or 0, sum(l for _, l in got)))
        else:
            return s2, tuple(per)
    return None


def _slices(x, dim: int, bounds: List[Tuple[int, int]], func) -> List[ST]:
    """The pieces x.narrow(dim, start, length) for (start, length) in `bounds`."""
    spec, g, pg = x._spec, tuple(x._gshape), x._pg
    shapes = [g[:dim] + (l,) + g[dim + 1:] for _, l in bounds]
    if not (spec.is_shard and spec.dim == dim):
        return [wrap(x._local.narrow(dim, a, l), spec, pg, sh) for (a, l), sh in zip(bounds, shapes)]
    rank, full, out = pg.tp_local_rank(), None, []
    for (a, l), sh in zip(bounds, shapes):
        plan = slice_plan(g[dim], spec, a, l)
        if plan is not None:
            s2, per = plan
            ls, ll = per[rank]
            out.append(wrap(x._local.narrow(dim, ls, ll), shard_spec(dim, spec.degree, s2), pg, sh))
            continue
        if full is None:   # one gather serves every piece that is not local
            full = to_layout(x, REPLICA, pg, func)
        o = shard_spec(dim, spec.degree)
        out.append(wrap(to_layout(full.narrow(dim, a, l), o, pg, func), o, pg, sh))
    return out


def _bounds(sizes):
    out, a = [], 0
    for l in sizes:
        out.append((a, l))
        a += l
    return out


@rule(T.narrow, torch.narrow)
def narrow(func, args, kwargs):
    x = args[0]
    dim, start, length = (tuple(args[1:]) + tuple(kwargs[k] for k in ("dim", "start", "length")
                                                  if k in kwargs))[:3]
    g = x._gshape
    dim %= len(g)
    start = int(start) % g[dim] if int(start) < 0 else int(start)
    return _slices(x, dim, [(start, int(length))], func)[0]


@rule(T.split, torch.split, T.split_with_sizes, torch.split_with_sizes)
def split(func, args, kwargs):
    x = args[0]
    sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections",
                                                     kwargs.get("split_size", kwargs.get("split_sizes")))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    n = x._gshape[dim]
    if isinstance(sizes, int):
        sizes = [sizes] * (n // sizes) + ([n % sizes] if n % sizes or n == 0 else []) if sizes else [n]
    return tuple(_slices(x, dim % len(x._gshape), _bounds(sizes), func))


@rule(T.chunk, torch.chunk)
def chunk(func, args, kwargs):
    x = args[0]
    chunks = args[1] if len(args) > 1 else kwargs["chunks"]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    n = x._gshape[dim]
    step = -(-n // chunks) if n else 0
    sizes = [min(step, n - a) for a in range(0, n, step)] if step else [0] * chunks
    return tuple(_slices(x, dim % len(x._gshape), _bounds(sizes), func))


@rule(T.tensor_split, torch.tensor_split)
def tensor_split(func, args, kwargs):
    x = args[0]
    how = args[1] if len(args) > 1 else kwargs.get("indices_or_sections",
                                                   kwargs.get("sections", kwargs.get("indices")))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    n = x._gshape[dim]
    if isinstance(how, torch.Tensor):
        how = how.tolist()
    if isinstance(how, int):
        q, r = divmod(n, how)
        sizes = [q + (1 if i < r else 0) for i in range(how)]
        bounds = _bounds(sizes)
    else:
        cuts = [0] + [min(max(c if c >= 0 else c + n, 0), n) for c in how] + [n]
        bounds = [(a, max(b - a, 0)) for a, b in zip(cuts, cuts[1:])]
    return tuple(_slices(x, dim % len(x._gshape), bounds, func))


@rule(T.unbind, torch.unbind)
def unbind(func, args, kwargs):
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(x._gshape)
    return tuple(_select(x, dim, i, func) for i in range(x._gshape[dim]))


def _select(x, dim: int, i: int, func):
    """x.select(dim, i): local off the sharded dim; on it, the one rank holding index i
    contributes the slice and the others zeros, so the result is a PartialSpec value."""
    spec, g, pg = x._spec, tuple(x._gshape), x._pg
    shape = g[:dim] + g[dim + 1:]
    i %= g[dim]
    if not (spec.is_shard and spec.dim == dim):
        if spec.is_shard and spec.dim > dim:
            spec = shard_spec(spec.dim - 1, spec.degree, spec.stride)
        return wrap(x._local.select(dim, i), spec, pg, shape)
    return wrap(_owner_slice(x, dim, i).squeeze(dim), PARTIAL, pg, shape)


def _owner_slice(x, dim, i):
    """Size-1 slice of the sharded dim at global index i on its owner, zeros elsewhere (still in
    the autograd graph on every rank)."""
    spec = x._spec
    pos, before = None, 0
    for a, l in shard_ranges(x._gshape[dim], spec.degree, spec.stride, x._pg.tp_local_rank()):
        if a <= i < a + l:
            pos = before + i - a
        before += l
    piece = x._local.narrow(dim, pos or 0, 1 if pos is not None else 0)
    return piece.sum(dim, keepdim=True) if pos is None else piece


@rule(T.select, torch.select)
def select(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs["dim"]
    index = args[2] if len(args) > 2 else kwargs["index"]
    return _select(x, dim % len(x._gshape), int(index), func)


# --- indexing -------------------------------------------------------------------------------------

_SENTINEL = 1000003   # a size no other dim has: marks where the sharded dim lands


def _plain_index(idx, func):
    """The index as a tuple, with sharded index tensors gathered, bool masks as long indices
    and 0-d integer tensors as ints (torch reads them as ints too: speculative sampling's
    `p[:, n_matches, :]`)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for it in idx:
        if type(it) is ST:
            it = to_layout(it, REPLICA, it._pg, func)
        if isinstance(it, list):   # [] is an empty integer index, as torch reads it
            it = torch.tensor(it) if it else torch.zeros(0, dtype=torch.long)
        if isinstance(it, torch.Tensor) and it.dtype == torch.bool:
            out.extend(it.nonzero(as_tuple=True))
            continue
        if isinstance(it, torch.Tensor) and it.dim() == 0 and not it.is_floating_point():
            it = int(it)
        out.append(it)
    return tuple(out)


def _key(it):
    if isinstance(it, torch.Tensor):
        return ("t", tuple(it.shape), it.dtype)
    if isinstance(it, slice):
        return ("s", it.start, it.stop, it.step)
    return it


def _dim_items(idx, nd):
    """For each index item, the input dim it consumes (None for None/Ellipsis)."""
    used = sum(0 if (it is None or it is Ellipsis) else 1 for it in idx)
    out, k = [], 0
    for it in idx:
        if it is Ellipsis:
            out.append(None)
            k += nd - used
        elif it is None:
            out.append(None)
        else:
            out.append(k)
            k += 1
    return out


@lru_cache(maxsize=4096)
def _out_dim(gshape, d, keys):
    """Where the (fully sliced) sharded dim d lands in x[idx]: found on meta tensors."""
    shape = list(gshape)
    shape[d] = _SENTINEL
    idx = tuple(torch.empty(k[1], dtype=k[2], device="meta") if isinstance(k, tuple) and k[0] == "t"
                else slice(k[1], k[2], k[3]) if isinstance(k, tuple) and k[0] == "s" else k
                for k in keys)
    out = torch.empty(shape, device="meta")[idx].shape
    return list(out).index(_SENTINEL), tuple(out)


def _index_plan(x, idx, func):
    """(local index, output spec, output shape) for x[idx] with x sharded; None when the
    sharded dim's own index item is not a plain slice (the caller handles those)."""
    spec, g = x._spec, tuple(x._gshape)
    d = spec.dim
    dims = _dim_items(idx, len(g))
    p = dims.index(d) if d in dims else None
    it = slice(None) if p is None else idx[p]
    if not isinstance(it, slice) or it.step not in (None, 1):
        return None
    start, stop, _ = it.indices(g[d])
    length = max(stop - start, 0)
    keys = tuple(_key(v) if k != p else ("s", None, None, None) for k, v in enumerate(idx))
    od, oshape = _out_dim(g, d, keys)
    oshape = list(oshape)
    oshape[od] = length
    if (start, length) == (0, g[d]):
        return idx, shard_spec(od, spec.degree, spec.stride), tuple(oshape)
    plan = slice_plan(g[d], spec, start, length)
    if plan is None:
        return False, shard_spec(od, spec.degree), tuple(oshape)
    s2, per = plan
    ls, ll = per[x._pg.tp_local_rank()]
    local_idx = idx[:p] + (slice(ls, ls + ll),) + idx[p + 1:]
    return local_idx, shard_spec(od, spec.degree, s2), tuple(oshape)


_BASIC_ITEMS = (slice, int, type(None), type(Ellipsis))


def _basic_getitem(x, idx):
    """x[idx] for basic indexing (slices, ints, None, ...) that leaves a sharded dim whole (or
    a replicated / partial x): local, no planning (rotate_half's `x[..., :h]`, `logits[:, -1]`,
    `tok[:, None]`). None when the general rule is needed."""
    if type(idx) is not tuple:
        idx = (idx,)
    for it in idx:
        if type(it) not in _BASIC_ITEMS:
            return None
    spec = x._spec
    if not spec.is_shard:
        out = x._local[idx]
        return wrap(out, spec, x._pg, out.shape)
    g = x._gshape
    nd, d = len(g), spec.dim
    used = 0
    for it in idx:
        if it is not None and it is not Ellipsis:
            used += 1
    k = o = 0          # the input dim and the output dim the next item addresses
    od = None
    for it in idx:
        if it is Ellipsis:
            n = nd - used
            if k <= d < k + n:
                od = o + d - k
            k += n
            o += n
        elif it is None:
            o += 1
        else:
            if k == d:
                if type(it) is not slice or it.start is not None or it.stop is not None \
                        or it.step is not None:
                    return None
                od = o
            if type(it) is slice:
                o += 1
            k += 1
    if k > nd:
        return None
    if od is None:      # the sharded dim is among the trailing dims no item addressed
        od = o + d - k
    out = x._local[idx]
    shape = list(out.shape)
    shape[od] = g[d]
    return wrap(out, shard_spec(od, spec.degree, spec.stride), x._pg, shape)


@rule(T.__getitem__)
def getitem(func, args, kwargs):
    if type(args[0]) is ST:
        out = _basic_getitem(args[0], args[1])
        if out is not None:
            return out
    x, idx = args[0], _plain_index(args[1], func)
    if type(x) is not ST:   # a plain tensor picked by ShardedTensor indices: a replicated value
        out = x[idx]
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        return wrap(out, REPLICA, group_of(func, *items), out.shape)
    out = _basic_getitem(x, idx)
    if out is not None:     # index tensors that were 0-d ints
        return out
    spec, pg = x._spec, x._pg
    if not spec.is_shard:
        out = x._local[idx]
        return wrap(out, spec, pg, out.shape)
    plan = _index_plan(x, idx, func)
    if spec.degree == 1 and (plan is None or plan[0] is False):   # where a copy would stand for
        out = x._local[idx]          # the view: the shard is the whole tensor, serial's view
        return wrap(out, REPLICA, pg, out.shape)
    if plan is None:
        dims = _dim_items(idx, len(x._gshape))
        p = dims.index(spec.dim)
        if isinstance(idx[p], int):      # an int on the sharded dim: its owner's slice, partial
            i = idx[p] % x._gshape[spec.dim]
            sel = _owner_slice(x, spec.dim, i)
            out = sel[idx[:p] + (0,) + idx[p + 1:]]
            return _copy_of_view(wrap(out, PARTIAL, pg, out.shape), x, args[1])
        if isinstance(idx[p], torch.Tensor) and x._local.is_floating_point():
            return _pick_partial(x, idx, p)
        out = to_layout(x, REPLICA, pg, func)[idx]   # a step on the sharded dim
        return _copy_of_view(wrap(out, REPLICA, pg, out.shape), x, args[1])
    local_idx, ospec, oshape = plan
    if local_idx is False:                # a slice across shard boundaries: gather, re-shard
        out = to_layout(x, REPLICA, pg, func)[idx]
        return _copy_of_view(wrap(to_layout(out, ospec, pg, func), ospec, pg, oshape), x, args[1])
    return wrap(x._local[local_idx], ospec, pg, oshape)


def _copy_of_view(out, x, idx):
    """`out` computed as a copy where serial code gets the view x[idx]: with basic indexing an
    in-place op on it is written back into x (tensor.copy_view); its shard is made a tensor of
    its own (a view of a collective's output cannot be written in place under autograd)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(it, _BASIC_ITEMS) for it in items):
        return out              # advanced indexing gives a copy in serial code too
    if out._local._base is not None:
        out = wrap(out._local.clone(), out._spec, out._pg, out._gshape, out._compute_spec)
    return copy_view(out, x, idx)


def _with_scratch(x, it, func):
    """(x's shard with one scratch slot appended along the sharded dim, the index tensor `it`
    on the sharded dim as local positions: the entries this rank does not hold go to the slot).
    An index outside the dim raises as serial (no host read: check_index)."""
    g, d = x._gshape, x._spec.dim
    it = torch.as_tensor(it)
    check_index(it, g[d], func, d, negative=True)
    it = torch.where(it < 0, it + g[d], it)
    lid, mask = local_index(it, g[d], x._spec, x._pg.tp_local_rank())
    loc = x._local
    lid = torch.where(mask, lid, torch.full_like(lid, loc.shape[d]))
    pad = list(loc.shape)
    pad[d] = 1
    return torch.cat([loc, loc.new_zeros(pad)], d), lid


def _pick_partial(x, idx, p):
    """x[idx] whose item `p` is an index tensor on the sharded dim (speculative sampling's
    `q[:, arange(n), candidate_ids]` on vocab-sharded probabilities): each rank picks the entries
    it holds and zeros for the others, a PartialSpec result; x is never gathered."""
    work, lid = _with_scratch(x, idx[p], T.__getitem__)
    out = work[idx[:p] + (lid,) + idx[p + 1:]]
    return wrap(out, PARTIAL, x._pg, out.shape)


def _local_mask_write(x, mask, v) -> bool:
    """`x[mask] = v` with a bool mask laid out like x and one value for every picked entry
    (nanoGPT's top-k: `logits[logits < v[:, [-1]]] = -inf` on vocab-sharded logits): each rank
    writes its own entries, nothing moves. False where this does not apply."""
    if not (type(x) is ST and mask.dtype == torch.bool and mask._spec == x._spec
            and mask._gshape == x._gshape and x._spec.is_shard and mask._pg == x._pg):
        return False
    if isinstance(v, torch.Tensor):
        if v.dim() or (type(v) is ST and v._spec.is_partial):
            return False
        # every rank reads the whole value: its gradient is the sum of the ranks' (Megatron's f)
        v = copy_to_region(v._local if type(v) is ST else v, x._pg, T.__setitem__)
    x._local[mask._local] = v
    return True


@rule(T.__setitem__)
def setitem(func, args, kwargs):
    if type(args[1]) is ST and _local_mask_write(args[0], args[1], args[2]):
        return None
    x, idx, v = args[0], _plain_index(args[1], func), args[2]
    if type(x) is not ST:
        if type(v) is not ST or not v._spec.is_shard:
            # a plain tensor is a replicated value: a replicated (or reduced partial) value or
            # index is known whole on every rank, which all write alike (llama's decode loop:
            # `tokens[:, cur_pos] = next_token`, the argmax of vocab-sharded logits)
            x[idx] = to_layout(v, REPLICA, v._pg, func) if type(v) is ST else v
            return None
        what = f"a ShardedTensor with {v._spec!r} and shape {tuple(v._gshape)}"
        like = (f"ShardSpec({v._spec.dim + x.dim() - len(v._gshape)}, {v._spec.degree})"
                if x.dim() >= len(v._gshape) else "<its spec>")
        raise UnsupportedOpError(
            f"Tensor.__setitem__: writing {what} into a plain tensor of shape "
            f"{tuple(x.shape)} is not supported (a plain tensor is a replicated value: it would "
            f"take the full value on every rank); write its .full() instead, or, for a buffer "
            f"meant to hold shards (a KV cache), lay it out like the value once: buf = "
            f"st.ShardedTensor.from_global(buf, pg, {like}). HuggingFace's "
            f"resize_token_embeddings does this after parallelize: resize before "
            f"shardtensor.parallelize")
    pg = group_of(func, x, v)
    spec = x._spec
    if not spec.is_shard:   # a partial target takes a partial value: summands add up to v
        if spec.is_partial and not isinstance(v, torch.Tensor) and x._pg.tp_local_rank():
            v = 0
        x._local[idx] = _value_local(v, spec, pg or x._pg, func)
        return None
    plan = _index_plan(x, idx, func)
    if plan is not None and plan[0] is not False:
        local_idx, ospec, oshape = plan
        x._local[local_idx] = _value_local(v, ospec, pg, func, oshape)
        return None
    if plan is None:
        p = _dim_items(idx, len(x._gshape)).index(spec.dim)
        if isinstance(idx[p], (int, torch.Tensor)):   # `scores[:, eos_ids] = 0` (forced eos)
            _put_local(x, idx, p, v, pg, func)
            return None
    # the write crosses shard boundaries: write into the full value and keep this rank's part
    full = to_layout(x, REPLICA, pg, func).clone()
    full[idx] = _value_local(v, REPLICA, pg, func)
    x._local.copy_(to_layout(full, spec, pg, func))
    return None


def _put_local(x, idx, p, v, pg, func):
    """x[idx] = v where item `p` is an index (tensor or int) on the sharded dim: every rank
    writes the whole (replicated) value at the entries it holds, the others into the scratch
    slot, which is dropped (no gather of x)."""
    work, lid = _with_scratch(x, idx[p], T.__setitem__)
    # every rank reads the whole value: its gradient is the sum of the ranks' (Megatron's f)
    work[idx[:p] + (lid,) + idx[p + 1:]] = \
        copy_to_region(to_layout(v, REPLICA, pg, func), x._pg, func) \
        if isinstance(v, torch.Tensor) else v
    x._local.copy_(work.narrow(x._spec.dim, 0, x._local.shape[x._spec.dim]))


def _value_local(v, spec, pg, func, oshape=None):
    """The local part of value `v` written into a region laid out by `spec`."""
    if not spec.is_shard:
        return to_layout(v, spec, pg, func) if isinstance(v, torch.Tensor) else v
    if not isinstance(v, torch.Tensor):
        return v
    vshape = v._gshape if type(v) is ST else v.shape
    vd = spec.dim - (len(oshape) - len(vshape))
    if vd >= 0 and vshape[vd] == oshape[spec.dim] and oshape[spec.dim] != 1:
        return to_layout(v, shard_spec(vd, spec.degree, spec.stride), pg, func)
    # v broadcasts along the sharded dim: every rank writes all of it
    local = to_layout(v, REPLICA, pg, func)
    return copy_to_region(local, pg, func)


# --- joining ------------------------------------------------------------------------------------

def _common(func, tensors):
    """The layout every operand is moved to: the first shard's, else partial, else replicated."""
    specs = [spec_of(t) for t in tensors]
    for s in specs:
        if s.is_shard:
            return s
    return PARTIAL if any(s.is_partial for s in specs) else REPLICA


def _gshape(t):
    return tuple(t._gshape) if type(t) is ST else tuple(t.shape)


def _cat_same_layout(args, kwargs):
    """torch.cat of ShardedTensors that all share one layout, not along a sharded dim (rope's
    `cat((-x2, x1), -1)`, a KV cache's `cat([keys, new], -2)`): local. None otherwise."""
    if kwargs:
        if len(args) != 1 or len(kwargs) != 1 or "dim" not in kwargs:
            return None
        dim = kwargs["dim"]
    elif len(args) == 2:
        dim = args[1]
    elif len(args) == 1:
        dim = 0
    else:
        return None
    ts = args[0]
    if type(dim) is not int or type(ts) not in (list, tuple) or not ts or type(ts[0]) is not ST:
        return None
    t0 = ts[0]
    spec, pg, g = t0._spec, t0._pg, t0._gshape
    nd = len(g)
    if nd < 2:          # 1-D: torch.cat's legacy skipping of empty tensors (general rule)
        return None
    d = dim % nd
    sd = spec.dim if spec.is_shard else -1
    if sd == d:
        return None
    n = 0
    locs = []
    for t in ts:
        if type(t) is not ST or t._pg is not pg:
            return None
        s = t._spec
        if s is not spec and s != spec:
            return None
        tg = t._gshape
        if len(tg) != nd or (sd >= 0 and tg[sd] != g[sd]):
            return None
        n += tg[d]
        locs.append(t._local)
    shape = list(g)
    shape[d] = n
    return wrap(torch.cat(locs, d), spec, pg, shape)


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(func, args, kwargs):
    if args:
        out = _cat_same_layout(args, kwargs)
        if out is not None:
            return out
    tensors = list(args[0] if args else kwargs["tensors"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if "out" in kwargs:
        raise UnsupportedOpError("torch.cat(out=...) with sharded inputs is not supported")
    pg = group_of(func, *tensors)
    # legacy: 1-D empty tensors are skipped by torch.cat; their local (empty) tensors still go
    # into the local cat, which skips them the same way, so they keep their place in the graph
    # (a gradient, empty, as serial) and in type promotion
    empty = [t for t in tensors if _gshape(t) == (0,)]
    tensors = [t for t in tensors if _gshape(t) != (0,)]
    if not tensors:
        tensors, empty = empty[:1], empty[1:]
    empty = [t._local if type(t) is ST else t for t in empty]
    shapes = [_gshape(t) for t in tensors]
    nd = len(shapes[0])
    dim %= nd
    out_shape = list(shapes[0])
    out_shape[dim] = sum(s[dim] for s in shapes)
    spec = _common(func, tensors)
    if not (spec.is_shard and spec.dim == dim):
        locals_ = [to_layout(t, spec, pg, func) for t in tensors]
        return wrap(torch.cat(locals_ + empty, dim), spec, pg, out_shape)
    # along the sharded dim: equal blocks concatenate into a strided shard (q|k|v), locally
    block = next(s[dim] // t._spec.stride for t, s in zip(tensors, shapes)
                 if type(t) is ST and t._spec.is_shard and t._spec.dim == dim)
    if block and all(s[dim] % block == 0 for s in shapes):
        out = shard_spec(dim, spec.degree, sum(s[dim] // block for s in shapes))
        locals_ = [to_layout(t, shard_spec(dim, spec.degree, s[dim] // block), pg, func)
                   for t, s in zip(tensors, shapes)]
        return wrap(torch.cat(locals_ + empty, dim), out, pg, out_shape)
    out = shard_spec(dim, spec.degree)
    full = torch.cat([to_layout(t, REPLICA, pg, func) for t in tensors] + empty, dim)
    return wrap(to_layout(full, out, pg, func), out, pg, out_shape)


@rule(torch.stack)
def stack(func, args, kwargs):
    tensors = list(args[0] if args else kwargs["tensors"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if "out" in kwargs:
        raise UnsupportedOpError("torch.stack(out=...) with sharded inputs is not supported")
    pg = group_of(func, *tensors)
    shape = _gshape(tensors[0])
    dim %= len(shape) + 1
    spec = _common(func, tensors)
    locals_ = [to_layout(t, spec, pg, func) for t in tensors]
    out = spec
    if spec.is_shard and dim <= spec.dim:
        out = shard_spec(spec.dim + 1, spec.degree, spec.stride)
    return wrap(torch.stack(locals_, dim), out, pg, shape[:dim] + (len(tensors),) + shape[dim:])

