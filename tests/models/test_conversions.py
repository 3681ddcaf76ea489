"""What a PyTorch user does to a whole model after annotating it: convert it (`model.to(dtype)`,
`.half()`, `.double()`: the same parameter objects, now in the new dtype, gradients too) and
train it under `torch.amp.GradScaler` (unscale, clip, skip steps with an inf, alike on every
rank)."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.models_testing import build, inputs_for, weight_error
from shardtensor.testing import run


def _v(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach()


def _pair(pg, attn):
    """A small GPT-2, a parallelized copy of it, and a batch."""
    serial = build("gpt2", attn)
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    return serial, model, inputs_for("gpt2")


def _convert(rank, how, swap):
    pg = st.ProcessGroup()
    serial, model, batch = _pair(pg, "eager")
    for m in (serial, model):
        m(**batch).loss.backward()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    before = [(_v(p), _v(p.grad)) for p in params]
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for m in (serial, model):
            if how == "half":
                m.half()
            elif how == "double":
                m.double()
            else:
                m.to(getattr(torch, how))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    dtype = next(serial.parameters()).dtype
    same_objects = all(a is b for a, b in zip(params, model.parameters()))
    checks = []
    for (name, p), (w, g) in zip(model.named_parameters(), before):
        checks.append((name, p.dtype == dtype, p.to_local().dtype == dtype,
                       p.grad.dtype == dtype, p.grad.to_local().dtype == dtype,
                       isinstance(p, torch.nn.Parameter), isinstance(p, st.ShardedTensor),
                       torch.equal(_v(p), w.to(dtype)), torch.equal(_v(p.grad), g.to(dtype))))
    # the converted model trains like the converted serial one
    for m in (serial, model):
        m.zero_grad()
        m(**batch).loss.float().backward()
    grad_err = max(((_v(p.grad).double() - q.grad.double()).abs().max()
                    / q.grad.double().abs().max().clamp_min(1e-3)).item()
                   for p, q in zip(model.parameters(), serial.parameters()))
    opt.step()   # the optimizer built before the conversion still holds the parameters
    return same_objects, checks, grad_err, str(dtype)


# HF's loss upcasts logits with `.float()`: even a float64 model's loss is float32 math, which
# the vocab-parallel loss sums in another order (gradients differ by ~3e-8)
@pytest.mark.parametrize("how,tol", [("double", 1e-6), ("bfloat16", 5e-2), ("half", 5e-3)])
def test_model_conversion_keeps_parameters(how, tol):
    same, checks, err, dtype = run(2, _convert, how, False)[1]
    assert same, "model.to() replaced parameter objects (an optimizer would lose them)"
    bad = [c for c in checks if not all(c[1:])]
    assert not bad, f"after model.{how}() ({dtype}): {bad[:3]}"
    assert err < tol, f"gradients after conversion differ from serial's by {err:.2e}"


def test_model_conversion_with_swap_on_conversion():
    same, checks, err, dtype = run(2, _convert, "double", True)[0]
    assert same
    assert not [c for c in checks if not all(c[1:])]
    assert err < 1e-6


def _scaler(rank, steps, inject):
    pg = st.ProcessGroup()
    serial, model, batch = _pair(pg, "sdpa")
    log = []
    for m in (serial, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scales = []
        for step in range(steps):
            opt.zero_grad()
            scaler.scale(m(**batch).loss).backward()
            if step == inject:
                # an inf in one element of the serial gradient: in the sharded model it lies in
                # exactly one rank's shard of the MLP's column-parallel weight
                w = m.transformer.h[0].mlp.c_fc.weight
                if isinstance(w, st.ShardedTensor):
                    if rank == w.pg.tp_world_size() - 1:
                        w.grad.to_local()[0, -1] = float("inf")
                else:
                    w.grad[0, -1] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            before = _v(m.lm_head.weight).clone()
            scaler.step(opt)
            scaler.update()
            scales.append((scaler.get_scale(), torch.equal(before, _v(m.lm_head.weight))))
        log.append(scales)
    return log, weight_error(model, serial)


@pytest.mark.parametrize("world", [2, 4])
def test_grad_scaler_matches_serial_and_skips_on_every_rank(world):
    out = run(world, _scaler, 4, 2)
    serial_log = out[0][0][0]
    assert [s for s, _ in serial_log] == [1024.0, 1024.0, 512.0, 512.0]   # step 2 skipped
    assert [skipped for _, skipped in serial_log] == [False, False, True, False]
    for log, err in out:
        assert log[1] == serial_log      # every rank skipped exactly the serial step
        assert err < 1e-4
