"""F.embedding on sharded tables.

- Table sharded on dim 0 (vocab, Megatron's VocabParallelEmbedding): every rank looks up the ids
  it holds, zeroes the rows of the ids it does not, and the output is a PartialSpec (the
  all-reduce is deferred to whoever needs the value, and counted once). No communication.
- Table sharded on dim 1 (hidden): a local lookup; the output is sharded on its last dim.
- Replicated table: the output takes the layout of the ids (Megatron's f on the table when the
  ids are sharded, so its gradient is complete).
Ids are indices, never differentiated: sharded ids meeting a sharded table are gathered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collectives import copy_to_region
from ..dispatch import UnsupportedOpError
from ..spec import describe, shard_ranges
from ._util import (PARTIAL, REPLICA, ShardSpec, ST, check_index, group_of, local_index,
                    materialize, remember, rule, shard_spec, spec_of, to_layout, wrap)

_NAMES = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
          "sparse")
_DEFAULTS = (None, None, None, None, 2.0, False, False)


_OSHAPES: dict = {}


def _out_shape(ishape, wshape):
    r = _OSHAPES.get((ishape, wshape))
    if r is None:
        r = remember(_OSHAPES, (ishape, wshape), torch.Size(tuple(ishape) + (wshape[1],)))
    return r


@rule(F.embedding)
def embedding(func, args, kwargs):
    if len(args) == 7 and not kwargs:     # nn.Embedding.forward passes all seven
        ids, w, pad, max_norm, _, sgf, sparse = args
        hot = max_norm is None and not sgf
    elif len(args) == 2:
        ids, w = args
        pad, sparse = kwargs.get("padding_idx"), kwargs.get("sparse", False)
        hot = kwargs.get("max_norm") is None and not kwargs.get("scale_grad_by_freq")
    else:
        hot = False
    if hot:
        # the hot path: plain ids into a sharded table, no max_norm / scale_grad_by_freq
        if type(w) is ST and type(ids) is not ST and w._spec.is_shard and len(w._gshape) == 2:
            ws = w._spec
            oshape = _out_shape(ids.shape, w._gshape)
            if ws.dim == 1:
                out = F.embedding(ids, w._local, pad, None, 2.0, False, sparse)
                return wrap(out, shard_spec(len(oshape) - 1, ws.degree, ws.stride), w._pg, oshape)
            if ws.degree == 1:   # the one shard is the whole table: no ids to mask
                out = F.embedding(ids, w._local, pad, None, 2.0, False, sparse)
                return wrap(out, PARTIAL, w._pg, oshape)
    a = dict(zip(_NAMES, _DEFAULTS))
    a.update(zip(_NAMES, args))
    a.update(kwargs)
    ids, w = a["input"], a["weight"]
    pad, max_norm, norm_type = a["padding_idx"], a["max_norm"], a["norm_type"]
    sgf, sparse = a["scale_grad_by_freq"], a["sparse"]
    pg = group_of(func, ids, w)
    wshape = w._gshape if type(w) is ST else w.shape
    ishape = ids._gshape if type(ids) is ST else ids.shape
    if len(wshape) != 2:
        raise ValueError(f"F.embedding: weight must be 2-D, got shape {tuple(wshape)}")
    V, H = wshape
    if pad is not None and pad < 0:
        pad += V
    oshape = torch.Size(tuple(ishape) + (H,))
    ws, ispec = spec_of(w), spec_of(ids)

    if ws.is_partial and max_norm is None:
        # the lookup is linear in the table: each summand looks up its own rows
        out = F.embedding(to_layout(ids, REPLICA, pg, func), w._local, pad, None, norm_type, sgf, sparse)
        return wrap(out, PARTIAL, pg, oshape)
    if ws.is_partial:
        w, ws = wrap(materialize(w, func), REPLICA, pg, wshape), REPLICA

    if ws.is_replicate:
        if ispec.is_partial or (ispec.is_shard and (max_norm is not None or sgf)):
            # max_norm renormalises the looked-up rows in place, scale_grad_by_freq counts the
            # ids: both need every id on every rank
            il, ospec = to_layout(ids, REPLICA, pg, func), REPLICA
        else:
            il, ospec = (ids._local if type(ids) is ST else ids), ispec
        wl = w._local if type(w) is ST else w
        if ospec.is_shard and wl.requires_grad:
            wl = copy_to_region(wl, pg, func)
        out = F.embedding(il, wl, pad, max_norm, norm_type, sgf, sparse)
        return wrap(out, ospec, pg, oshape)

    il = to_layout(ids, REPLICA, pg, func)
    if ws.degree == 1 and ws.dim == 0:   # the one shard is the whole table, in order
        return wrap(F.embedding(il, w._local, pad, max_norm, norm_type, sgf, sparse), PARTIAL,
                    pg, oshape)
    if ws.dim == 1:
        if max_norm is not None:
            raise UnsupportedOpError(
                f"F.embedding: max_norm needs whole rows, but the table is sharded on the hidden "
                f"dim ({describe(ws)}); shard it on dim 0 (vocab) or drop max_norm")
        out = F.embedding(il, w._local, pad, None, norm_type, sgf, sparse)
        return wrap(out, shard_spec(len(oshape) - 1, ws.degree, ws.stride), pg, oshape)
    return wrap(_vocab_parallel(il, w._local, V, ws, pg.tp_local_rank(), pad, max_norm,
                                norm_type, sgf, sparse), PARTIAL, pg, oshape)


def _vocab_parallel(ids, wl, V, spec: ShardSpec, rank, pad, max_norm, norm_type, sgf, sparse):
    """This rank's summand of a lookup into a vocab-sharded table: its rows, zeros elsewhere
    (an id outside the table raises, as serial: no rank holding it would give zeros)."""
    check_index(ids, V, F.embedding, 0)
    ranges = shard_ranges(V, spec.degree, spec.stride, rank)
    if len(ranges) == 1 and max_norm is None and not sgf and wl.shape[0] and not sparse:
        # the common case (one block per rank): 8 ops, as in Megatron's VocabParallelEmbedding
        start, length = ranges[0]
        lid = ids - start
        other = (lid < 0) | (lid >= length)          # ids another rank holds
        lpad = pad - start if pad is not None and start <= pad < start + length else None
        out = F.embedding(lid.masked_fill(other, 0), wl, lpad, None, norm_type, sgf, sparse)
        return out.masked_fill(other.unsqueeze(-1), 0)
    lid, mask = local_index(ids, V, spec, rank)
    nloc = wl.shape[0]
    lpad = None
    if pad is not None:
        hit = [pad - s + sum(l for _, l in shard_ranges(V, spec.degree, spec.stride, rank)[:i])
               for i, (s, l) in enumerate(shard_ranges(V, spec.degree, spec.stride, rank))
               if s <= pad < s + l]
        lpad = hit[0] if hit else None
    if max_norm is not None and nloc:
        with torch.no_grad():
            torch.embedding_renorm_(wl, lid[mask].contiguous(), max_norm, norm_type)
    if sparse:
        # only the ids this rank holds are looked up, so the sparse gradient lists exactly the
        # rows of this shard that the serial gradient lists (another rank's id looked up at a
        # stand-in row would list that row with zeros, and SparseAdam would then decay its
        # moments and move it where serial leaves it alone)
        rows = F.embedding(lid[mask], wl, lpad, None, norm_type, sgf, True)
        return rows.new_zeros(tuple(ids.shape) + (wl.shape[1],)).index_put((mask,), rows)
    if nloc == 0 or sgf:
        # an extra zero row takes the ids this rank does not hold (an empty shard stays in the
        # graph; gradient frequencies are counted only over the ids this rank holds)
        table = torch.cat([wl, wl.new_zeros((1, wl.shape[1]))])
        return F.embedding(lid.masked_fill(~mask, nloc), table, lpad, None, norm_type, sgf,
                           sparse)
    out = F.embedding(lid.masked_fill(~mask, 0), wl, lpad, None, norm_type, sgf, sparse)
    return out.masked_fill(~mask.unsqueeze(-1), 0)
