"""Training features on a parallelized HuggingFace model: autocast, gradient accumulation,
dropout in train/eval mode, explain; and the README's demo command."""
import copy
import subprocess
import sys

import torch

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run


def _v(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach()


def _autocast(rank):
    pg = st.ProcessGroup()
    serial = build("llama", "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for("llama")
    out = []
    for m in (serial, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = m(**batch)
        o.loss.backward()
        out.append((_v(o.loss), _v(o.logits).dtype))
    grads = [(p.grad.full() if isinstance(p, st.ShardedTensor) else p.grad)
             for m in (model, serial) for p in m.parameters()]
    n = len(grads) // 2
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()
                for a, b in zip(grads[:n], grads[n:]))
    return out, worst


def test_autocast_bf16_on_cpu():
    (serial, sharded), worst = run(2, _autocast)[0]
    assert serial[1] == sharded[1] == torch.bfloat16          # autocast reached the shards
    assert abs(serial[0] - sharded[0]) <= 2e-2 * abs(serial[0])   # bf16 rounding, summed apart
    assert worst < 0.1


def _accumulate(rank):
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (serial, model)]
    for m, opt in zip((serial, model), opts):
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):          # three micro-batches, gradients accumulate
                (m(**inputs_for("gpt2", seed=10 * step + micro)).loss / 3).backward()
            opt.step()
    return max(((_v(p) - q).abs().max() / q.abs().max()).item()
               for p, q in zip(model.parameters(), serial.parameters()))


def test_gradient_accumulation_equals_serial():
    assert run(2, _accumulate)[0] < 1e-5


def _dropout(rank):
    # eager attention: its dropout is F.dropout, which config.dropout = "serial" makes equal to
    # the serial model's masks (sdpa's dropout_p draws inside the kernel: per-rank streams only)
    pg = st.ProcessGroup()
    serial = build("gpt2", "eager")
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(serial.config, k, 0.1)
    serial = type(serial)(serial.config)   # rebuilt with dropout active
    torch.manual_seed(0)
    serial.load_state_dict(build("gpt2", "eager").state_dict())
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for("gpt2")
    st.config.dropout = "serial"
    try:
        res = {}
        for mode in ("train", "eval"):
            losses = []
            for m in (serial, model):
                getattr(m, mode)()
                torch.manual_seed(123)
                losses.append(_v(m(**batch).loss))
            res[mode] = losses
        serial.train(), model.train()
        torch.manual_seed(5)
        a = _v(model(**batch).loss)
        b = _v(model(**batch).loss)     # a fresh mask: a different loss in train mode
    finally:
        st.config.dropout = "independent"
    return res, (a, b)


def test_dropout_train_and_eval_modes():
    res, (a, b) = run(2, _dropout)[0]
    s, p = res["train"]
    assert abs(s - p) <= 1e-5 * abs(s)                 # serial-equivalent masks
    s, p = res["eval"]
    assert abs(s - p) <= 1e-5 * abs(s)
    assert res["train"][0] != res["eval"][0]           # dropout really was active
    assert a != b


def _explain(rank):
    pg = st.ProcessGroup()
    model = build("gpt2", "sdpa", layers=1)
    st.parallelize(model, pg)
    ex = st.explain(model, **inputs_for("gpt2"), backward=True)
    return str(ex), [(r.op, r.output, r.collectives) for r in ex.rows]


def test_explain_lists_layouts_and_collectives():
    text, rows = run(2, _explain)[0]
    assert "F.embedding" in text and "PartialSpec()" in text and "all_reduce" in text
    addmm = [r for r in rows if r[0] == "torch.addmm" and r[1] != "(backward)"]
    assert len(addmm) == 4   # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert any(r[1].startswith("ShardSpec") and not r[2] for r in addmm)   # column: no comm
    assert any(r[1] == "ReplicaSpec()" and r[2] for r in addmm)           # row + bias: reduce
    fwd = [c for r in rows for c in r[2] if c[0] == "forward" and c[1] == "all_reduce"]
    bwd = [c for r in rows for c in r[2] if c[0] == "backward"]
    assert fwd and bwd


def test_readme_demo_command_runs():
    out = subprocess.run([sys.executable, "-m", "shardtensor.demo", "--steps", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK: tensor-parallel training matches serial" in out.stdout
    assert "all_reduce" in out.stdout
