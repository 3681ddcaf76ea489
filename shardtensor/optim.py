"""torch's elementwise optimizers step on the shards.

SGD, Adam, AdamW, Adamax, Adadelta, Adagrad, ASGD, NAdam, RAdam, RMSprop and Rprop update every
element of a parameter from the same element of its gradient and state (SparseAdam: every element
its sparse gradient lists): on a sharded parameter that is the serial update of this rank's part,
with no communication. So their `step` runs on the shards themselves: for the step's duration
each param group lists the shards (plain tensors; their `.grad` is the gradient's shard, where
autograd put it) and the optimizer's state of a sharded parameter is keyed by its shard. The
step then pays no dispatch at all, and torch's default picks its foreach kernels on CUDA (it
refuses tensor subclasses, so a ShardedTensor parameter would otherwise get the per-parameter
loop).

Outside `step` nothing changes: `param_groups` hold the parameters, `optimizer.state` is keyed
by them, and a state tensor of a sharded parameter is a ShardedTensor with its layout (what
`state_dict()` and `shardtensor.save` see). State created in the step is wrapped once; later
steps reuse the wrappers. A plain state tensor with a ShardedTensor parameter's global shape (a
serial optimizer's state dict, loaded by torch's `load_state_dict`) is laid out like the
parameter at the next step. Optimizers this cannot vouch for (LBFGS's global dot products,
Adafactor's row/column factors, any other class) step through the rules as before, as does a
step with `differentiable=True`, a partial parameter, state not laid out like its parameter, or
a fused step over a strided shard or gradient (torch's fused kernels assume contiguous tensors,
even serially; the rule hands them contiguous copies).
"""
from __future__ import annotations

import functools

import torch

from .spec import take_shard
from .tensor import ShardedTensor, wrap

__all__ = ["install"]

ST = ShardedTensor
_ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "Adadelta", "Adagrad", "ASGD", "NAdam",
                "RAdam", "RMSprop", "Rprop", "SparseAdam")
# state named like these has the parameter's shape even when that shape is () (a 0-d parameter);
# any other 0-d state ('step', 'eta', 'mu', 'mu_product') is a scalar of the optimizer's
_PARAM_SHAPED = frozenset(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                           "square_avg", "grad_avg", "acc_delta", "sum", "prev", "step_size",
                           "ax"))


def _to_shards(opt):
    """Swap the shards in for the step: returns what `_back` needs, or None where this step
    must run through the rules."""
    state = opt.state
    groups = []    # (group, its parameter list)
    entries = []   # (parameter, shard, the shard's state dict)
    for g in opt.param_groups:
        if g.get("differentiable"):
            return None
        fused = g.get("fused")
        ps = g["params"]
        locs = []
        put = locs.append
        for p in ps:
            if p.__class__ is not ST:
                put(p)
                continue
            sp = p._spec
            if sp.is_partial:
                return None
            loc = p._local
            if fused and not (loc.is_contiguous() and (loc.grad is None or loc.grad.is_contiguous())):
                return None   # torch's fused kernels assume dense rows; the rule copies them
            put(loc)
            cs = state.get(p)
            if not cs:
                entries.append((p, loc, None))
                continue
            sh = {}
            for k, v in cs.items():
                if v.__class__ is ST:
                    if (v._spec is not sp and v._spec != sp) or v._gshape != p._gshape:
                        return None
                    v = v._local
                elif isinstance(v, torch.Tensor) and (v.dim() or k in _PARAM_SHAPED) and \
                        v.shape == p._gshape:
                    v = cs[k] = _laid_out(v, p)
                    v = v._local
                sh[k] = v
            entries.append((p, loc, sh))
        groups.append((g, ps, locs))
    if not entries:
        return None
    for g, _, locs in groups:
        g["params"] = locs
    for _, loc, sh in entries:
        if sh is not None:
            state[loc] = sh
    return groups, entries


def _laid_out(v: torch.Tensor, p: ShardedTensor) -> ShardedTensor:
    """A plain state tensor with a ShardedTensor parameter's global shape (a serial optimizer's
    `state_dict()` loaded by torch's `load_state_dict`, which only casts it) laid out like the
    parameter: this rank's part, in memory of its own."""
    sp = p._spec
    part = take_shard(v, sp, p._pg.tp_local_rank()) if sp.is_shard else v
    return wrap(torch.empty_like(p._local, dtype=v.dtype).copy_(part), sp, p._pg, p._gshape)


def _back(opt, swapped) -> None:
    """Put the parameters back, and the shards' state under them (new state tensors of a
    parameter's shape wrapped with its layout, once)."""
    groups, entries = swapped
    for g, ps, _ in groups:
        g["params"] = ps
    state = opt.state
    pop = state.pop
    for p, loc, _ in entries:
        sh = pop(loc, None)
        if not sh:
            continue
        cs = state[p]
        shape = loc.shape
        for k, v in sh.items():
            c = cs.get(k)
            if c is v or (c.__class__ is ST and c._local is v):
                continue
            if isinstance(v, torch.Tensor) and v.shape == shape and (shape or k in _PARAM_SHAPED):
                v = wrap(v, p._spec, p._pg, p._gshape)
            cs[k] = v
        if len(cs) != len(sh):   # a key the step dropped
            for k in [k for k in cs if k not in sh]:
                del cs[k]


def _on_shards(step):
    @functools.wraps(step)
    def step_on_shards(self, *args, **kwargs):
        swapped = _to_shards(self)
        if swapped is None:
            return step(self, *args, **kwargs)
        try:
            return step(self, *args, **kwargs)
        finally:
            _back(self, swapped)
    step_on_shards._shardtensor_on_shards = True
    return step_on_shards


def install() -> None:
    """Make the elementwise optimizers' `step` run on the shards (done on `import shardtensor`;
    idempotent). Innermost: torch's step hooks, installed around `step` when the first optimizer
    of a class is built, still see the parameters."""
    for name in _ELEMENTWISE:
        cls = getattr(torch.optim, name, None)
        step = None if cls is None else cls.__dict__.get("step")
        if step is None or getattr(step, "_shardtensor_on_shards", False):
            continue
        hooked = getattr(step, "hooked", False)
        inner = getattr(step, "__wrapped__", None) if hooked else step
        if inner is None or getattr(inner, "_shardtensor_on_shards", False):
            continue
        new = _on_shards(inner)
        if hooked:
            new = torch.optim.Optimizer.profile_hook_step(new)
            new.hooked = True
        cls.step = new
