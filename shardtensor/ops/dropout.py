"""Dropout under tensor parallelism (Megatron's model-parallel RNG, without its globals).

- Replicated (or partial, reduced first) input: every rank draws the same mask from the default
  generator, which all ranks seed alike, so the replicas stay bitwise identical.
- Sharded input, `config.dropout = "independent"` (default): each rank draws its shard's mask
  from its own generator, seeded `torch.initial_seed() + 2718 + tp rank` (Megatron's offset);
  the default generator is not touched, so replicated regions stay in step across ranks.
- Sharded input, `config.dropout = "serial"`: the full-shape mask is drawn from the default
  generator as the serial model would draw it and each rank keeps its piece: the sharded model
  gives exactly the serial model's output for the same seed (at the cost of a full-size draw).
`training=False` or `p=0` returns the input itself, as torch does.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..spec import take_shard
from ._util import REPLICA, config, materialize, rule, wrap

_OFFSET = 2718
# device -> (default seed it was derived from, this rank's generator)
_GENERATORS: Dict[Tuple[str, int], Tuple[int, torch.Generator]] = {}


def _default_seed(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.initial_seed()
    return torch.initial_seed()


def rank_generator(device: torch.device, pg) -> torch.Generator:
    """This rank's dropout generator for sharded regions on `device`, seeded from torch's
    default seed + 2718 + tp rank; re-derived when torch is re-seeded with another seed."""
    rank = pg.tp_local_rank()
    key = (str(device), rank)
    seed = _default_seed(device)
    entry = _GENERATORS.get(key)
    if entry is None or entry[0] != seed:
        g = torch.Generator(device=device)
        g.manual_seed(seed + _OFFSET + rank)
        entry = _GENERATORS[key] = (seed, g)
    return entry[1]


def manual_seed(seed: int) -> None:
    """`torch.manual_seed(seed)` that also restarts every rank's sharded-region stream (like
    Megatron's `model_parallel_cuda_manual_seed`). Plain `torch.manual_seed` with a new seed
    re-derives the streams too; with the seed already in use it leaves them running."""
    torch.manual_seed(seed)
    _GENERATORS.clear()


def checkpoint_context():
    """`context_fn` for `torch.utils.checkpoint(..., use_reentrant=False, context_fn=...)`: the
    recomputation draws the same per-rank masks as the forward did (torch's checkpoint restores
    only the default generators)."""
    saved = {k: (s, g.get_state()) for k, (s, g) in _GENERATORS.items()}

    @contextlib.contextmanager
    def recompute():
        now = {k: g.get_state() for k, (_, g) in _GENERATORS.items()}
        for k, (seed, g) in _GENERATORS.items():
            if k in saved and saved[k][0] == seed:
                g.set_state(saved[k][1])
            else:  # created after the forward began: back to its first state
                g.manual_seed(seed + _OFFSET + k[1])
        try:
            yield
        finally:
            for k, state in now.items():
                _GENERATORS[k][1].set_state(state)
    return contextlib.nullcontext(), recompute()


def _args(func, args, kwargs):
    """(input, p, training, inplace) of F.dropout / torch.dropout / torch.dropout_."""
    names = ("input", "p", "training" if func is F.dropout else "train", "inplace")
    vals = dict(zip(names, args))
    vals.update(kwargs)
    return (vals["input"], vals.get("p", 0.5), vals.get(names[2], True),
            vals.get("inplace", False) or func is torch.dropout_)


@rule(F.dropout, torch.dropout, torch.dropout_)
def dropout(func, args, kwargs):
    x, p, training, inplace = _args(func, args, kwargs)
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0:
        return x
    spec = x._spec
    if spec.is_partial:
        loc, spec = materialize(x, func), REPLICA
    else:
        loc = x._local
    if spec.is_replicate:  # the default generator: the same mask on every rank
        res = torch.dropout_(loc, p, True) if inplace else torch.dropout(loc, p, True)
    else:
        with torch.no_grad():
            if config.dropout == "serial":
                ones = torch.ones(x._gshape, dtype=loc.dtype, device=loc.device)
                noise = take_shard(torch.dropout(ones, p, True), spec, x._pg.tp_local_rank())
            else:
                noise = torch.empty_like(loc).bernoulli_(1 - p, generator=rank_generator(
                    loc.device, x._pg))
                if p < 1:
                    noise.div_(1 - p)
        res = loc.mul_(noise) if inplace else loc * noise
    if inplace:
        if res is not x._local or spec is not x._spec:
            x._local, x._spec = res, spec
        return x
    return wrap(res, spec, x._pg, x._gshape)
