"""Tensor-parallel training step: serial vs hand-written Megatron vs PyTorch DTensor vs
shardtensor on the unchanged serial model, in one run.

    torchrun --nproc-per-node N benchmarks/tp_step.py [--size small|large|both] [--model blocks|gpt2|both]
                                                      [--graph]

NCCL on GPUs (bf16), gloo on CPU (float32, tiny sizes). tp = world size. Each variant: warm-up,
then the median of --iters forward+backward steps (CUDA events on GPU), and peak memory per rank.
Rank 0 prints a table and writes JSON (--json).
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

SIZES = {  # hidden, layers, batch, seq, heads
    "large": (4096, 4, 8, 2048, 32),
    "small": (1024, 8, 1, 128, 16),
    "cpu": (64, 2, 2, 32, 4),
}


# --- the serial model: pre-LN GPT blocks, written once, plainly ---------------------------------
class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads, self.hd = heads, h // heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).view(b, s, self.heads, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, self.heads * self.hd))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Blocks(nn.Module):
    def __init__(self, h, layers, heads):
        super().__init__()
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


BLOCK_PLAN = {"*.[qkv].*": "row", "*.fc1.*": "row", "*.o.weight": "col", "*.fc2.weight": "col"}


# --- hand-written Megatron layers: the floor ----------------------------------------------------
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class MegatronBlock(nn.Module):
    """The serial block rewritten by hand with column/row-parallel linears (local head count)."""

    def __init__(self, blk: Block, tp: int, rank: int, group):
        super().__init__()
        self.group, self.heads, self.hd = group, blk.heads // tp, blk.hd
        self.ln1, self.ln2 = blk.ln1, blk.ln2
        col = lambda lin: _slice(lin, 0, tp, rank, bias=True)
        row = lambda lin: _slice(lin, 1, tp, rank, bias=False)
        self.q, self.k, self.v, self.fc1 = col(blk.q), col(blk.k), col(blk.v), col(blk.fc1)
        self.o, self.fc2 = row(blk.o), row(blk.fc2)
        self.o_bias, self.fc2_bias = blk.o.bias, blk.fc2.bias

    def forward(self, x):
        b, s, _ = x.shape
        y = _Copy.apply(self.ln1(x), self.group)
        q, k, v = (p(y).view(b, s, self.heads, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + _Reduce.apply(self.o(a.transpose(1, 2).reshape(b, s, -1)), self.group) + self.o_bias
        y = _Copy.apply(self.ln2(x), self.group)
        return x + _Reduce.apply(self.fc2(F.gelu(self.fc1(y))), self.group) + self.fc2_bias


def _slice(lin, dim, tp, rank, bias):
    w = lin.weight.detach().chunk(tp, dim)[rank]
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias:
            out.bias.copy_(lin.bias.detach().chunk(tp, 0)[rank])
    return out


def megatron(model: Blocks, tp, rank, group):
    m = copy.deepcopy(model)
    m.blocks = nn.ModuleList(MegatronBlock(b, tp, rank, group) for b in m.blocks)
    return m


def dtensor(model: Blocks, tp, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh(device, (tp,))
    m = copy.deepcopy(model)
    for blk in m.blocks:
        parallelize_module(blk, mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(),
                                       "v": ColwiseParallel(), "o": RowwiseParallel(),
                                       "fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        blk.heads //= tp  # DTensor's plans hand local tensors to the model: edit its head count
    return m


def time_step(model, make_input, iters, device, to_full=False):
    def step():
        out = model(make_input())
        if to_full and isinstance(out, st.ShardedTensor):
            out = out.full()
        out.float().mean().backward()
    ms = median_ms(step, iters, device)
    model.zero_grad(set_to_none=True)
    return ms


def median_ms(fn, iters, device):
    """Median milliseconds of `fn()` over `iters` calls after 3 warm-up calls (CUDA events on
    the GPU, perf_counter on the CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_graphed(model, make_input, iters, to_full=False):
    """The same step captured once as a CUDA graph (forward, backward and the collectives of
    every variant) and replayed: what is left when no Python runs per step. Gradients are
    accumulated into the buffers the warm-up created."""
    x = make_input()

    def step():
        out = model(x)
        if to_full and isinstance(out, st.ShardedTensor):
            out = out.full()
        out.float().mean().backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del g
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _graph_rows(rows, name, model, make, iters, device, to_full=False):
    if not GRAPH or device != "cuda":
        return
    try:
        rows[name + "+graph"] = (time_graphed(model, make, iters, to_full), peak_mb(device))
    except Exception as e:  # noqa: BLE001  (reported in the table)
        rows[name + "+graph"] = (float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:200])


GRAPH = False
OPTIM = False


def time_optim(model, iters, device):
    """One `torch.optim.AdamW(model.parameters())` step (torch's defaults: foreach on CUDA
    where the parameters are plain tensors) over gradients of the parameters' layout."""
    params = [p for p in model.parameters() if p.requires_grad]
    meshes = [p.device_mesh for p in params if hasattr(p, "device_mesh")]
    if meshes:   # DTensor's optimizers refuse lists mixing DTensors and plain tensors
        from torch.distributed.tensor import Replicate, distribute_tensor
        params = [p if hasattr(p, "device_mesh") else
                  nn.Parameter(distribute_tensor(p.detach(), meshes[0], [Replicate()]))
                  for p in params]
    with torch.no_grad():
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(params, lr=1e-6)
    ms = median_ms(opt.step, iters, device)
    model.zero_grad(set_to_none=True)
    return ms


def _optim_rows(rows, name, model, iters, device):
    """The AdamW step; for shardtensor also with its parameters' step run through the rules
    (the path before optimizers stepped on the shards), side by side."""
    if not OPTIM:
        return
    rows[name + " adamw"] = (time_optim(model, iters, device), peak_mb(device))
    if name == "shardtensor":
        import shardtensor.optim as on_shards
        swap = on_shards._to_shards
        on_shards._to_shards = lambda opt: None
        try:
            rows[name + " adamw (rules)"] = (time_optim(model, iters, device), peak_mb(device))
        finally:
            on_shards._to_shards = swap


def peak_mb(device):
    if device != "cuda":
        return float("nan")
    v = torch.cuda.max_memory_allocated() / 2 ** 20
    torch.cuda.reset_peak_memory_stats()
    return v


def bench_blocks(size, device, dtype, iters, pg, rank, tp):
    h, layers, b, s, heads = SIZES[size]
    torch.manual_seed(0)
    base = Blocks(h, layers, heads).to(device=device, dtype=dtype)
    x = torch.randn(b, s, h, device=device, dtype=dtype)
    make = lambda: x
    rows = {}
    if device == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    if rank == 0 or device != "cuda":
        rows["serial"] = (time_step(base, make, iters, device), peak_mb(device))
        _graph_rows(rows, "serial", base, make, iters, device)
        _optim_rows(rows, "serial", base, iters, device)
    dist.barrier()
    for name, build in (("megatron", lambda: megatron(base, tp, pg.tp_local_rank(), pg.tp_process_group())),
                        ("dtensor", lambda: dtensor(base, tp, device)),
                        ("shardtensor", lambda: st.parallelize(copy.deepcopy(base), pg, plan=BLOCK_PLAN))):
        if device == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        try:
            m = build()
            rows[name] = (time_step(m, make, iters, device, to_full=True), peak_mb(device))
            _graph_rows(rows, name, m, make, iters, device, to_full=True)
            _optim_rows(rows, name, m, iters, device)
        except Exception as e:  # report, keep going
            rows[name] = (float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:200])
        del m
        dist.barrier()
    return rows


def bench_gpt2(size, device, dtype, iters, pg, rank, tp):
    """HuggingFace GPT-2 of the same size: serial vs shardtensor on the unchanged model.
    (DTensor's ColwiseParallel/RowwiseParallel accept nn.Linear/nn.Embedding only, not GPT-2's
    Conv1D, and a hand-written Megatron GPT-2 is a rewrite of the model: both are measured on
    the block stack above, which has the same layers.)"""
    import transformers as tf
    h, layers, b, s, heads = SIZES[size]
    cfg = tf.GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_positions=max(s, 128),
                        vocab_size=50257 if device == "cuda" else 1001, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=device)

    class Loss(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x, labels=x).loss
    rows = {}
    if rank == 0 or device != "cuda":
        rows["serial"] = (time_step(Loss(base), lambda: ids, iters, device), peak_mb(device))
        _graph_rows(rows, "serial", Loss(base), lambda: ids, iters, device)
        _optim_rows(rows, "serial", base, iters, device)
    dist.barrier()
    if device == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    m = st.parallelize(copy.deepcopy(base), pg)
    rows["shardtensor"] = (time_step(Loss(m), lambda: ids, iters, device, to_full=True), peak_mb(device))
    _graph_rows(rows, "shardtensor", Loss(m), lambda: ids, iters, device, to_full=True)
    _optim_rows(rows, "shardtensor", m, iters, device)
    dist.barrier()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="both", choices=["small", "large", "both", "cpu"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--model", default="both", choices=["blocks", "gpt2", "both"])
    ap.add_argument("--graph", action="store_true",
                    help="also time each variant's step captured as one CUDA graph (GPU)")
    ap.add_argument("--optim", action="store_true",
                    help="also time an AdamW step (torch's defaults) over each variant's parameters")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    global GRAPH, OPTIM
    GRAPH, OPTIM = a.graph, a.optim
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    st.init_distributed()
    pg = st.ProcessGroup()
    rank, tp = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = ["small", "large"] if a.size == "both" else [a.size]
    if device == "cpu":
        sizes = ["cpu"]
    results = {}
    for size in sizes:
        if a.model in ("blocks", "both"):
            results[f"blocks/{size}"] = bench_blocks(size, device, dtype, a.iters, pg, rank, tp)
        if a.model in ("gpt2", "both"):
            results[f"gpt2/{size}"] = bench_gpt2(size, device, dtype, a.iters, pg, rank, tp)
    if rank == 0:
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"tp={tp}, {name}, torch {torch.__version__}, {dtype}, forward+backward, median of {a.iters}")
        for key, rows in results.items():
            ref_name = "megatron" if "megatron" in rows else "serial"
            ref = rows.get(ref_name, (float("nan"),))[0]
            print(f"\n[{key}] hidden/layers/batch/seq/heads = {SIZES[key.split('/')[1]]}")
            print(f"{'variant':<18} {'step ms':>9} {'vs ' + ref_name:>12} {'peak MiB':>9}")
            for k, r in rows.items():
                print(f"{k:<18} {r[0]:>9.2f} {r[0] / ref:>12.3f} {r[1]:>9.0f}" + (f"  {r[2]}" if len(r) > 2 else ""))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(tp=tp, device=device, torch=torch.__version__, results=results), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
