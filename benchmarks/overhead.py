"""Dispatch overhead on CPU, world 1: what shardtensor and PyTorch DTensor add to plain torch.

    python benchmarks/overhead.py [--quick] [--json out.json]

Measures, in one run: per-op cost (add, gelu, linear, matmul, view, transpose, embedding with a
hidden-split and a vocab-split table; every input laid out beforehand, so each row times one op) of plain tensors,
DTensor, ShardedTensor and the floor of any Python wrapper subclass (`Floor`: unwrap, run, rewrap); a Linear-GELU-Linear training step (column then row parallel,
forward + backward) in all three; an AdamW step (foreach) over a parallelized GPT-2's parameters
against the same step over plain tensors of the local shard sizes, over the thinnest tensor
subclass (the `__torch_function__` protocol's own floor) and over DTensors, for a tiny GPT-2 (all
overhead) and GPT-2 small (124M). Median of repeated timings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shardtensor as st  # noqa: E402


def timeit(fns, number: int, repeat: int):
    """Median seconds per call of each of `fns`, timed in interleaved blocks (a block of
    `number` calls of each in turn, `repeat` rounds), so a noisy machine slows all alike."""
    for f in fns:
        for _ in range(max(3, number // 10)):
            f()
    runs = [[] for _ in fns]
    for _ in range(repeat):
        for f, r in zip(fns, runs):
            t0 = time.perf_counter()
            for _ in range(number):
                f()
            r.append((time.perf_counter() - t0) / number)
    return [statistics.median(r) for r in runs]


def dtensor_api():
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
    return Replicate, Shard, distribute_tensor, init_device_mesh, ColwiseParallel, RowwiseParallel, parallelize_module


class Floor(torch.Tensor):
    """The least a Python wrapper subclass can do per op: unwrap the arguments, run the op on
    the inner tensors, wrap a tensor result (`_make_wrapper_subclass` plus one attribute). No
    layout logic at all: any wrapper design (shardtensor's, DTensor's) pays at least this."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = func(*[a._inner if type(a) is Floor else a for a in args], **(kwargs or {}))
        return _floor(out) if isinstance(out, torch.Tensor) else out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("Floor: aten op reached __torch_dispatch__")


def _floor(t):
    w = torch.Tensor._make_wrapper_subclass(Floor, t.shape, dtype=t.dtype, device=t.device)
    w.__dict__["_inner"] = t
    return w


def per_op(pg, mesh, api, number, repeat):
    Replicate, Shard, distribute_tensor = api[0], api[1], api[2]
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    w = torch.randn(32, 16)
    ids = torch.randint(0, 64, (8, 16))
    table = torch.randn(64, 16)
    sx = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, 1))
    sw = st.ShardedTensor.from_global(w, pg, st.ShardSpec(0, 1))
    stab = st.ShardedTensor.from_global(table, pg, st.ShardSpec(1, 1))
    dx = distribute_tensor(x, mesh, [Shard(1)])
    dw = distribute_tensor(w, mesh, [Shard(0)])
    dtab = distribute_tensor(table, mesh, [Shard(1)])
    dids = distribute_tensor(ids, mesh, [Replicate()])  # DTensor refuses plain tensors
    sxt = sx.T.contiguous()          # matmul operands laid out beforehand: the op alone
    xt, dxt = x.T.contiguous(), dx.T.contiguous()
    rx = sx.redistribute(st.ReplicaSpec())   # linear: inputs laid out as the op wants them
    drx = dx.redistribute(mesh, [Replicate()])
    vtab = st.ShardedTensor.from_global(table, pg, st.ShardSpec(0, 1))
    dvtab = distribute_tensor(table, mesh, [Shard(0)])
    fx, fxt, fw, ftab = _floor(x), _floor(xt), _floor(w), _floor(table)
    cases = {
        "add": (lambda: x + x, lambda: dx + dx, lambda: sx + sx, lambda: fx + fx),
        "gelu": (lambda: F.gelu(x), lambda: F.gelu(dx), lambda: F.gelu(sx), lambda: F.gelu(fx)),
        "linear": (lambda: F.linear(x, w), lambda: F.linear(drx, dw), lambda: F.linear(rx, sw),
                   lambda: F.linear(fx, fw)),
        "matmul": (lambda: x @ xt, lambda: dx @ dxt, lambda: sx @ sxt, lambda: fx @ fxt),
        "view": (lambda: x.view(8, 4, 4), lambda: dx.view(8, 4, 4), lambda: sx.view(8, 4, 4),
                 lambda: fx.view(8, 4, 4)),
        "transpose": (lambda: x.T, lambda: dx.T, lambda: sx.T, lambda: fx.T),
        "embedding": (lambda: F.embedding(ids, table), lambda: F.embedding(dids, dtab),
                      lambda: F.embedding(ids, stab), lambda: F.embedding(ids, ftab)),
        "embedding (vocab)": (lambda: F.embedding(ids, table), lambda: F.embedding(dids, dvtab),
                              lambda: F.embedding(ids, vtab), lambda: F.embedding(ids, ftab)),
    }
    rows = {}
    for name, (plain, dt, sh, fl) in cases.items():
        p, d, s, f = timeit((plain, dt, sh, fl), number // 4 or 1, repeat)
        rows[name] = dict(plain_us=p * 1e6, dtensor_added_us=(d - p) * 1e6,
                          shardtensor_added_us=(s - p) * 1e6, floor_added_us=(f - p) * 1e6)
    return rows


class MLP(nn.Module):
    def __init__(self, h=16, f=64):
        super().__init__()
        self.fc1 = nn.Linear(h, f)
        self.fc2 = nn.Linear(f, h)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def mlp_step(pg, mesh, api, number, repeat):
    ColwiseParallel, RowwiseParallel, parallelize_module = api[4], api[5], api[6]
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(8, 16)
    plain = copy.deepcopy(base)
    dt = parallelize_module(copy.deepcopy(base), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    sh = st.parallelize(copy.deepcopy(base), pg, plan={"fc1.*": "row", "fc2.weight": "col"})

    def step(m, full=False):
        def f():
            out = m(x)
            if full:
                out = out.full()
            out.sum().backward()
        return f
    p, d, s = timeit((step(plain), step(dt), step(sh, full=True)), number // 4 or 1, repeat)
    return dict(plain_ms=p * 1e3, dtensor_added_ms=(d - p) * 1e3, shardtensor_added_ms=(s - p) * 1e3,
                dtensor_ratio_of_added=(d - p) / max(s - p, 1e-9))


class Thin(torch.Tensor):
    """The thinnest tensor subclass: torch's default `__torch_function__` (run the op with
    subclass dispatch off, convert outputs back). Any subclass pays at least this: the
    protocol scans every tensor of every list argument (~0.3 us each) before Python runs."""


def adamw_step(pg, mesh, api, number, repeat, size="tiny"):
    """AdamW (foreach) over a parallelized GPT-2's parameters vs the same step over plain
    tensors of the local shard sizes, over `Thin` tensors (the protocol's floor) and over
    DTensor parameters. `size`: "tiny" (2 layers, hidden 32: the step is all per-op overhead)
    or "gpt2" (GPT-2 small, 124M parameters: the step is arithmetic)."""
    from shardtensor.models_testing import build
    if size == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())
    else:
        model = build("gpt2", "sdpa", layers=2, vocab=1001)
    st.parallelize(model, pg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plain = [p.to_local().detach().clone().requires_grad_() for p in model.parameters()]
    thin = [torch.Tensor._make_subclass(Thin, t.detach().clone(), True) for t in plain]
    Shard, distribute_tensor = api[1], api[2]
    dts = [nn.Parameter(distribute_tensor(t.detach().clone(), mesh, [Shard(0)]))
           for t in plain]
    for ps in (plain, thin, dts):
        for p in ps:
            p.grad = torch.zeros_like(p)
    opts = [torch.optim.AdamW(ps, lr=1e-3, foreach=True)
            for ps in (list(model.parameters()), plain, thin, dts)]
    s, p, t, d = timeit([o.step for o in opts], number, repeat)
    return dict(size=size, params=len(plain), numel=sum(x.numel() for x in plain),
                plain_ms=p * 1e3, shardtensor_ms=s * 1e3, ratio=s / p, thin_ms=t * 1e3,
                thin_ratio=t / p, dtensor_ms=d * 1e3, dtensor_ratio=d / p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few iterations (a smoke run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    number, repeat = (50, 3) if a.quick else (2000, 31)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(st.launch.__globals__["free_port"]()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    pg = st.ProcessGroup()
    api = dtensor_api()
    mesh = api[3]("cpu", (1,))
    res = dict(torch=torch.__version__, per_op=per_op(pg, mesh, api, number, repeat),
               mlp_step=mlp_step(pg, mesh, api, number // 10 or 5, repeat),
               adamw_step=adamw_step(pg, mesh, api, number // 20 or 5, repeat),
               adamw_step_gpt2=adamw_step(pg, mesh, api, 2, 7 if a.quick else 11, "gpt2"))
    print(f"torch {torch.__version__}, CPU, 1 thread, world 1 (median of {repeat})\n")
    print(f"{'op':<18} {'plain us':>9} {'DTensor +us':>12} {'shardtensor +us':>16} {'ratio':>6} "
          f"{'wrapper floor +us':>18} {'floor ratio':>12}")
    for k, r in res["per_op"].items():
        dt = r["dtensor_added_us"]
        ratio = r["shardtensor_added_us"] / dt if dt > 0 else float("nan")
        fratio = r["floor_added_us"] / dt if dt > 0 else float("nan")
        print(f"{k:<18} {r['plain_us']:>9.1f} {dt:>12.1f} {r['shardtensor_added_us']:>16.1f} "
              f"{ratio:>6.2f} {r['floor_added_us']:>18.1f} {fratio:>12.2f}")
    print("(ratio: shardtensor's added cost / DTensor's; floor: a wrapper subclass that only "
          "unwraps, runs the op and rewraps)")
    m = res["mlp_step"]
    print(f"\nMLP training step: plain {m['plain_ms']:.3f} ms; DTensor adds {m['dtensor_added_ms']:.3f} ms; "
          f"shardtensor adds {m['shardtensor_added_ms']:.3f} ms ({1 / m['dtensor_ratio_of_added']:.2f} of DTensor's)")
    for key in ("adamw_step", "adamw_step_gpt2"):
        o = res[key]
        print(f"AdamW step (foreach), GPT-2 {o['size']} ({o['params']} tensors, {o['numel'] / 1e6:.2f}M "
              f"values): plain {o['plain_ms']:.3f} ms, shardtensor {o['shardtensor_ms']:.3f} ms "
              f"({o['ratio']:.2f}x), thinnest subclass {o['thin_ms']:.3f} ms ({o['thin_ratio']:.2f}x), "
              f"DTensor {o['dtensor_ms']:.3f} ms ({o['dtensor_ratio']:.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
