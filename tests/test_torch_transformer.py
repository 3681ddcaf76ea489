"""torch's own transformer modules under tensor parallelism: nn.MultiheadAttention,
nn.TransformerEncoderLayer / DecoderLayer, nn.TransformerEncoder and nn.Transformer, annotated the
Megatron way (fused in_proj "row" with stride 3, out_proj "col", linear1 "row", linear2 "col"),
against the serial module on the same weights: outputs, every parameter's gradient and one SGD
step, at worlds 1, 2 and 4, in float64 and float32."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import run

MHA_PLAN = {
    "*in_proj_weight": ("row", {"stride": 3}),     # fused q|k|v, (3E, E): column parallel
    "*in_proj_bias": ("row", {"stride": 3}),
    "*[qkv]_proj_weight": "row",                   # kdim/vdim != embed_dim: separate q, k, v
    "*bias_[kv]": "col",                           # (1, 1, E): over the heads like k and v
    "*out_proj.weight": "col",                     # row parallel
    "*": "replicate",
}
LAYER_PLAN = dict(MHA_PLAN, **{"*linear1.weight": "row", "*linear1.bias": "row",
                               "*linear2.weight": "col"})
LAYER_PLAN["*"] = LAYER_PLAN.pop("*")              # the catch-all stays last


def _rel(a, b):
    """Relative error; a value that is zero up to rounding (the gradient of a query over a
    single key) is compared absolutely, at the rounding of its dtype."""
    floor = 1e-3 if b.dtype == torch.float32 else 1e-6
    a = (a.full() if isinstance(a, st.ShardedTensor) else a).detach().double()
    b = b.detach().double()
    # a fully padded row (the right-padded key mask at L=1) is NaN in torch < 2.5's serial
    # attention, and must be NaN at the same places in the parallel one
    nan = b.isnan()
    if not torch.equal(a.isnan(), nan):
        return float("inf")
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def _mask(g, shape, kind, dtype):
    """A random mask that never masks a whole row (no NaN rows): bool (True = masked) or float."""
    m = torch.rand(shape, generator=g) < 0.3
    m[..., 0] = False
    return m if kind == "bool" else torch.zeros(shape, dtype=dtype).masked_fill(m, float("-inf"))


def _build(c, g):
    """(module, positional inputs, keyword inputs) for case `c` (a dict of options)."""
    dt = getattr(torch, c.get("dtype", "float64"))
    kind = c["kind"]
    E, H, B, L = c["E"], c["H"], c["B"], c["L"]
    S = L if kind == "mha" and c.get("qkv", "self") == "self" else c.get("S", L)
    bf = c.get("batch_first", False)
    x = lambda n, e=E: torch.randn((B, n, e) if bf else (n, B, e), generator=g, dtype=dt)
    kw = {}
    if kind == "mha":
        m = nn.MultiheadAttention(E, H, bias=c.get("bias", True), batch_first=bf,
                                  add_bias_kv=c.get("add_bias_kv", False),
                                  add_zero_attn=c.get("add_zero_attn", False),
                                  kdim=c.get("kdim"), vdim=c.get("vdim"),
                                  dropout=c.get("dropout", 0.0))
        q = x(L)
        qkv = c.get("qkv", "self")
        if qkv == "self":
            args = (q, q, q)
        elif qkv == "cross":              # key is value
            kv = x(S)
            args = (q, kv, kv)
        else:                              # three tensors (kdim, vdim may differ)
            args = (q, x(S, c.get("kdim") or E), x(S, c.get("vdim") or E))
        if c.get("unbatched"):
            args = tuple(a[0] if bf else a[:, 0] for a in args)
            if qkv == "self":
                args = (args[0],) * 3
            elif qkv == "cross":
                args = (args[0], args[1], args[1])
        kw["need_weights"] = c.get("need_weights", False)
        kw["average_attn_weights"] = c.get("average", True)
        if c.get("kpm"):
            kw["key_padding_mask"] = _mask(g, (S,) if c.get("unbatched") else (B, S), c["kpm"], dt)
        if c.get("attn_mask"):
            heads = (1 if c.get("unbatched") else B) * H
            shape = (L, S) if c.get("mask3d") is None else (heads, L, S)
            kw["attn_mask"] = _mask(g, shape, c["attn_mask"], dt)
        if c.get("causal"):
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=dt)
            kw["is_causal"] = True
        return m, args, kw
    layer_kw = dict(dim_feedforward=c.get("ffn", 2 * E), dropout=c.get("dropout", 0.0),
                    batch_first=bf,
                    norm_first=c.get("norm_first", False), activation=c.get("act", "relu"))
    src, mem = x(L), x(S)
    if kind == "enc":
        m = nn.TransformerEncoderLayer(E, H, **layer_kw)
        args = (src,)
    elif kind == "dec":
        m = nn.TransformerDecoderLayer(E, H, **layer_kw)
        args = (src, mem)
    elif kind == "encoder":
        m = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, **layer_kw), c.get("layers", 2),
                                  enable_nested_tensor=c.get("nested", True))
        args = (src,)
    else:
        m = nn.Transformer(E, H, c.get("layers", 1), c.get("layers", 1), **layer_kw)
        args = (src, mem)
    if c.get("causal"):
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=dt)
        kw.update({"encoder": dict(mask=mask, is_causal=True),
                   "enc": dict(src_mask=mask, is_causal=True),
                   "dec": dict(tgt_mask=mask, tgt_is_causal=True),
                   "transformer": dict(tgt_mask=mask, tgt_is_causal=True)}[kind])
    if c.get("kpm"):
        pad = _mask(g, (B, L), c["kpm"], dt)
        if c.get("kpm") == "bool":          # right-padded: the nested-tensor fast path's shape
            lengths = torch.tensor([L - i % 2 for i in range(B)])
            pad = torch.arange(L).expand(B, L) >= lengths[:, None]
        name = {"encoder": "src_key_padding_mask", "enc": "src_key_padding_mask",
                "dec": "tgt_key_padding_mask", "transformer": "src_key_padding_mask"}[kind]
        kw[name] = pad
    return m, args, kw


def _compare(rank, tp, c):
    """Serial and parallel module on the same weights and inputs: relative errors of outputs,
    gradients and parameters after one SGD step; collective counts of the parallel step."""
    dt = getattr(torch, c.get("dtype", "float64"))
    pg = st.ProcessGroup(tp_degree=tp)
    g = torch.Generator().manual_seed(c.get("seed", 0))
    torch.manual_seed(c.get("seed", 0))
    serial, args, kw = _build(c, g)
    serial = serial.to(dt)
    if c.get("eval"):
        serial.eval()
    model = st.parallelize(copy.deepcopy(serial), pg, plan=c.get("plan", LAYER_PLAN))
    specs = {n: p.spec for n, p in model.named_parameters()}
    pargs = args
    if c.get("input"):                     # the input arrives as a ShardedTensor
        spec = st.PartialSpec() if c["input"] == "partial" else \
            st.ShardSpec(0 if c.get("batch_first") else 1, tp)
        wrapped = {}
        pargs = tuple(wrapped.setdefault(id(a), st.ShardedTensor.from_global(a, pg, spec))
                      for a in args)       # one wrapper per distinct input (query is key stays)
    if c.get("dropout"):                   # masks equal serial's (config.dropout = "serial")
        st.config.dropout = "serial"
    try:
        torch.manual_seed(1)
        ref = serial(*args, **kw)
        torch.manual_seed(1)
        trace = st.CommTrace()
        with trace:
            out = model(*pargs, **kw)
    finally:
        st.config.dropout = "independent"
    ref, out = ((r if isinstance(r, tuple) else (r,)) for r in (ref, out))
    errs = {}
    loss_ref, loss = 0, 0
    for i, (r, o) in enumerate(zip(ref, out)):
        if r is None:
            assert o is None
            continue
        errs[f"out{i}"] = _rel(o, r)
        w = torch.randn(r.shape, generator=g, dtype=dt)   # a random cotangent (a sum after a
        loss_ref = loss_ref + (r * w).sum()                # layer norm has ~zero gradient)
        loss = loss + (o * w).sum()
    if not c.get("eval"):
        loss_ref.backward()
        with trace:
            loss.backward()
        for (name, p), q in zip(model.named_parameters(), serial.parameters()):
            if q.grad is None:
                assert p.grad is None, name
                continue
            assert isinstance(p.grad, st.ShardedTensor) and p.grad.spec == p.spec, name
            errs["grad " + name] = _rel(p.grad, q.grad)
        for m_ in (serial, model):
            # SGD, not Adam: a k bias's gradient is zero up to rounding, which Adam's
            # normalisation would blow up to +-lr in either model
            opt = torch.optim.SGD(m_.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
            opt.step()
        for (name, p), q in zip(model.named_parameters(), serial.parameters()):
            errs["step " + name] = _rel(p, q)
    counts = {}
    for e in trace.events:
        counts[e.phase, e.kind] = counts.get((e.phase, e.kind), 0) + 1
    return errs, counts, specs


def _compare_all(rank, tp, cases):
    out = []
    for c in cases:
        try:
            out.append(_compare(rank, tp, c))
        except Exception as e:
            raise RuntimeError(f"case {c}: {type(e).__name__}: {e}") from e
    return out


def _tol(c):
    if c.get("dtype") == "float32":
        return 1e-5 if c["kind"] == "mha" else 1e-4
    return 1e-10 if c["kind"] == "mha" else 1e-8


def _check_all(tp, cases):
    """Run every case at this world size (one pool task); return their collective counts."""
    counts = []
    for c, (errs, n, _) in zip(cases, run(tp, _compare_all, tp, cases)[0]):
        bad = {k: v for k, v in errs.items() if not v < _tol(c)}
        assert not bad, (c, bad)
        counts.append(n)
    return counts


SMALL = dict(E=8, H=4, B=2, L=5, S=6)   # 4 heads: whole heads at tp 1, 2 and 4

MHA_CASES = [dict(SMALL, kind="mha", **o) for o in (
    {}, {"need_weights": True}, {"need_weights": True, "average": False},
    {"batch_first": True}, {"batch_first": True, "need_weights": True, "qkv": "cross"},
    {"qkv": "cross"}, {"qkv": "three"}, {"qkv": "three", "kdim": 5, "vdim": 7},
    {"qkv": "three", "kdim": 5, "vdim": 7, "need_weights": True, "batch_first": True},
    {"kpm": "bool"}, {"kpm": "float", "need_weights": True}, {"attn_mask": "bool"},
    {"attn_mask": "float", "need_weights": True}, {"attn_mask": "float", "mask3d": True},
    {"attn_mask": "bool", "mask3d": True, "kpm": "bool", "need_weights": True, "qkv": "cross"},
    {"causal": True}, {"causal": True, "need_weights": True}, {"causal": True, "kpm": "bool"},
    {"bias": False}, {"add_bias_kv": True, "need_weights": True},
    {"add_zero_attn": True, "kpm": "bool", "attn_mask": "bool"},
    {"add_bias_kv": True, "add_zero_attn": True, "kpm": "float", "attn_mask": "float",
     "qkv": "cross", "need_weights": True},
    {"unbatched": True}, {"unbatched": True, "kpm": "bool", "need_weights": True, "qkv": "cross"},
    {"eval": True, "need_weights": True}, {"dtype": "float32", "need_weights": True, "kpm": "bool"},
    # attention dropout with config.dropout = "serial": the masks equal serial's
    {"dropout": 0.3}, {"dropout": 0.3, "need_weights": True, "kpm": "bool"},
    {"dropout": 0.3, "causal": True, "batch_first": True},
)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_multihead_attention_equals_serial(tp):
    # before: F.multi_head_attention_forward had no rule (UnsupportedOpError for every case)
    for c, n in zip(MHA_CASES, _check_all(tp, MHA_CASES)):
        # Megatron's count: q|k|v column parallel, attention on each rank's heads, out_proj
        # reduced once; the inputs are plain here, so nothing is all-reduced backward
        want = {} if tp == 1 or not c.get("bias", True) else {("forward", "all_reduce"): 1}
        assert n == want, (c, n)


LAYER_CASES = [dict(SMALL, **o) for o in (
    {"kind": "enc"}, {"kind": "enc", "norm_first": True, "act": "gelu"},
    {"kind": "enc", "batch_first": True, "kpm": "bool", "causal": True},
    {"kind": "enc", "eval": True, "kpm": "bool"},
    {"kind": "dec"}, {"kind": "dec", "norm_first": True, "act": "gelu", "batch_first": True,
                      "causal": True, "kpm": "bool"},
    {"kind": "encoder", "layers": 2}, {"kind": "encoder", "layers": 2, "kpm": "bool"},
    {"kind": "transformer"},
    {"kind": "transformer", "batch_first": True, "norm_first": True, "causal": True, "kpm": "bool"},
    {"kind": "transformer", "eval": True},
    {"kind": "transformer", "dtype": "float32", "layers": 2, "causal": True},
    {"kind": "enc", "dropout": 0.2, "norm_first": True, "causal": True},   # serial masks
    {"kind": "transformer", "dropout": 0.2, "kpm": "bool", "batch_first": True},
)]
# forward all-reduces per module: 2 per encoder layer (attention, MLP), 3 per decoder layer
_FORWARD = {"enc": 2, "dec": 3, "encoder": 4, "transformer": 5}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_transformer_layers_equal_serial(tp):
    for c, n in zip(LAYER_CASES, _check_all(tp, LAYER_CASES)):
        if tp == 1:
            assert not n, (c, n)
            continue
        assert not [k for k in n if k[1] != "all_reduce"], (c, n)    # no all-gather anywhere
        layers = c.get("layers", 1)
        want = {"transformer": 5 * layers}.get(c["kind"], _FORWARD[c["kind"]])
        assert n[("forward", "all_reduce")] == want, (c, n)


@settings(max_examples=20, deadline=None)
@given(data=hs.data())
def test_multihead_attention_shapes_property(data):
    tp = data.draw(hs.sampled_from([1, 2, 4]), "tp")
    H = tp * data.draw(hs.integers(1, 2), "heads per rank")
    kind = data.draw(hs.sampled_from(["mha", "mha", "enc", "dec"]), "kind")
    c = dict(kind=kind, H=H, E=H * data.draw(hs.integers(1, 3), "head_dim"),
             B=data.draw(hs.integers(1, 3), "B"), L=data.draw(hs.integers(1, 5), "L"),
             S=data.draw(hs.integers(1, 5), "S"), batch_first=data.draw(hs.booleans(), "bf"),
             dtype=data.draw(hs.sampled_from(["float32", "float64"]), "dtype"),
             kpm=data.draw(hs.sampled_from([None, "bool", "float"]), "kpm"))
    if kind == "mha":
        c.update(qkv=data.draw(hs.sampled_from(["self", "cross", "three"]), "qkv"),
                 need_weights=data.draw(hs.booleans(), "need_weights"),
                 attn_mask=data.draw(hs.sampled_from([None, "bool", "float"]), "attn_mask"),
                 mask3d=data.draw(hs.sampled_from([None, True]), "mask3d"))
        if c["qkv"] == "three" and data.draw(hs.booleans(), "kdim"):
            c.update(kdim=data.draw(hs.integers(1, 6)), vdim=data.draw(hs.integers(1, 6)))
    else:
        c.update(norm_first=data.draw(hs.booleans(), "norm_first"),
                 ffn=data.draw(hs.integers(1, 9), "ffn"),
                 act=data.draw(hs.sampled_from(["relu", "gelu"]), "act"))
        if c["kpm"] == "float":
            c["kpm"] = "bool"
        # a layer norm over a few features is ill-conditioned (over 2 its output is +-1: the
        # gradient through it is rounding noise, in the serial model too)
        c["E"] = H * -(-4 // H) * (c["E"] // H)
        if c["E"] < 8:
            c["dtype"] = "float64"
    _check_all(tp, [c])


def test_projection_layouts_other_than_megatron_still_equal_serial():
    wrong = dict(MHA_PLAN, **{"*in_proj_weight": "row", "*in_proj_bias": "row"})   # no stride
    repl = {"*in_proj_*": "replicate", **MHA_PLAN}          # out_proj only (first glob wins)
    cases = [dict(SMALL, kind="mha", plan=wrong, need_weights=True),
             dict(SMALL, kind="mha", plan=repl, need_weights=True),
             dict(SMALL, kind="mha", plan={"*": "replicate"}),
             dict(SMALL, kind="mha", input="partial", qkv="cross")]     # a pending sum comes in
    wrong_n, repl_n, all_n, partial_n = _check_all(2, cases)
    assert wrong_n[("forward", "all_gather")] >= 1, wrong_n   # the missing stride is visible
    # replicated attention output sliced into out_proj: its gradient is gathered backward
    assert repl_n == {("forward", "all_reduce"): 1, ("backward", "all_gather"): 1}, repl_n
    assert all_n == {}, all_n
    assert partial_n == {("forward", "all_reduce"): 3}, partial_n     # query, key|value, out_proj


def _heads_error(rank, tp, kind, E, H, plan):
    pg = st.ProcessGroup(tp_degree=tp)
    c = dict(kind=kind, E=E, H=H, B=2, L=3)
    m, args, kw = _build(c, torch.Generator().manual_seed(0))
    model = st.parallelize(m.double(), pg, plan=plan)
    try:
        model(*args, **kw)
    except st.ShardingError as e:
        return str(e)
    return None


@pytest.mark.parametrize("tp,E,H", [(4, 8, 2), (2, 12, 3)])
def test_heads_not_dividing_the_degree_is_a_clear_error(tp, E, H):
    msg = run(tp, _heads_error, tp, "enc", E, H, None)[0]    # the built-in plan shards q|k|v
    assert msg is not None and "F.multi_head_attention_forward" in msg, msg
    assert "cuts a head" in msg and f"ShardSpec(dim=0, degree={tp}, stride=3)" in msg, msg
    assert "replicate in_proj_weight" in msg, msg
    # what the message suggests works
    c = dict(kind="enc", E=E, H=H, B=2, L=3, plan={"*in_proj_*": "replicate", **LAYER_PLAN})
    _check_all(tp, [c])


@pytest.mark.parametrize("tp", [2, 4])
def test_encoder_eval_nested_tensor_check_with_sharded_input(tp):
    # nn.TransformerEncoder (eval, batch_first, padding mask) asks
    # torch._nested_tensor_from_mask_left_aligned about its input before seeing the sharded
    # parameters: a partial or sharded input raised UnsupportedOpError there
    serial = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 4, 16, batch_first=True), 2)
    assert serial.use_nested_tensor                    # the serial model takes the fast path
    base = dict(SMALL, kind="encoder", layers=2, eval=True, batch_first=True, kpm="bool")
    _check_all(tp, [dict(base, input="partial"), dict(base, input="batch"),
                    dict(base, input="partial", causal=True)])


def _builtin(rank, tp):
    pg = st.ProcessGroup(tp_degree=tp)

    class Transformer(nn.Module):          # a model of one's own that shares torch's class name
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(8, 8)

    class MyEncoder(nn.TransformerEncoder):   # a subclass keeps torch's parameter names
        pass

    try:
        st.parallelize(Transformer(), pg)
        own = None
    except KeyError as e:
        own = str(e)
    enc = st.parallelize(MyEncoder(nn.TransformerEncoderLayer(8, 4, 16), 1,
                                   enable_nested_tensor=False), pg)
    model = st.parallelize(nn.Transformer(8, 4, 1, 1, 16), pg)
    return own, {n: p.spec for n, p in model.named_parameters()}, enc.layers[0].linear2.weight.spec


@pytest.mark.parametrize("tp", [2, 4])
def test_builtin_plan_for_torch_transformers(tp):
    own, specs, enc_spec = run(tp, _builtin, tp)[0]
    assert own is not None and "Transformer" in own       # not taken for torch's nn.Transformer
    assert enc_spec == st.ShardSpec(1, tp)
    for name in ("encoder.layers.0.self_attn.in_proj_weight",
                 "decoder.layers.0.multihead_attn.in_proj_bias"):
        assert specs[name] == st.ShardSpec(0, tp, 3), name
    assert specs["decoder.layers.0.self_attn.out_proj.weight"] == st.ShardSpec(1, tp)
    assert specs["encoder.layers.0.linear1.weight"] == st.ShardSpec(0, tp)
    assert specs["decoder.layers.0.linear2.weight"] == st.ShardSpec(1, tp)
    assert specs["decoder.norm.weight"] == st.ReplicaSpec()
    assert specs["encoder.layers.0.linear2.bias"] == st.ReplicaSpec()
    # and it computes what the serial model does (plan=None: the built-in plan)
    _check_all(tp, [dict(SMALL, kind="transformer", plan=None, causal=True, kpm="bool")])
