"""Fine-tuning workflows on a parallelized model, each next to the same workflow on the serial
model: LoRA (hand-written, and peft's in both orders with parallelize), EMA / weight averaging,
plain torch.save / load_state_dict (assign=True too), weight and spectral normalisation and
other parametrizations, and the usual HF recipe (no-decay groups, frozen layers, train/eval,
accumulation, clip_grad_value_, zero_grad(set_to_none=False), lr schedulers)."""
import copy
import io

import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run

peft = pytest.importorskip("peft")


def _v(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach().double()


def _rel(a, b) -> float:
    a, b = _v(a), _v(b)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worst(xs, ys) -> float:
    return max(_rel(a, b) for a, b in zip(xs, ys))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_pair(pg, dtype=torch.float32):
    """A serial MLP and a Megatron-split copy (fc1 column-, fc2 row-parallel)."""
    torch.manual_seed(0)
    serial = _MLP().to(dtype)
    model = copy.deepcopy(serial)
    st.split_row(model.fc1.weight, pg)
    st.split_row(model.fc1.bias, pg)
    st.split_col(model.fc2.weight, pg)
    return serial, model


def _gpt2_pair(pg, arch="gpt2", dtype=torch.float32):
    serial = build(arch, "sdpa", dtype=dtype)
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    return serial, model


def _sgd_steps(models, arch="gpt2", steps=2, lr=0.1):
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr) for m in models]
    for step in range(steps):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(**inputs_for(arch, seed=step)).loss.backward()
            o.step()


# --- 1. LoRA ------------------------------------------------------------------------------------

def _train_side_by_side(serial, model, opts, seed, steps=3):
    """`steps` training steps of both models on the same float64 inputs (loss mean(y^2)):
    the largest relative errors of outputs and gradients per step, then of the weights."""
    torch.manual_seed(seed)
    errs = []
    for x in [torch.randn(4, 16, dtype=torch.float64) for _ in range(steps)]:
        outs = []
        for m, o in zip((serial, model), opts):
            o.zero_grad()
            y = m(x)
            (y * y).mean().backward()
            outs.append((y, [p.grad for p in m.parameters() if p.requires_grad]))
            o.step()
        errs.append(_rel(outs[1][0], outs[0][0]))
        errs.append(_worst(outs[1][1], outs[0][1]))
    errs.append(_worst(model.parameters(), serial.parameters()))
    return errs


class _LoRA(nn.Module):
    """x -> base(x) + x A^T B^T * scale, the base frozen."""

    def __init__(self, base, r=4, scale=2.0):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=base.weight.dtype) * 0.1)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def _handwritten_lora(rank, megatron):
    pg = st.ProcessGroup()
    serial, model = _mlp_pair(pg, torch.float64)
    torch.manual_seed(1)
    serial.fc1, serial.fc2 = _LoRA(serial.fc1), _LoRA(serial.fc2)
    torch.manual_seed(1)
    model.fc1, model.fc2 = _LoRA(model.fc1), _LoRA(model.fc2)
    if megatron:   # column-parallel base: B split like its output; row-parallel: A like its input
        st.split_row(model.fc1.B, pg)
        st.split_col(model.fc2.A, pg)
    for m in (serial, model):
        for name, p in m.named_parameters():
            p.requires_grad_(".base." not in name)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (serial, model)]
    errs = _train_side_by_side(serial, model, opts, seed=2)
    frozen = all(p.grad is None for n, p in model.named_parameters() if ".base." in n)
    # merging the adapters into the (sharded) base weights
    with torch.no_grad():
        for m in (serial, model):
            for lora in (m.fc1, m.fc2):
                lora.base.weight += (lora.B @ lora.A) * lora.scale
    errs.append(_worst(model.parameters(), serial.parameters()))
    return max(errs), frozen


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("megatron", [False, True])
def test_handwritten_lora_replicated_and_megatron_adapters(world, megatron):
    for err, frozen in run(world, _handwritten_lora, megatron):
        assert frozen
        assert err < 1e-10


_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
            "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _peft_lora(rank, arch, order, dora):
    pg = st.ProcessGroup()
    serial = build(arch, "sdpa", dtype=torch.float64)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS[arch], lora_dropout=0.0,
                          init_lora_weights=False, use_dora=dora)
    model = copy.deepcopy(serial)
    torch.manual_seed(5)
    serial = peft.get_peft_model(serial, cfg)
    if order == "lora_first":
        torch.manual_seed(5)
        model = peft.get_peft_model(model, cfg)
        st.parallelize(model, pg)
    else:   # parallelize, add adapters, parallelize again (lays the new adapters out)
        st.parallelize(model, pg)
        torch.manual_seed(5)
        model = peft.get_peft_model(model, cfg)
        st.parallelize(model, pg)
    layouts = {n: (p.spec if isinstance(p, st.ShardedTensor) else None)
               for n, p in model.named_parameters()}
    # SGD: HF computes the loss in float32, whose rounding AdamW would blow up on tiny gradients
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
            for m in (serial, model)]
    errs = {}
    for step in range(3):
        outs = []
        for m, o in zip((serial, model), opts):
            o.zero_grad()
            out = m(**inputs_for(arch, seed=step))
            out.loss.backward()
            outs.append((out.loss, [p.grad for p in m.parameters() if p.requires_grad]))
            o.step()
        errs[f"loss{step}"] = _rel(outs[1][0], outs[0][0])
        errs[f"grad{step}"] = _worst(outs[1][1], outs[0][1])
    errs["weights"] = _worst(model.parameters(), serial.parameters())
    merged = [m.merge_and_unload() for m in (serial, model)]
    errs["merged"] = _rel(merged[1](**inputs_for(arch)).logits, merged[0](**inputs_for(arch)).logits)
    return errs, layouts


@pytest.mark.parametrize("arch,order,dora", [("gpt2", "lora_first", False),
                                             ("gpt2", "parallelize_first", False),
                                             ("llama", "lora_first", False),
                                             ("llama", "parallelize_first", True)])
def test_peft_lora_matches_serial_and_shards_the_base(arch, order, dora):
    for errs, layouts in run(2, _peft_lora, arch, order, dora):
        # HF's loss is computed in float32, so the float64 models agree to ~1e-7
        assert max(errs.values()) < 1e-5, errs
        split = lambda n: layouts[n] is not None and layouts[n].is_shard
        for name in layouts:
            if arch == "gpt2" and name.endswith(("c_attn.base_layer.weight", "c_fc.base_layer.weight")):
                assert split(name) and layouts[name].dim == 1, name        # Conv1D (in, out)
            if arch == "llama" and "proj.base_layer.weight" in name:
                assert split(name), name
            # Megatron-LoRA: B split with a column-parallel base, A with a row-parallel one
            col = any(k in name for k in ("c_attn", "c_fc", "q_proj", "k_proj", "v_proj",
                                          "gate_proj", "up_proj"))
            if ".lora_B." in name:
                assert split(name) == col, (name, layouts[name])
            if ".lora_A." in name:
                assert split(name) != col, (name, layouts[name])
        if arch == "gpt2":
            assert layouts[[n for n in layouts if n.endswith("h.0.attn.c_attn.lora_B.default.weight")][0]].stride == 3
        else:
            assert split("base_model.model.lm_head.weight")     # an anchored glob still matches


def _peft_comm(rank):
    pg = st.ProcessGroup()
    model = peft.get_peft_model(build("llama", "sdpa"), peft.LoraConfig(
        r=4, target_modules=_TARGETS["llama"], init_lora_weights=False))
    st.parallelize(model, pg)
    with st.CommTrace() as trace:
        model(**inputs_for("llama")).loss.backward()
    return sorted({e.kind for e in trace.events})


def test_peft_lora_adds_no_gather():
    """Megatron-LoRA layouts: the adapters' outputs are shards or partial sums of the base
    layer's, so only small all-reduces of the rank-r activations are added, no all-gather."""
    assert run(2, _peft_comm)[0] == ["all_reduce"]


# --- 2. EMA / weight averaging -------------------------------------------------------------------

def _ema(rank, kind):
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn
    pg = st.ProcessGroup()
    serial, model = _gpt2_pair(pg, dtype=torch.float64)
    if kind == "deepcopy":
        emas = [copy.deepcopy(m) for m in (serial, model)]
    else:
        kw = {"swa": {}, "avg_fn": {"avg_fn": get_ema_avg_fn(0.9)},
              "multi": {"multi_avg_fn": get_ema_multi_avg_fn(0.9), "use_buffers": True}}[kind]
        emas = [AveragedModel(m, **kw) for m in (serial, model)]
    for step in range(3):
        _sgd_steps((serial, model), steps=1, lr=0.5)
        for e, m in zip(emas, (serial, model)):
            if kind == "deepcopy":
                with torch.no_grad():
                    torch._foreach_lerp_(list(e.parameters()), list(m.parameters()), 0.1)
            else:
                e.update_parameters(m)
    sharded = all(isinstance(p, st.ShardedTensor) for p in emas[1].parameters())
    out = [e(**inputs_for("gpt2", seed=9)).logits for e in emas]
    return _worst(emas[1].parameters(), emas[0].parameters()), _rel(out[1], out[0]), sharded


@pytest.mark.parametrize("kind", ["swa", "avg_fn", "multi", "deepcopy"])
def test_ema_and_weight_averaging(kind):
    for world in (2, 4):
        for w, out, sharded in run(world, _ema, kind):
            assert sharded and w < 1e-6 and out < 1e-6   # HF's float32 loss: ~1e-8


# --- 3. torch.save / load_state_dict -----------------------------------------------------------

def _plain_save(rank):
    pg = st.ProcessGroup()
    serial, model = _gpt2_pair(pg)
    opt = torch.optim.AdamW(model.parameters())
    model(**inputs_for("gpt2")).loss.backward()
    opt.step()
    errors = []
    for obj in (model.state_dict(), opt.state_dict(), model):
        try:
            torch.save(obj, io.BytesIO())
            errors.append(None)
        except TypeError as e:
            errors.append(str(e))
    # plain tensors from a serial state dict load (also through swap_tensors, torch's future
    # default); shards of the wrong shape are refused
    model.load_state_dict(serial.state_dict())
    same = _worst(model.parameters(), serial.parameters())
    params = list(model.parameters())
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict({k: v * 2 for k, v in serial.state_dict().items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    same = max(same, _worst(model.parameters(), [q * 2 for q in serial.parameters()]))
    same = max(same, float(not all(p is q for p, q in zip(params, model.parameters()))))
    try:
        model.load_state_dict({k: (v.to_local() if isinstance(v, st.ShardedTensor) else v)
                               for k, v in model.state_dict().items()})
        refused = False
    except RuntimeError as e:
        refused = "size mismatch" in str(e)
    return errors, same, refused


def test_plain_torch_save_names_st_save():
    for errors, same, refused in run(2, _plain_save):
        assert all(e is not None and "shardtensor.save" in e for e in errors), errors
        assert same == 0.0 and refused


def _assign(rank, source, meta, swap):
    pg = st.ProcessGroup()
    serial, model = _gpt2_pair(pg)
    if meta:
        with torch.device("meta"):
            model = type(serial)(serial.config)
        st.parallelize(model, pg)
    torch.manual_seed(3)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in serial.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]     # tied
    if source == "sharded":   # a state dict of another parallelized model
        other = copy.deepcopy(model) if not meta else _gpt2_pair(pg)[1]
        other.load_state_dict(sd)
        src = other.state_dict()
    else:   # (assign shares memory with the state dict: the serial model gets its own)
        src = {k: v.clone() for k, v in sd.items()}
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        serial.load_state_dict(sd, assign=True)
        model.load_state_dict(src, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    model.tie_weights()
    serial.tie_weights()
    layouts = [(type(p).__name__, p.spec if isinstance(p, st.ShardedTensor) else None,
                p.to_local().shape if isinstance(p, st.ShardedTensor) else None, p.is_meta)
               for p in model.parameters()]
    expect = [(None, tuple(q.to_local().shape)) for q in _gpt2_pair(pg)[1].parameters()]
    errs = [_worst(model.parameters(), serial.parameters())]
    _sgd_steps((serial, model))
    errs.append(_worst(model.parameters(), serial.parameters()))
    return layouts, [tuple(s) if s is not None else None for _, _, s, _ in layouts], expect, max(errs)


@pytest.mark.parametrize("source,meta,swap", [("full", False, False), ("sharded", False, False),
                                              ("full", True, False), ("full", False, True)])
def test_load_state_dict_assign_keeps_the_model_sharded(source, meta, swap):
    for layouts, shapes, expect, err in run(2, _assign, source, meta, swap):
        assert all(t == "ShardedTensor" and not m for t, _, _, m in layouts), layouts
        assert shapes == [s for _, s in expect]     # this rank's shard, not the full tensor
        assert err < 1e-5


# --- 4. parametrizations -------------------------------------------------------------------------

class _Scale(nn.Module):
    def forward(self, w):
        return w * 2.0

    def right_inverse(self, w):
        return w / 2.0


def _parametrized(rank, kind, dim):
    from torch.nn.utils import parametrizations, parametrize
    pg = st.ProcessGroup()
    serial, model = _mlp_pair(pg, torch.float64)
    for m in (serial, model):
        for lin in (m.fc1, m.fc2):
            torch.manual_seed(3)
            if kind == "weight_norm":
                parametrizations.weight_norm(lin, dim=dim)
            elif kind == "old_weight_norm":
                torch.nn.utils.weight_norm(lin, dim=dim)
            elif kind == "spectral_norm":
                parametrizations.spectral_norm(lin)
            else:
                parametrize.register_parametrization(lin, "weight", _Scale())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (serial, model)]
    errs = _train_side_by_side(serial, model, opts, seed=4)
    errs.append(_rel(model.fc1.weight, serial.fc1.weight))
    return max(errs), sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("kind,dim", [("weight_norm", 0), ("weight_norm", 1),
                                      ("weight_norm", None), ("old_weight_norm", 0),
                                      ("spectral_norm", None), ("scale", None)])
def test_parametrizations_of_sharded_weights(kind, dim):
    for world in (2, 4):
        for err, names in run(world, _parametrized, kind, dim):
            assert err < 1e-10, (kind, dim, err)


def _set_refused(rank):
    pg = st.ProcessGroup()
    a = st.ShardedTensor.from_global(torch.zeros(4, 4), pg, st.ShardSpec(0, 2))
    b = st.ShardedTensor.from_global(torch.ones(4, 4), pg, st.ShardSpec(0, 2))
    with torch.no_grad():
        a.set_(b)
    took = _v(a).sum().item()
    try:
        with torch.no_grad():
            a.set_(torch.ones(2, 4))
        return took, None
    except st.ShardingError as e:
        return took, str(e)


def test_set_takes_a_same_layout_source_and_refuses_others():
    took, err = run(2, _set_refused)[0]
    assert took == 16.0
    assert err and "set_" in err and "same layout" in err


class _Orthonormal(nn.Module):
    """right_inverse through an op with no sharding rule (an SVD), forward supported."""

    def forward(self, w):
        return w * 1.0

    def right_inverse(self, w):
        return torch.linalg.svd(w)[0]


def _right_inverse_unsupported(rank):
    from torch.nn.utils import parametrize
    pg = st.ProcessGroup()
    lin = nn.Linear(4, 4, dtype=torch.float64)
    st.split_row(lin.weight, pg)
    before = _v(lin.weight).clone()
    try:
        parametrize.register_parametrization(lin, "weight", _Orthonormal())
    except Exception as e:   # noqa: BLE001 (the test looks at the kind and the message)
        return type(e).__name__, str(e), parametrize.is_parametrized(lin), \
            bool((_v(lin.weight) == before).all())
    return None, None, parametrize.is_parametrized(lin), None


def test_unsupported_op_in_right_inverse_is_not_taken_for_identity():
    """torch's register_parametrization catches NotImplementedError from right_inverse and
    then takes it for the identity: an UnsupportedOpError (a NotImplementedError) there
    silently registered the untransformed weight. It is re-raised as a RuntimeError."""
    kind, msg, registered, unchanged = run(2, _right_inverse_unsupported)[0]
    assert kind == "UnsupportedOpInParametrizationError", (kind, msg)
    assert "linalg_svd" in msg.replace(".", "_") and "right_inverse" in msg
    assert not registered and unchanged


# --- 5. the HF fine-tuning recipe ---------------------------------------------------------------

def _recipe(rank, arch):
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names
    pg = st.ProcessGroup()
    serial, model = _gpt2_pair(pg, arch, torch.float64)
    opts, scheds = [], []
    for m in (serial, model):
        for name, p in m.named_parameters():     # freeze the embeddings and the first block
            if "wte" in name or "embed_tokens" in name or ".0." in name:
                p.requires_grad_(False)
        decay = get_parameter_names(m, ALL_LAYERNORM_LAYERS + [nn.LayerNorm], ["bias", "norm"])
        groups = [{"params": [p for n, p in m.named_parameters() if p.requires_grad and n in decay],
                   "weight_decay": 0.1},
                  {"params": [p for n, p in m.named_parameters()
                              if p.requires_grad and n not in decay], "weight_decay": 0.0}]
        o = torch.optim.AdamW(groups, lr=1e-3)
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=2)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[2]))
    norms, evals, n = [], [], 2
    for step in range(3):
        for m, o, s in zip((serial, model), opts, scheds):
            m.train()
            o.zero_grad(set_to_none=False)
            for micro in range(n):
                (m(**inputs_for(arch, seed=10 * step + micro)).loss / n).backward()
            torch.nn.utils.clip_grad_value_(m.parameters(), 0.05)
            norms.append(_v(torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)).item())
            o.step()
            s.step()
            m.eval()
            with torch.no_grad():
                evals.append(_v(m(**inputs_for(arch, seed=99)).loss).item())
    frozen = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    from shardtensor.models_testing import weight_error
    return weight_error(model, serial), norms, evals, frozen


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_recipe_groups_freezing_accumulation_clipping_schedulers(arch):
    for world in (2, 4):
        for err, norms, evals, frozen in run(world, _recipe, arch):
            assert frozen and err < 1e-6
            for a, b in zip(norms[1::2], norms[::2]):
                assert abs(a - b) <= 1e-6 * b
            for a, b in zip(evals[1::2], evals[::2]):
                assert abs(a - b) <= 1e-6 * b


# --- found on the way: an all-reduce of summands whose strides differ between ranks -------------

def _permuted_summands(rank):
    pg = st.ProcessGroup()
    torch.manual_seed(0)
    a = torch.randn(1, 1, 4, 1, dtype=torch.float64)
    b = torch.randn(1, 6, 4, 1, dtype=torch.float64)
    # d (size 1) split over the ranks: rank 0's einsum output is a permuted (non-contiguous)
    # summand, the empty shards' outputs are contiguous zeros
    out = torch.einsum("bind,bjnd->bnij", a, st.ShardedTensor.from_global(b, pg, st.ShardSpec(-1, 2)))
    return _rel(out.full(), torch.einsum("bind,bjnd->bnij", a, b))


def test_partial_sum_of_summands_with_rank_dependent_strides():
    assert max(run(2, _permuted_summands)) < 1e-12
