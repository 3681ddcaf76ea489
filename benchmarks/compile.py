"""Does torch.compile help a parallelized model? CPU, world 1, an HF GPT-2 (2 layers) forward.

    python benchmarks/compile.py [--json out.json]

Reports dynamo's graph count and graph breaks on the sharded model, the first compiled call's
time, the compiled output's largest difference from serial, and the forward time of serial,
sharded eager, sharded compiled and serial compiled (mean of 20 calls after 3 warm-up calls).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shardtensor as st  # noqa: E402
from shardtensor.models_testing import build, inputs_for  # noqa: E402


def per_call_ms(f, n=20):
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(st.launch.__globals__["free_port"]()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa", layers=2, vocab=61).eval()
    sharded = copy.deepcopy(serial)
    st.parallelize(sharded, pg)
    batch = inputs_for("gpt2")
    batch.pop("labels")
    plain = lambda t: t.full() if isinstance(t, st.ShardedTensor) else t
    import torch._dynamo as dynamo
    with torch.no_grad():
        ref = serial(**batch).logits
        expl = dynamo.explain(sharded)(**batch)
        dynamo.reset()
        compiled = torch.compile(sharded)
        t0 = time.perf_counter()
        out = plain(compiled(**batch).logits)
        first_s = time.perf_counter() - t0
        serial_compiled = torch.compile(serial)
        res = dict(torch=torch.__version__, graphs=expl.graph_count, breaks=expl.graph_break_count,
                   first_reasons=sorted({str(b.reason).splitlines()[0][:160]
                                         for b in expl.break_reasons})[:5],
                   first_call_s=first_s, max_abs_diff=float((out - ref).abs().max()),
                   serial_ms=per_call_ms(lambda: serial(**batch)),
                   sharded_eager_ms=per_call_ms(lambda: sharded(**batch)),
                   sharded_compiled_ms=per_call_ms(lambda: compiled(**batch)),
                   serial_compiled_ms=per_call_ms(lambda: serial_compiled(**batch)))
    print(f"torch {res['torch']}, CPU, 1 thread, world 1, HF GPT-2 (2 layers) forward")
    print(f"dynamo on the sharded model: {res['graphs']} graphs, {res['breaks']} breaks; reasons:")
    for r in res["first_reasons"]:
        print(f"  {r}")
    print(f"first compiled call {res['first_call_s']:.1f} s; compiled vs serial max |diff| "
          f"{res['max_abs_diff']:.2e}")
    print(f"serial {res['serial_ms']:.2f} ms, sharded eager {res['sharded_eager_ms']:.2f} ms, "
          f"sharded compiled {res['sharded_compiled_ms']:.2f} ms, serial compiled "
          f"{res['serial_compiled_ms']:.2f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
