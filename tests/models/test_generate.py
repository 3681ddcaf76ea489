"""Tensor-parallel inference: the unchanged HuggingFace `model.generate(...)` on a parallelized
model gives the serial model's tokens (greedy, sampled with the same seed, beam search), with a
head-sharded KV cache that is never gathered and next tokens chosen from vocab-sharded logits
without gathering them. Vocabulary 61: uneven over 2 and 4 ranks."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.models_testing import build, has_sdpa
from shardtensor.testing import run

VOCAB = 61
PAD = {"gpt2": 0, "opt": 1, "llama": 0, "t5": 0}


def _attn(arch):
    """sdpa, or eager where this transformers has no sdpa for `arch` (T5 before 5.0)."""
    return "sdpa" if has_sdpa(arch) else "eager"


def _value(x):
    return x.full() if isinstance(x, st.ShardedTensor) else x


def _prompt(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                      # left padding on the second row
    ids[1, :2] = 0
    return ids, mask


def _generate(rank, cases, world):
    """Every case: (arch, "no_grad" | "inference_mode", generate kwargs); returns per case the
    serial tokens, this rank's tokens and whether the KV cache stayed head-sharded."""
    pg = st.ProcessGroup(tp_degree=world)
    ids, mask = _prompt()
    out = []
    for arch, mode, kw in cases:
        serial = build(arch, _attn(arch), layers=1, vocab=VOCAB).eval()
        model = copy.deepcopy(serial)
        st.parallelize(model, pg)
        kw = dict(kw, max_new_tokens=5, pad_token_id=PAD[arch], return_dict_in_generate=True)
        ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
        with ctx():
            torch.manual_seed(11)
            ref = serial.generate(input_ids=ids, attention_mask=mask, **kw).sequences
            torch.manual_seed(11)
            res = model.generate(input_ids=ids, attention_mask=mask, **kw)
        cache = res.past_key_values
        cache = getattr(cache, "self_attention_cache", cache)
        k = cache.layers[0].keys
        heads = k.shape[1]
        if heads % world == 0:      # whole kv heads per rank: the cache is head-sharded
            ok = (isinstance(k, st.ShardedTensor) and k.spec == st.ShardSpec(1, world)
                  and k.to_local().shape[1] == heads // world)
        else:                       # the plan keeps every kv head on every rank (llama, tp=4)
            ok = isinstance(k, st.ShardedTensor) and not k.spec.is_shard
        out.append((ref.tolist(), _value(res.sequences).tolist(), ok))
    return out


CASES_2 = [
    ("gpt2", "no_grad", {}), ("opt", "inference_mode", {}), ("llama", "inference_mode", {}),
    ("t5", "no_grad", {}), ("llama", "no_grad", {"cache_implementation": "static"}),
    ("gpt2", "inference_mode", {"do_sample": True, "top_k": 7, "temperature": 0.7}),
    ("llama", "no_grad", {"do_sample": True}),
    ("t5", "inference_mode", {"do_sample": True, "top_k": 10}),
    ("llama", "no_grad", {"do_sample": True, "top_p": 0.8}),
    ("opt", "no_grad", {"num_beams": 3}),
    ("llama", "inference_mode", {"num_beams": 3, "do_sample": True}),
]
CASES_4 = [
    ("gpt2", "inference_mode", {}), ("llama", "no_grad", {}), ("t5", "inference_mode", {}),
    ("opt", "no_grad", {"do_sample": True, "top_k": 5}),
]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)])
def test_generate_equals_serial(world, cases):
    ranks = run(world, _generate, cases, world)
    for i, case in enumerate(cases):
        ref = ranks[0][i][0]
        for r, res in enumerate(ranks):
            assert res[i][1] == ref, (case, r, res[i][1], ref)   # every rank: the serial tokens
            assert res[i][2], (case, "the KV cache is not head-sharded")
        assert len(ref[0]) > (1 if case[0] == "t5" else 5), (case, ref)   # tokens were made


def _decode_step(rank, arch, sample):
    """One traced decode step after a prefill: the KV cache update, the logits, the token."""
    pg = st.ProcessGroup()
    model = build(arch, "sdpa", layers=2, vocab=VOCAB).eval()
    st.parallelize(model, pg)
    ids, mask = _prompt()
    with torch.inference_mode():
        pre = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = pre.past_key_values
        nxt = torch.tensor([[5], [7]])
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        with st.CommTrace() as trace:
            logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache).logits[:, -1]
            if sample == "greedy":
                tok = torch.argmax(logits, -1)
            else:
                if sample == "top_p":
                    srt, idx = torch.sort(logits)
                    drop = (srt.softmax(-1).cumsum(-1) <= 0.2).scatter(1, idx, srt < 0)
                    logits = logits.masked_fill(drop, -float("inf"))
                else:
                    v = torch.topk(logits, 5)[0][..., -1, None]
                    logits = logits.masked_fill(logits < v, -float("inf"))
                tok = torch.multinomial(torch.softmax(logits, -1), 1)
            tok = _value(tok).tolist()
    k = cache.layers[0].keys
    cache_bytes = k.numel() * k.element_size()
    logits_bytes = logits.numel() * 4
    big = [e for e in trace.events if e.kind == "all_gather"
           and e.nbytes >= min(cache_bytes, logits_bytes)]
    kinds = {}
    for e in trace.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return tok, len(big), kinds, isinstance(k, st.ShardedTensor) and k.spec.is_shard


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_step_gathers_neither_logits_nor_cache(arch):
    for sample in ("greedy", "top_k"):
        results = run(2, _decode_step, arch, sample)
        tok, big, kinds, sharded = results[0]
        assert all(r[0] == tok for r in results)      # every rank picks the same token
        assert sharded and big == 0, (sample, kinds)
        if arch == "gpt2" and sample == "greedy":
            # Megatron's decode step: 2 all-reduces per layer (2 layers), 1 for the
            # vocab-parallel embedding, 2 small ones for the (value, index) argmax
            assert kinds == {"all_reduce": 2 * 2 + 1 + 2}, kinds
    # top-p sorts the whole vocabulary: the one documented gather, and the check sees it
    _, big, kinds, _ = run(2, _decode_step, arch, "top_p")[0]
    assert big == 1, kinds


def _rules_vs_serial(rank, world):
    """topk / multinomial / gather over an uneven (61 over 4) and a strided vocab shard, and a
    Python scalar that differs across ranks."""
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 * VOCAB, generator=g)
    errors = []
    for spec in (st.ShardSpec(1, world), st.ShardSpec(1, world, stride=2)):
        t = st.ShardedTensor.from_global(x, pg, spec)
        v, i = torch.topk(t, 6)
        ref = torch.topk(x, 6)
        errors.append(torch.equal(_value(v), ref.values) and torch.equal(_value(i), ref.indices))
        p = torch.softmax(x, -1)
        ps = st.ShardedTensor.from_global(p, pg, spec)
        for n in (1, 3):
            torch.manual_seed(7)
            want = torch.multinomial(p, n)
            torch.manual_seed(7)
            errors.append(torch.equal(_value(torch.multinomial(ps, n)), want))
        idx = torch.tensor([[0, 5, 2 * VOCAB - 1]] * 3)
        got = torch.gather(t, 1, idx)
        errors.append(got.spec.is_partial and torch.equal(_value(got), x.gather(1, idx)))
    differs = st.ShardedTensor.from_local(torch.tensor(float(rank)), pg, st.ReplicaSpec())
    try:
        bool(differs)
        errors.append(False)
    except st.ShardingError:
        errors.append(True)
    return errors


def test_topk_multinomial_gather_equal_serial():
    for errors in run(4, _rules_vs_serial, 4):
        assert all(errors), errors


# generate's logits processors that write into vocab-sharded scores: min-p (scatter_ of its top
# tokens), sequence bias / bad words (index_add_), the repetition penalty (F.pad, gather,
# scatter), no-repeat n-grams (unfold on the replicated ids)
PROCESSORS = [
    ("llama", "no_grad", {"repetition_penalty": 3.0}),
    ("gpt2", "inference_mode", {"no_repeat_ngram_size": 2}),
    ("llama", "inference_mode", {"bad_words_ids": [[2], [31, 7]]}),
    ("gpt2", "no_grad", {"sequence_bias": {(9,): 4.0, (3, 4): -2.0}}),
    ("llama", "no_grad", {"do_sample": True, "min_p": 0.9}),
    ("opt", "no_grad", {"repetition_penalty": 2.0, "num_beams": 2}),
]


@pytest.mark.parametrize("world", [2, 4])
def test_generate_with_logits_processors_equals_serial(world):
    ranks = run(world, _generate, PROCESSORS, world)
    ids, mask = _prompt()
    for i, case in enumerate(PROCESSORS):
        arch, _, kw = case
        # each processor changes the serial tokens here (else the case would test nothing)
        base = {k: v for k, v in kw.items() if k in ("do_sample", "num_beams")}
        with torch.no_grad():
            torch.manual_seed(11)
            plain = build(arch, _attn(arch), layers=1, vocab=VOCAB).eval().generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD[arch],
                **base).tolist()
        assert ranks[0][i][0] != plain, case
        for r, res in enumerate(ranks):
            ref, got, _ = res[i]
            assert got == ref, (case, r)
