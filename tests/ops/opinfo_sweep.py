"""A sweep of torch's OpInfo database (torch.testing._internal.common_methods_invocations.op_db)
against serial: each sample's first input (a tensor of ndim >= 1) is laid out as a ShardedTensor
(every dim sharded, a stride-2 shard, replicated, partial), the other tensor inputs are plain
(replicated values) or laid out alike, and the op's result, its gradient (of a fixed
random-weighted sum) and what an in-place variant wrote are compared with serial's in float64.

Each case is classified:
  OK       equal to serial (1e-10) in value, shape, dtype and gradient
  REFUSED  a clear shardtensor error (UnsupportedOpError / ShardingError), or the error serial
           raises too
  WRONG    values, shape, dtype, gradient or a write differ from serial's, or serial raises and
           the sharded op does not
  CRASH    any other exception

`sweep(rank, names, ...)` runs on every rank of a pool (shardtensor.testing.run); every rank
builds the same samples (same seed). Used by tests/ops/test_opinfo_sweep.py and by a script
over the whole database.
"""
from __future__ import annotations

import math
import warnings
import zlib

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map

import shardtensor as st

# ops whose values are random or uninitialised, or that touch sparse layouts
SKIP_WORDS = ("rand", "normal", "bernoulli", "multinomial", "dropout", "uniform", "exponential",
              "geometric", "cauchy", "log_normal", "rrelu", "empty", "poisson",
              "fractional_max_pool", "lowrank", "sparse", "to_sparse", "_refs", "nonzero_static")

_PG = {}


def _pg(world):
    pg = _PG.get(world)
    if pg is None:
        pg = _PG[world] = st.ProcessGroup(tp_degree=world)
    return pg


def op_infos(names=None):
    from torch.testing._internal.common_methods_invocations import op_db
    out = []
    for op in op_db:
        full = op.name + ("." + op.variant_test_name if op.variant_test_name else "")
        if names is not None and full not in names:
            continue
        if any(w in op.name for w in SKIP_WORDS):
            continue
        if torch.float64 not in op.supported_dtypes("cpu"):
            continue
        out.append((full, op))
    return out


def _clone(x, grad):
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        if grad and x.requires_grad:
            y.requires_grad_(True)
        return y
    return x


def _leaves(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def _weights(outs):
    """A fixed random weight per floating output (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64)
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad
            else None for o in outs]


def _loss(outs, ws):
    terms = [(o.to(torch.float64) * w).sum() for o, w in zip(outs, ws) if w is not None]
    return sum(terms) if terms else None


def _full(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _diff(a, b, what):
    """'' when `a` (the sharded run's, gathered) equals `b` (serial's), else a description."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            return f"{what}: got {type(a).__name__}, serial gives a tensor"
        if a.shape != b.shape:
            return f"{what}: shape {tuple(a.shape)} != serial {tuple(b.shape)}"
        if a.dtype != b.dtype:
            return f"{what}: dtype {a.dtype} != serial {b.dtype}"
        a, b = a.detach(), b.detach()
        if b.is_floating_point() or b.is_complex():
            scale = b.abs().nan_to_num(0, 0, 0).max().item() if b.numel() else 0.0
            if not torch.allclose(a, b, rtol=1e-10, atol=1e-10 * max(1.0, scale), equal_nan=True):
                err = (a - b).abs().nan_to_num(math.inf).max().item()
                return f"{what}: values differ (max abs err {err:.3g}, scale {scale:.3g})"
            return ""
        if not torch.equal(a, b):
            return f"{what}: values differ"
        return ""
    if isinstance(b, (list, tuple)) and not isinstance(b, torch.Size):
        if not isinstance(a, (list, tuple)) or len(a) != len(b):
            return f"{what}: got {type(a).__name__} of {len(a) if hasattr(a, '__len__') else '?'}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _diff(x, y, f"{what}[{i}]")
            if d:
                return d
        return ""
    if isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return f"{what}: got a tensor, serial gives {type(b).__name__} {b!r}"[:200]
    if isinstance(a, float) and isinstance(b, float):
        if math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-10) or (math.isnan(a) and math.isnan(b)):
            return ""
    try:
        same = a == b or (isinstance(b, float) and math.isnan(b) and math.isnan(a))
    except Exception:
        same = False
    return "" if same else f"{what}: {a!r} != serial {b!r}"[:200]


def _refusal(e) -> bool:
    return isinstance(e, (st.UnsupportedOpError, st.ShardingError))


_SUMMANDS: list = []   # this case's leaves laid out as random summands


def _distribute(full, pg, spec):
    """`full` laid out by `spec`; a floating partial value as two summands of opposite signs
    that add up to it exactly (rank 0: full - 2 g, rank 1: 2 g, g = full on a 2**-10 grid, the
    others zeros), so that a rule keeping a non-linear op partial is caught (zeros on the
    other ranks would hide f(a) + f(0) != f(a + 0) wherever f(0) = 0)."""
    if not (spec.is_partial and full.is_floating_point()) or pg.tp_world_size() == 1:
        return st.ShardedTensor.from_global(full, pg, spec)
    rank = pg.tp_local_rank()
    _SUMMANDS.append(full)
    v = full.detach()
    fin = v.isfinite()   # (an infinite or nan value stays whole on rank 0)
    g2 = torch.where(fin, torch.trunc(v * 1024) / 512, torch.zeros_like(v))
    # (every summand depends on `full`, as every rank's summand of a real partial value would)
    local = full - g2 if rank == 0 else torch.where(fin, full * 0, 0.0) + (g2 if rank == 1 else 0)
    return st.ShardedTensor.from_local(local, pg, spec, shape=full.shape)


def _layout(t, spec, like, pg, second):
    """An extra tensor argument: plain in the first pass; in the second laid out like the first
    input (sharded on the same dim where its size there matches, else replicated; with a
    replicated first input: sharded on its dim 0, where it has one)."""
    if not second or not isinstance(t, torch.Tensor):
        return t
    if spec.is_replicate and t.dim() >= 1:
        return st.ShardedTensor.from_global(t, pg, st.ShardSpec(0, pg.tp_world_size()))
    if spec.is_shard:
        if t.dim() == like.dim() and t.shape[spec.dim] == like.shape[spec.dim]:
            return st.ShardedTensor.from_global(t, pg, spec)
        return st.ShardedTensor.from_global(t, pg, st.ReplicaSpec())
    return _distribute(t, pg, spec)


def run_case(fn, sample, spec, pg, second, inplace, grad):
    """(class, message) of one case."""
    inp, args, kwargs = sample.input, sample.args, sample.kwargs
    grad = grad and not inplace
    del _SUMMANDS[:]
    # serial
    s_in, s_args, s_kwargs = (tree_map(lambda x: _clone(x, grad), v) for v in (inp, args, kwargs))
    s_leaves = _leaves((s_in, s_args, s_kwargs))
    serr = None
    try:
        s_out = fn(s_in, *s_args, **s_kwargs)
    except Exception as e:
        serr = e
    # sharded
    p_in, p_args, p_kwargs = (tree_map(lambda x: _clone(x, grad), v) for v in (inp, args, kwargs))
    p_leaves = _leaves((p_in, p_args, p_kwargs))
    try:
        x = _distribute(p_in, pg, spec)
        p_args2, p_kwargs2 = tree_map(lambda t: _layout(t, spec, p_in, pg, second), (p_args, p_kwargs))
        p_out = fn(x, *p_args2, **p_kwargs2)
    except Exception as e:
        if serr is not None:
            return "REFUSED", f"serial raises {type(serr).__name__} too"
        if _refusal(e):
            return "REFUSED", f"{type(e).__name__}: {e}"[:300]
        return "CRASH", f"{type(e).__name__}: {e}"[:300]
    if serr is not None:
        return "WRONG", f"serial raises {type(serr).__name__}: {serr}"[:200] + "; sharded does not"
    try:
        outs_p, _ = tree_flatten(p_out)
        outs_s, _ = tree_flatten(s_out)
        full_p = [_full(o) for o in outs_p]
        d = _diff(full_p, outs_s, "output")
        if d:
            return "WRONG", d
        if inplace:
            if p_out is not x and not (isinstance(p_out, (list, tuple)) and p_out and p_out[0] is x):
                return "WRONG", "in-place variant did not return its input"
            d = _diff(x.full(), s_in, "written input")
            if d:
                return "WRONG", d
        else:   # an out-of-place op leaves its input alone (or writes what serial writes)
            d = _diff(x.full(), s_in, "input after the op")
            if d:
                return "WRONG", d
        if grad and s_leaves:
            ws = _weights(outs_s)
            s_loss = _loss(outs_s, ws)
            if s_loss is not None and s_loss.requires_grad:
                try:
                    s_grads = torch.autograd.grad(s_loss, s_leaves, allow_unused=True)
                except Exception as e:
                    return "OK", f"serial backward raises {type(e).__name__}"
                p_loss = _loss(full_p, ws)
                if p_loss is None or not p_loss.requires_grad:
                    return "WRONG", "sharded output does not require grad"
                try:
                    p_grads = torch.autograd.grad(p_loss, p_leaves, allow_unused=True)
                except Exception as e:
                    kind = "REFUSED" if _refusal(e) else "CRASH"
                    return kind, f"backward: {type(e).__name__}: {e}"[:300]
                p_grads = list(p_grads)
                for i, leaf in enumerate(p_leaves):   # a value split into random summands
                    if any(leaf is t for t in _SUMMANDS):   # its gradient is the sum of
                        gi = p_grads[i]                        # the summands' (every rank)
                        p_grads[i] = (torch.zeros_like(leaf) if gi is None
                                      else gi.clone(memory_format=torch.contiguous_format))
                        dist.all_reduce(p_grads[i], group=pg.tp_process_group())
                for i, (a, b) in enumerate(zip(p_grads, s_grads)):
                    if b is None:
                        b = torch.zeros_like(s_leaves[i])
                    if a is None:
                        a = torch.zeros_like(p_leaves[i])
                    d = _diff(a, b, f"grad of leaf {i}")
                    if d:
                        return "WRONG", d
    except Exception as e:
        kind = "REFUSED" if _refusal(e) else "CRASH"
        return kind, f"checking: {type(e).__name__}: {e}"[:300]
    return "OK", ""


def _random_sample(name, sample):
    """Samples that draw random numbers (attention with dropout)."""
    if sample.kwargs.get("dropout_p", 0) > 0:
        return True
    if name == "nn.functional.multi_head_attention_forward":
        return bool(sample.kwargs.get("training", True)) and sample.args[9] > 0
    return False


def case_specs(shape, world, kinds=("shard", "stride", "replica", "partial")):
    out = []
    if "shard" in kinds:
        out += [st.ShardSpec(d, world) for d in range(len(shape))]
    if "stride" in kinds:
        even = [d for d in range(len(shape)) if shape[d] % 2 == 0 and shape[d] >= 2]
        if even:
            out.append(st.ShardSpec(even[-1], world, 2))
    if "replica" in kinds:
        out.append(st.ReplicaSpec())
    if "partial" in kinds:
        out.append(st.PartialSpec())
    return out


def sweep(rank, names, world, max_samples=8, kinds=("shard", "stride", "replica", "partial"),
          fallback=None, variants=("op", "inplace"), only=None):
    """Every case of the named OpInfos on this rank: a list of
    (op, variant, sample index, spec, pass, class, message, digest of the collectives)."""
    pg = _pg(world)
    old = st.config.fallback
    st.config.fallback = fallback
    rows = []
    try:
        for full, op in op_infos(names):
            torch.manual_seed(0)
            try:
                samples = list(op.sample_inputs("cpu", torch.float64,
                                                requires_grad=op.supports_autograd))
            except Exception:
                continue
            fns = [("op", op.op)]
            if "inplace" in variants and op.inplace_variant is not None:
                fns.append(("inplace", op.inplace_variant))
            grad = op.supports_autograd
            n = 0
            for i, sample in enumerate(samples):
                if n >= max_samples:
                    break
                inp = sample.input
                if not isinstance(inp, torch.Tensor) or inp.dim() == 0 or inp.layout != torch.strided:
                    continue
                if _random_sample(full, sample):
                    continue
                n += 1
                others = any(isinstance(t, torch.Tensor) for t in tree_flatten((sample.args, sample.kwargs))[0])
                for vname, fn in fns:
                    for spec in case_specs(inp.shape, world, kinds):
                        for second in ((False, True) if others else (False,)):
                            if only is not None and (full, vname, i, repr(spec), second) not in only:
                                continue
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                with st.CommTrace() as tr:
                                    cls, msg = run_case(fn, sample, spec, pg, second,
                                                        vname == "inplace", grad)
                            # (an all-to-all's send buffer differs between uneven ranks: kinds only)
                            dig = zlib.crc32(repr([e.kind for e in tr.events]).encode())
                            rows.append((full, vname, i, repr(spec), second, cls, msg, dig,
                                         tuple(inp.shape)))
    finally:
        st.config.fallback = old
    return rows


def merge(results):
    """The per-rank rows of one task -> one row per case; ranks that disagree (class or
    collectives) make a CRASH."""
    out = []
    for rows in zip(*results):
        r0 = rows[0]
        if any(r[:5] != r0[:5] for r in rows):
            raise AssertionError("ranks swept different cases")
        if any(r[5] != r0[5] or r[7] != r0[7] for r in rows):
            msg = "; ".join(f"rank {k}: {r[5]} {r[6][:100]}" for k, r in enumerate(rows))
            out.append(r0[:5] + ("CRASH", "ranks disagree: " + msg, r0[8]))
        else:
            out.append(r0[:7] + (r0[8],))
    return out
