"""A model shardtensor has no plan for, parallelized the way README, tutorial 6 and
docs/plans.md tell a newcomer to: write the plan (column parallel in, row parallel out, strides
for fused projections, vocab-parallel tied embedding, replicate the rest), register it, call
`st.parallelize(model, pg)`. Logits, loss and every gradient equal serial at tp 2 and 4, and
each block communicates what a Megatron block does: no all-gather."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardtensor as st
from shardtensor.testing import run

VOCAB, HIDDEN, HEADS, FFN = 103, 32, 4, 48      # a vocabulary that splits unevenly at tp 2 and 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(HIDDEN, 3 * HIDDEN)            # fused q|k|v
        self.wo = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.wqkv(x).split(h, dim=-1)
        q, k, v = (t.view(b, s, HEADS, h // HEADS).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / (h // HEADS) ** 0.5    # attention written out
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.wo((probs @ v).transpose(1, 2).reshape(b, s, h))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w13 = nn.Linear(HIDDEN, 2 * FFN, bias=False)      # fused gate|up
        self.w2 = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)
        self.attn, self.ffn = Attention(), SwiGLU()

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MyDecoder(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.norm = nn.RMSNorm(HIDDEN)
        self.output = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.output.weight = self.tok_embeddings.weight        # tied

    def forward(self, ids, labels):
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.output(self.norm(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten())


# The plan, as docs/plans.md derives it.
PLAN = {
    "tok_embeddings.weight": "row",                       # vocab parallel; the tied head follows
    "layers.*.attn.wqkv.weight": ("row", {"stride": 3}),  # nn.Linear (out, in): column parallel
    "layers.*.attn.wqkv.bias": ("row", {"stride": 3}),
    "layers.*.attn.wo.weight": "col",                     # row parallel
    "layers.*.ffn.w13.weight": ("row", {"stride": 2}),    # fused gate|up
    "layers.*.ffn.w2.weight": "col",
    "*": "replicate",                                     # RMSNorm weights
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)


def _rel(a, b):
    a = (a.full() if isinstance(a, st.ShardedTensor) else a).detach().double()
    b = b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _step(rank, tp, layers, plan):
    """Serial and parallel forward/backward on the same weights; errors and one step's trace."""
    pg = st.ProcessGroup(tp_degree=tp)
    from shardtensor.plans import PLANS
    PLANS.pop("MyDecoder", None)                  # rank pools persist between tests: start clean
    try:
        st.parallelize(MyDecoder(), pg)
        missing = None
    except KeyError as e:
        missing = str(e)
    st.register_plan("MyDecoder", plan)           # every rank registers: one registry per process
    torch.manual_seed(0)
    serial = MyDecoder(layers)
    model = st.parallelize(copy.deepcopy(serial), pg)
    ids, labels = _batch()
    ref_logits, ref_loss = serial(ids, labels)
    ref_loss.backward()
    with st.CommTrace() as trace:
        logits, loss = model(ids, labels)
        loss.backward()
    errs = {"logits": _rel(logits, ref_logits), "loss": _rel(loss, ref_loss)}
    for (name, p), q in zip(model.named_parameters(), serial.parameters()):
        assert isinstance(p.grad, st.ShardedTensor) and p.grad.spec == p.spec, name
        errs[name] = _rel(p.grad, q.grad)
    counts = {}
    for e in trace.events:
        counts[(e.phase, e.kind)] = counts.get((e.phase, e.kind), 0) + 1
    specs = {n: p.spec for n, p in model.named_parameters()}
    return dict(errs=errs, counts=counts, specs=specs, missing=missing,
                tied=model.output.weight is model.tok_embeddings.weight,
                logits_spec=logits.spec, summary=trace.summary())


@pytest.mark.parametrize("tp", [2, 4])
def test_custom_decoder_equals_serial_with_megatron_communication(tp):
    one = run(tp, _step, tp, 1, PLAN)[0]
    three = run(tp, _step, tp, 3, PLAN)[0]

    assert "register_plan" in one["missing"]                 # no plan until we register one
    for res in (one, three):
        bad = {k: v for k, v in res["errs"].items() if not v < 1e-4}
        assert not bad, bad
        assert res["tied"]
        assert res["logits_spec"].is_shard                   # logits stay vocab-sharded into the loss
    specs = three["specs"]
    assert specs["layers.2.attn.wqkv.weight"] == st.ShardSpec(0, tp, 3)
    assert specs["layers.2.ffn.w13.weight"] == st.ShardSpec(0, tp, 2)
    assert specs["layers.2.attn.wo.weight"] == st.ShardSpec(1, tp)
    assert specs["norm.weight"] == st.ReplicaSpec()

    # what two more layers add: Megatron's count, and nothing else
    kinds = set(one["counts"]) | set(three["counts"])
    per_layer = {k: (three["counts"].get(k, 0) - one["counts"].get(k, 0)) / 2 for k in kinds}
    print(three["summary"])
    assert per_layer.pop(("forward", "all_reduce")) == 2, per_layer
    assert per_layer.pop(("backward", "all_reduce")) == 2, per_layer
    assert all(v == 0 for v in per_layer.values()), per_layer
    assert not [k for k in three["counts"] if k[1] == "all_gather"], three["summary"]


def test_wrong_stride_is_visible_in_the_trace():
    # docs/plans.md: a fused projection split without its stride still computes the right values,
    # but CommTrace shows the all-gathers that re-lay the activation out
    wrong = dict(PLAN, **{"layers.*.attn.wqkv.weight": "row", "layers.*.attn.wqkv.bias": "row"})
    res = run(2, _step, 2, 1, wrong)[0]
    bad = {k: v for k, v in res["errs"].items() if not v < 1e-4}
    assert not bad, bad
    assert res["counts"].get(("forward", "all_gather"), 0) >= 1, res["summary"]
