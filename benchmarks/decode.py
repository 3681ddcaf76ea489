"""Tensor-parallel decoding: per-token latency of a Llama-shaped model (random weights from a
config), serial on one GPU vs hand-written Megatron layers with a static KV cache (the floor) vs
HuggingFace's own `tp_plan="auto"` vs shardtensor on the unchanged HF model, tp = world size.

    torchrun --nproc-per-node N benchmarks/decode.py            # GPUs: bf16, hidden 4096, 32 heads,
                                                                # 8 kv heads, 8 layers
    torchrun --nproc-per-node 2 benchmarks/decode.py --cpu      # gloo, float32, tiny sizes (smoke)

Every variant runs the same greedy loop: a prefill of --prompt tokens, then --new decode steps of
one token each (the next token by argmax of the logits; KV cache: HF's DynamicCache, or the
Megatron model's own preallocated cache). Each is run once to warm up, then timed per decode step
(CUDA events on GPU, perf_counter on CPU); the table gives the median and mean per-token latency
and whether its tokens equal the serial model's. Rank 0 prints, and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shardtensor as st  # noqa: E402

GPU = dict(hidden=4096, heads=32, kv_heads=8, layers=8, ffn=14336, vocab=32000)
CPU = dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=128, vocab=101)


def llama(sizes, dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
                      num_key_value_heads=sizes["kv_heads"], num_hidden_layers=sizes["layers"],
                      intermediate_size=sizes["ffn"], vocab_size=sizes["vocab"],
                      max_position_embeddings=4096, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        m = LlamaForCausalLM(cfg)
    return m.to(dtype).eval()


# --- hand-written Megatron Llama with a static KV cache (the floor) ------------------------------
class MegatronLlama(nn.Module):
    """Column/row-parallel projections, local heads, vocab-parallel embedding and head, one
    all-reduce after attention and one after the MLP, greedy argmax by a (value, index) reduction
    of the vocab shards. Weights are sliced from the serial HF model."""

    def __init__(self, hf, tp, rank, group, max_len, batch):
        super().__init__()
        c = hf.config
        self.tp, self.rank, self.group = tp, rank, group
        self.hd = c.hidden_size // c.num_attention_heads
        self.nh, self.nkv = c.num_attention_heads // tp, c.num_key_value_heads // tp
        self.eps, self.vocab = c.rms_norm_eps, c.vocab_size
        sd = hf.state_dict()
        rows = lambda w: nn.Parameter(w.tensor_split(tp, 0)[rank].clone(), requires_grad=False)
        cols = lambda w: nn.Parameter(w.tensor_split(tp, 1)[rank].clone(), requires_grad=False)
        self.embed = rows(sd["model.embed_tokens.weight"])
        self.vstart = sum(t.shape[0] for t in sd["model.embed_tokens.weight"].tensor_split(tp, 0)[:rank])
        self.head = rows(sd["lm_head.weight"])
        self.norm = sd["model.norm.weight"]
        self.rotary = hf.model.rotary_emb
        self.layers = []
        dev, dt = self.embed.device, self.embed.dtype
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            g = lambda n: sd[p + n]
            self.layers.append(dict(
                ln1=g("input_layernorm.weight"), ln2=g("post_attention_layernorm.weight"),
                qkv=torch.cat([rows(g("self_attn.q_proj.weight")), rows(g("self_attn.k_proj.weight")),
                               rows(g("self_attn.v_proj.weight"))]).detach(),
                o=cols(g("self_attn.o_proj.weight")).detach(),
                gu=torch.cat([rows(g("mlp.gate_proj.weight")), rows(g("mlp.up_proj.weight"))]).detach(),
                down=cols(g("mlp.down_proj.weight")).detach(),
                k=torch.zeros(batch, self.nkv, max_len, self.hd, device=dev, dtype=dt),
                v=torch.zeros(batch, self.nkv, max_len, self.hd, device=dev, dtype=dt)))

    def _rms(self, x, w):
        v = x.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * v.to(x.dtype)

    def _ar(self, x):
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    @staticmethod
    def _rope(x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    def forward(self, ids, pos):
        """Next tokens (argmax) for `ids` (b, s) at positions pos..pos+s-1."""
        b, s = ids.shape
        n = self.embed.shape[0]
        local = ids - self.vstart
        ok = (local >= 0) & (local < n)
        x = F.embedding(local.clamp(0, n - 1), self.embed) * ok[..., None]
        x = self._ar(x)
        positions = torch.arange(pos, pos + s, device=ids.device)[None].expand(b, s)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        hq, hk = self.nh * self.hd, self.nkv * self.hd
        for L in self.layers:
            y = self._rms(x, L["ln1"])
            q, k, v = F.linear(y, L["qkv"]).split([hq, hk, hk], -1)
            q = self._rope(q.view(b, s, self.nh, self.hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(b, s, self.nkv, self.hd).transpose(1, 2), cos, sin)
            L["k"][:, :, pos:pos + s] = k
            L["v"][:, :, pos:pos + s] = v.view(b, s, self.nkv, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, L["k"][:, :, :pos + s], L["v"][:, :, :pos + s],
                                               is_causal=s > 1, enable_gqa=True)
            x = x + self._ar(F.linear(a.transpose(1, 2).reshape(b, s, hq), L["o"]))
            gate, up = F.linear(self._rms(x, L["ln2"]), L["gu"]).chunk(2, -1)
            x = x + self._ar(F.linear(F.silu(gate) * up, L["down"]))
        return self._next(x)

    def _next(self, x):
        """Greedy next token from vocab-parallel logits: a (value, index) reduction."""
        logits = F.linear(self._rms(x[:, -1], self.norm), self.head).float()
        val, idx = logits.max(-1)
        if self.tp == 1:
            return idx
        pair = torch.stack([val.double(), (idx + self.vstart).double()], -1)
        allp = pair.new_empty((self.tp * pair.shape[0], 2))
        dist.all_gather_into_tensor(allp, pair, group=self.group)
        allp = allp.view(self.tp, -1, 2)                # (tp, b, 2)
        best = allp[..., 0].argmax(0)                   # the first maximum wins
        return allp[..., 1].gather(0, best[None])[0].long()

    def step(self, ids, pos):
        """`forward` with the position as a device tensor (shape (1,)) instead of a Python int:
        cache writes by `index_copy_`, attention over the whole cache under a mask (what HF's
        StaticCache does), so one call records as a CUDA graph and replays at any position."""
        b, s = ids.shape
        n = self.embed.shape[0]
        local = ids - self.vstart
        ok = (local >= 0) & (local < n)
        x = self._ar(F.embedding(local.clamp(0, n - 1), self.embed) * ok[..., None])
        positions = pos + torch.arange(s, device=ids.device)                # (s,)
        cos, sin = self.rotary(x, positions[None].expand(b, s))
        cos, sin = cos[:, None], sin[:, None]
        slots = torch.arange(self.layers[0]["k"].shape[2], device=ids.device)
        mask = (slots[None] <= positions[:, None])[None, None]              # (1, 1, s, max_len)
        hq, hk = self.nh * self.hd, self.nkv * self.hd
        for L in self.layers:
            y = self._rms(x, L["ln1"])
            q, k, v = F.linear(y, L["qkv"]).split([hq, hk, hk], -1)
            q = self._rope(q.view(b, s, self.nh, self.hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(b, s, self.nkv, self.hd).transpose(1, 2), cos, sin)
            L["k"].index_copy_(2, positions, k)
            L["v"].index_copy_(2, positions, v.view(b, s, self.nkv, self.hd).transpose(1, 2))
            a = F.scaled_dot_product_attention(q, L["k"], L["v"], attn_mask=mask,
                                               enable_gqa=True)
            x = x + self._ar(F.linear(a.transpose(1, 2).reshape(b, s, hq), L["o"]))
            gate, up = F.linear(self._rms(x, L["ln2"]), L["gu"]).chunk(2, -1)
            x = x + self._ar(F.linear(F.silu(gate) * up, L["down"]))
        return self._next(x)


# --- the decode loop every variant runs ------------------------------------------------------------
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def hf_decode(model, ids, new, timer):
    """Greedy decoding through the HF model's forward with a DynamicCache; per-step times."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = torch.argmax(out.logits[:, -1], -1)
    toks, times = [tok], []
    for _ in range(new - 1):
        t0 = timer.mark()
        out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
        tok = torch.argmax(out.logits[:, -1], -1)
        times.append(timer.ms(t0, timer.mark()))
        toks.append(tok)
    return [_plain(t) for t in toks], times


def static_decode(model, ids, new, timer, graph=False):
    """Greedy decoding through the HF model's forward with a StaticCache, each decode step the
    same call on fixed buffers (token, cache position); with `graph`, that step is captured once
    as a CUDA graph and replayed (no Python, no dispatch per token: what torch.compile's
    "reduce-overhead" mode does, without compiling)."""
    from transformers import StaticCache
    b, p = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(p, device=ids.device))
    tok = _plain(torch.argmax(out.logits[:, -1], -1))
    s_tok = tok[:, None].clone()
    s_pos = torch.full((1,), p, dtype=torch.long, device=ids.device)

    def step():
        o = model(input_ids=s_tok, past_key_values=cache, use_cache=True, cache_position=s_pos)
        return torch.argmax(o.logits[:, -1], -1)

    def reset():
        for layer in getattr(cache, "layers", ()):  # the cache's own write counter (transformers
            n = getattr(layer, "cumulative_length", None)   # 5.x) back to the prompt length:
            if isinstance(n, torch.Tensor):                   # warm-up wrote slots the steps
                n.fill_(p)                                    # rewrite before reading them
    return fixed_buffer_loop(step, s_tok, s_pos, p, tok, new, timer, graph, reset, _plain)


def fixed_buffer_loop(step, s_tok, s_pos, p, tok, new, timer, graph, after_warmup=None,
                      finish=lambda t: t):
    """Decode `new - 1` tokens after `tok` (position p - 1), each by `step()` reading the token
    from `s_tok` and its position from `s_pos` (both filled here); `finish` turns a step's
    output into the next token. With `graph`: three warm-up steps on a side stream,
    `after_warmup()`, then the step captured once as a CUDA graph and replayed per token (on
    CPU the warm-up runs, as a check of it, and the steps stay eager)."""
    toks, times = [tok], []
    if graph:
        cuda = s_tok.is_cuda
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(3):      # warm-up outside the graph (rewrites slot p, as step 0 will)
                step()
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        if cuda:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                s_out = step()
        else:
            graph = False
    for i in range(new - 1):
        t0 = timer.mark()
        s_tok.copy_(tok[:, None])
        s_pos.fill_(p + i)
        if graph:
            g.replay()
            tok = finish(s_out).clone()
        else:
            tok = finish(step())
        times.append(timer.ms(t0, timer.mark()))
        toks.append(tok)
    return toks, times


def graph_decode(model, ids, new, timer):
    return static_decode(model, ids, new, timer, graph=True)


def megatron_decode(model, ids, new, timer):
    pos = ids.shape[1]
    tok = model(ids, 0)
    toks, times = [tok], []
    for i in range(new - 1):
        t0 = timer.mark()
        tok = model(tok[:, None], pos + i)
        times.append(timer.ms(t0, timer.mark()))
        toks.append(tok)
    return toks, times


def megatron_static_decode(model, ids, new, timer, graph=False):
    """The hand-written floor's decode step on fixed buffers (`MegatronLlama.step`); with
    `graph`, captured once as a CUDA graph and replayed per token, like `static_decode`."""
    p = ids.shape[1]
    tok = model(ids, 0)                                    # prefill: the eager path
    s_tok = tok[:, None].clone()
    s_pos = torch.full((1,), p, dtype=torch.long, device=ids.device)
    return fixed_buffer_loop(lambda: model.step(s_tok, s_pos), s_tok, s_pos, p, tok, new, timer,
                             graph)


def megatron_graph_decode(model, ids, new, timer):
    return megatron_static_decode(model, ids, new, timer, graph=True)


def _plain(t):
    return t.full() if isinstance(t, st.ShardedTensor) else t


def run_variant(fn, model, ids, new, timer):
    with torch.inference_mode():
        fn(model, ids, new, timer)                  # warm-up: the same run (every cache length)
        toks, times = fn(model, ids, new, timer)
    return torch.stack([t.cpu() for t in toks], 1), times


def hf_tp_auto(serial, dtype, device, rank):
    """HuggingFace's own tensor parallelism, from a checkpoint saved offline."""
    from transformers import AutoModelForCausalLM
    path = [tempfile.mkdtemp(prefix="decode_bench_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    if rank == 0:
        serial.save_pretrained(path[0])
    dist.barrier()
    kw = dict(tp_plan="auto", dtype=dtype)
    m = AutoModelForCausalLM.from_pretrained(path[0], **kw)
    if next(m.parameters()).device != torch.device(device):
        m.to(device)       # at world 1 transformers skips tp_plan and leaves the model on the CPU
    return m.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="gloo, float32, tiny model (smoke test)")
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--new", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip: serial megatron hf_tp shardtensor")
    ap.add_argument("--variants", nargs="*", default=["static", "graph"],
                    help="extra variants: static (HF StaticCache, eager), graph (StaticCache "
                         "step captured as a CUDA graph, GPU only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cpu = a.cpu or not torch.cuda.is_available()
    pg = st.init_distributed("gloo" if cpu else "nccl") if "WORLD_SIZE" in os.environ else None
    if pg is None:
        raise SystemExit("run under torchrun (e.g. torchrun --nproc-per-node 2 benchmarks/decode.py --cpu)")
    rank, tp = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not cpu:
        torch.cuda.set_device(device)
    sizes, dtype = (CPU, torch.float32) if cpu else (GPU, torch.bfloat16)
    batches = a.batch or ([1, 4] if cpu else [1, 32])
    prompt, new = a.prompt or (16 if cpu else 128), a.new or (8 if cpu else 128)
    timer = Timer(device)
    serial = llama(sizes, dtype, device)
    rows = []
    hf_tp, hf_err = None, None
    if "hf_tp" not in a.skip:
        try:
            hf_tp = hf_tp_auto(serial, dtype, device, rank)
        except Exception as e:  # noqa: BLE001  (reported in the table)
            hf_err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    sharded = copy.deepcopy(serial)
    st.parallelize(sharded, pg)
    for b in batches:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(1, sizes["vocab"], (b, prompt), generator=g).to(device)
        results = {}
        if "serial" not in a.skip:
            results["serial (1 device)"] = run_variant(hf_decode, serial, ids, new, timer)
        if "megatron" not in a.skip:
            meg = MegatronLlama(serial, tp, rank, None, prompt + new, b)
            results["megatron (hand-written)"] = run_variant(megatron_decode, meg, ids, new, timer)
            del meg
        if "hf_tp" not in a.skip:
            if hf_tp is not None:
                try:
                    results['HF tp_plan="auto"'] = run_variant(hf_decode, hf_tp, ids, new, timer)
                except Exception as e:  # noqa: BLE001
                    results['HF tp_plan="auto"'] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                results['HF tp_plan="auto"'] = hf_err
        if "shardtensor" not in a.skip:
            results["shardtensor"] = run_variant(hf_decode, sharded, ids, new, timer)
        meg = None if "megatron" in a.skip else MegatronLlama(serial, tp, rank, None, prompt + new, b)
        if "static" in a.variants:
            results["serial, StaticCache"] = run_variant(static_decode, serial, ids, new, timer)
            if meg is not None:
                results["megatron, static"] = run_variant(megatron_static_decode, meg, ids, new, timer)
            results["shardtensor, StaticCache"] = run_variant(static_decode, sharded, ids, new, timer)
        if "graph" in a.variants:
            for name, fn, m in (("serial, CUDA graph", graph_decode, serial),
                                ("megatron, CUDA graph", megatron_graph_decode, meg),
                                ("shardtensor, CUDA graph", graph_decode, sharded)):
                if m is None:
                    continue
                try:
                    results[name] = run_variant(fn, m, ids, new, timer)
                except Exception as e:  # noqa: BLE001  (reported in the table)
                    results[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        del meg
        ref = results.get("serial (1 device)")
        for name, r in results.items():
            if isinstance(r, str) or r is None:
                rows.append(dict(batch=b, variant=name, error=r))
                continue
            toks, times = r
            same = None if ref is None else float((toks == ref[0]).float().mean())
            rows.append(dict(batch=b, variant=name, median_ms=statistics.median(times),
                             mean_ms=statistics.fmean(times), tokens_equal_serial=same))
    if rank == 0:
        print(f"decode latency per token, tp={tp}, {'CPU gloo float32' if cpu else 'GPU nccl bf16'}, "
              f"{sizes}, prompt {prompt}, {new} new tokens")
        print(f"{'batch':>5}  {'variant':<26} {'median ms':>10} {'mean ms':>10}  tokens = serial")
        for r in rows:
            if "error" in r:
                print(f"{r['batch']:>5}  {r['variant']:<26} n/a: {r['error']}")
            else:
                eq = "-" if r["tokens_equal_serial"] is None else f"{r['tokens_equal_serial']:.0%}"
                print(f"{r['batch']:>5}  {r['variant']:<26} {r['median_ms']:>10.3f} "
                      f"{r['mean_ms']:>10.3f}  {eq}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(tp=tp, device=str(device), sizes=sizes, prompt=prompt, new=new,
                               rows=rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
