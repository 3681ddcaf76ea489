"""python -m shardtensor.demo: a HuggingFace GPT-2, unchanged, tensor parallel over 2 CPU
processes, trained next to its serial self; prints both loss curves, the largest difference
and the communication report. Options: --world N, --steps N, --layers N."""
from __future__ import annotations

import argparse
import copy
import time


def _rank(rank: int, world: int, steps: int, layers: int):
    import torch
    import shardtensor as st
    from shardtensor.models_testing import build, inputs_for, weight_error

    pg = st.ProcessGroup(tp_degree=world)
    serial = build("gpt2", "sdpa", layers=layers, vocab=1001)   # vocab not divisible by tp
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)                                   # the one line
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (serial, model)]
    curves = {"serial": [], "tensor-parallel": []}
    step_time = {"serial": 0.0, "tensor-parallel": 0.0}
    for step in range(steps):
        batch = inputs_for("gpt2", batch=4, seq=32, vocab=1001, seed=step % 4)
        for name, m, opt in (("serial", serial, opts[0]), ("tensor-parallel", model, opts[1])):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            step_time[name] += time.perf_counter() - t0
            curves[name].append(float((loss.full() if isinstance(loss, st.ShardedTensor) else loss).detach()))
    worst = weight_error(model, serial)   # (skips GPT-2's zero-gradient key bias: see its doc)
    with st.CommTrace() as trace:
        model(**inputs_for("gpt2", batch=4, seq=32, vocab=1001)).loss.backward()
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in serial.parameters())
    return dict(curves=curves, worst=worst, summary=trace.summary(), local=local, total=total,
                step_time=step_time)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args(argv)
    import shardtensor as st
    print(f"GPT-2 ({a.layers} layers, hidden 32, vocab 1001) on {a.world} CPU processes (gloo), "
          f"AdamW + clip_grad_norm_, {a.steps} steps\n")
    res = st.launch(_rank, world_size=a.world, args=(a.world, a.steps, a.layers))[0]
    s, t = res["curves"]["serial"], res["curves"]["tensor-parallel"]
    print(f"{'step':>4}  {'serial loss':>12}  {'tensor-parallel':>15}  {'difference':>10}")
    for i, (x, y) in enumerate(zip(s, t)):
        print(f"{i:>4}  {x:>12.6f}  {y:>15.6f}  {abs(x - y):>10.2e}")
    print(f"\nlargest loss difference: {max(abs(x - y) for x, y in zip(s, t)):.2e}; largest "
          f"relative weight difference after training: {res['worst']:.2e}")
    print(f"parameters per rank: {res['local']:,} of {res['total']:,} "
          f"({res['local'] / res['total']:.2f})\n")
    print("communication of one training step (rank 0):")
    print(res["summary"])
    ok = max(abs(x - y) / abs(x) for x, y in zip(s, t)) < 1e-4 and res["worst"] < 1e-3
    print("\nOK: tensor-parallel training matches serial" if ok else "\nMISMATCH against serial")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
