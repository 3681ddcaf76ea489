"""`model.generate(...)` options beyond tests/models/test_generate.py on parallelized GPT-2,
Llama (grouped-query) and T5, against the serial model with the same seed: the tokens equal,
scores / logits / attentions / hidden states equal to float32 tolerance, and what users do with
`output_scores` afterwards (`compute_transition_scores`, `torch.stack`, softmax) gives serial's
values. Every option is checked to change serial's tokens relative to plain greedy / sampling /
beam search (else its case could not fail), except where the option is meant to keep them
(assisted greedy decoding, prompt lookup: those cases raised before)."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.models_testing import build
from shardtensor.testing import run

from test_generate import PAD, VOCAB, _attn, _prompt, _value

ATOL = 1e-5


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [z for y in x for z in _flat(y)]
    return [] if x is None else [x]


def _close(a, b) -> bool:
    """Serial values `a` and parallel values `b` (nested tuples of tensors) equal to float32
    tolerance, the parallel ones as whatever generate returned (ShardedTensors included)."""
    a, b = _flat(a), _flat(b)
    return len(a) == len(b) and all(
        tuple(x.shape) == tuple(y.shape) and torch.allclose(
            x.float(), _value(y).float(), atol=ATOL, rtol=1e-4, equal_nan=True)
        for x, y in zip(a, b))


# what users do with the scores of a greedy / sampled run, and of a beam run
def _post(model, out, beams):
    if beams:
        return [model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)]
    stacked = torch.stack(out.scores, 1)
    return [model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True),
            model.compute_transition_scores(out.sequences, out.scores),
            stacked, stacked.softmax(-1), torch.stack(out.logits, 1).log_softmax(-1),
            out.scores[0].argmax(-1)]


_OUTPUTS = ("scores", "logits", "sequences_scores", "attentions", "hidden_states",
            "decoder_attentions", "cross_attentions", "decoder_hidden_states",
            "encoder_attentions", "encoder_hidden_states")


def _generate(rank, cases, world):
    """Every case: (arch, generate kwargs, plain kwargs, options). Returns per case the serial
    tokens, this rank's tokens, serial's tokens under the plain kwargs, and per extra output
    (scores, attentions, post-processing) whether it equals serial."""
    pg = st.ProcessGroup(tp_degree=world)
    out = []
    for arch, kw, plain, opt in cases:
        ids, mask = _prompt()
        if opt.get("batch1"):
            ids, mask = ids[:1], mask[:1]
        serial = build(arch, opt.get("attn", _attn(arch)), layers=1, vocab=VOCAB).eval()
        model = copy.deepcopy(serial)
        st.parallelize(model, pg)
        kw = dict(kw, max_new_tokens=kw.get("max_new_tokens", 6), pad_token_id=PAD[arch],
                  return_dict_in_generate=True)
        par_kw = dict(kw)
        if opt.get("assistant"):     # a smaller, differently seeded serial / parallel assistant
            helper = build(arch, _attn(arch), layers=1, vocab=VOCAB, seed=5).eval()
            kw["assistant_model"] = helper
            par_kw["assistant_model"] = copy.deepcopy(helper)
            if opt["assistant"] == "parallel":
                st.parallelize(par_kw["assistant_model"], pg)
        if opt.get("static_config"):
            serial.generation_config.cache_implementation = "static"
            model.generation_config.cache_implementation = "static"
        with torch.no_grad():
            torch.manual_seed(11)
            ref = serial.generate(input_ids=ids, attention_mask=mask, **kw)
            torch.manual_seed(11)
            res = model.generate(input_ids=ids, attention_mask=mask, **par_kw)
            torch.manual_seed(11)
            plain = dict(plain, max_new_tokens=kw["max_new_tokens"], pad_token_id=PAD[arch])
            base = serial.generate(input_ids=ids, attention_mask=mask, **plain)
            checks = {k: _close(getattr(ref, k), getattr(res, k)) for k in _OUTPUTS
                      if getattr(ref, k, None) is not None}
            if opt.get("post"):
                beams = kw.get("num_beams", 1) > 1
                checks["post"] = _close(_post(serial, ref, beams), _post(model, res, beams))
        out.append((ref.sequences.tolist(), _value(res.sequences).tolist(), base.tolist(),
                    checks))
    return out


S = dict(output_scores=True, output_logits=True)
SAMPLE = dict(do_sample=True)
B1 = {"batch1": True}
# (arch, kwargs, the plain kwargs they are compared with, options)
CASES_2 = [
    # scores / logits and their post-processing; top-k + top-p + temperature together
    ("gpt2", dict(S), {}, {"post": True, "same": True}),
    ("llama", dict(S, do_sample=True, top_k=10, top_p=0.9, temperature=0.7), SAMPLE,
     {"post": True}),
    ("llama", dict(S, num_beams=3, length_penalty=-2.0, early_stopping=True, eos_token_id=2),
     dict(num_beams=3, eos_token_id=2), {"post": True}),
    ("t5", dict(S, do_sample=True, top_k=10), SAMPLE, {"post": True}),
    ("llama", dict(S, do_sample=True, renormalize_logits=True, top_k=5), SAMPLE,
     {"post": True}),
    # several sequences per prompt
    ("gpt2", dict(do_sample=True, num_return_sequences=3), SAMPLE, {}),
    ("llama", dict(num_beams=3, num_return_sequences=2), dict(num_beams=3), {}),
    # sampling filters (typical sorts the vocabulary: the one gather, as top-p)
    ("llama", dict(do_sample=True, typical_p=0.3), SAMPLE, {}),
    ("gpt2", dict(do_sample=True, epsilon_cutoff=0.02), SAMPLE, {}),
    ("t5", dict(do_sample=True, eta_cutoff=0.05), SAMPLE, {}),
    # top-k larger than a rank's vocabulary shard after a processor wrote -inf (the serial
    # assistant's double top-k): the padding candidates were NaN and won
    ("gpt2", dict(do_sample=True, top_k=40, suppress_tokens=[5, 28, 57]), SAMPLE, {}),
    # token-level processors
    ("llama", dict(min_new_tokens=5, eos_token_id=2), dict(eos_token_id=2), {}),
    ("gpt2", dict(suppress_tokens=[8, 26]), {}, {}),
    ("llama", dict(begin_suppress_tokens=[31, 11]), {}, {}),
    ("t5", dict(forced_bos_token_id=7, forced_eos_token_id=9, eos_token_id=9), {}, {}),
    ("gpt2", dict(exponential_decay_length_penalty=(2, 30.0), eos_token_id=9),
     dict(eos_token_id=9), {}),
    # rows that end early (padded afterwards), left padding
    ("llama", dict(eos_token_id=11), {}, {}),
    # speculative decoding (batch 1): serial / parallel assistant, greedy and sampled; prompt
    # lookup. Greedy assisted decoding keeps greedy's tokens by design.
    ("gpt2", dict(prompt_lookup_num_tokens=2, max_new_tokens=8), {}, dict(B1, same=True)),
    ("llama", dict(max_new_tokens=8), {}, dict(B1, assistant="parallel", same=True)),
    ("gpt2", dict(do_sample=True, max_new_tokens=8), SAMPLE, dict(B1, assistant="serial")),
    ("llama", dict(S, do_sample=True, max_new_tokens=8), SAMPLE,
     dict(B1, assistant="parallel")),
    ("t5", dict(do_sample=True, max_new_tokens=8), SAMPLE, dict(B1, assistant="parallel")),
    # the static cache through the generation config; attentions and hidden states
    ("llama", dict(num_beams=2), dict(num_beams=2), {"static_config": True, "same": True}),
    ("gpt2", dict(output_attentions=True, output_hidden_states=True), {},
     {"attn": "eager", "same": True}),
    ("t5", dict(output_attentions=True, output_hidden_states=True, num_beams=2),
     dict(num_beams=2), {"attn": "eager", "same": True}),
]
CASES_4 = [
    ("llama", dict(S, do_sample=True, top_k=10, top_p=0.9, temperature=0.7), SAMPLE,
     {"post": True}),
    ("gpt2", dict(S, num_beams=3, num_return_sequences=2), dict(num_beams=3),
     {"post": True}),
    ("t5", dict(do_sample=True, typical_p=0.3, epsilon_cutoff=0.01), SAMPLE, {}),
    ("gpt2", dict(do_sample=True, top_k=40, suppress_tokens=[5, 28, 57]), SAMPLE, {}),
    ("llama", dict(exponential_decay_length_penalty=(2, 30.0), eos_token_id=9),
     dict(eos_token_id=9), {}),
    ("llama", dict(do_sample=True, max_new_tokens=8), SAMPLE, dict(B1, assistant="parallel")),
    ("t5", dict(prompt_lookup_num_tokens=2, max_new_tokens=8), {}, dict(B1, same=True)),
    ("llama", dict(output_attentions=True, output_hidden_states=True), {},
     {"attn": "eager", "same": True}),
]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)])
def test_generate_options_equal_serial(world, cases):
    ranks = run(world, _generate, cases, world)
    for i, case in enumerate(cases):
        ref, _, plain, _ = ranks[0][i]
        if not case[3].get("same"):    # the option changes serial's tokens here
            assert ref != plain, case
        for r, res in enumerate(ranks):
            _, got, _, checks = res[i]
            assert got == ref, (case, r, got, ref)
            assert all(checks.values()), (case, r, checks)


def _index_vs_serial(rank, world):
    """Reads and writes through an index tensor on the sharded (vocabulary) dim, over an uneven
    and a strided shard, as speculative sampling (`q[:, arange(n), ids]`, `p[:, n_matches, :]`
    with a 0-d tensor) and the forced-eos / length-penalty processors (`s[:, eos] = 0`) do:
    serial's values, and the sharded tensor is never gathered."""
    pg = st.ProcessGroup()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2 * VOCAB, generator=g)
    rep = lambda t: st.ShardedTensor.from_global(t, pg, st.ReplicaSpec())
    keys = [(slice(None), torch.arange(3), torch.tensor([[0, 60, 121]])),
            (slice(None), slice(None), torch.tensor([5, -1, 7])),
            (torch.tensor([1, 0]), 2, torch.tensor([3, 100])),
            (..., torch.tensor([[1], [2]])),
            (slice(None), rep(torch.tensor(2)), rep(torch.tensor([3, 4])))]
    ok = []
    for spec in (st.ShardSpec(2, world), st.ShardSpec(2, world, stride=2)):
        t = st.ShardedTensor.from_global(x, pg, spec)
        plain = lambda k: tuple(_value(i) if isinstance(i, torch.Tensor) else i for i in k)
        got, want = [], []
        with st.CommTrace() as trace:
            for key in keys:
                got.append(t[key])
                want.append(x[plain(key)])
                w, ref = t.clone(), x.clone()
                w[key] = -7.0
                ref[plain(key)] = -7.0
                got.append(w)
                want.append(ref)
            w, ref = t.clone(), x.clone()
            w[:, :, torch.tensor([4, 90])] = rep(torch.tensor([1.0, 2.0]))
            ref[:, :, torch.tensor([4, 90])] = torch.tensor([1.0, 2.0])
            got.append(w)
            want.append(ref)
            w, ref = t.clone(), x.clone()
            w[0, :, 100] = 5.0
            ref[0, :, 100] = 5.0
            got.append(w)
            want.append(ref)
            w = t.clone()
            w[:, 1, torch.tensor([4, 90])] = 3.0
            got.append(w[0, 1, torch.tensor([4, 90])])
            want.append(torch.tensor([3.0, 3.0]))
        ok.append(not [e for e in trace.events if e.kind == "all_gather"])
        ok.extend(torch.equal(_value(a), b) for a, b in zip(got, want))
    # a plain tensor picked by a replicated index tensor (prompt lookup's candidate logits)
    got = torch.arange(10.0)[rep(torch.tensor([3, 1]))]
    ok.append(isinstance(got, st.ShardedTensor) and got.tolist() == [3.0, 1.0])
    return ok


def test_index_tensor_on_sharded_dim_equals_serial():
    for ok in run(4, _index_vs_serial, 4):
        assert all(ok), ok


def _gathers(rank, world):
    """The all-gathers of generate with options whose processors index the vocabulary
    (exponential decay and forced eos through `scores[:, eos]`) and of speculative sampling with
    a parallel assistant: only top-k's k candidates per rank move, never the scores."""
    pg = st.ProcessGroup(tp_degree=world)
    ids, mask = _prompt()
    ops = {}
    for kw, one in ((dict(exponential_decay_length_penalty=(2, 30.0), eos_token_id=9,
                          forced_eos_token_id=9), False),
                    (dict(do_sample=True, top_k=None), True)):
        model = build("gpt2", "sdpa", layers=1, vocab=VOCAB).eval()
        st.parallelize(model, pg)
        if one:
            helper = build("gpt2", "sdpa", layers=1, vocab=VOCAB, seed=5).eval()
            kw["assistant_model"] = st.parallelize(helper, pg)
        with torch.no_grad(), st.CommTrace() as trace:
            torch.manual_seed(11)
            model.generate(input_ids=ids[:1] if one else ids,
                           attention_mask=mask[:1] if one else mask, max_new_tokens=4,
                           pad_token_id=0, **kw)
        for e in trace.events:
            if e.kind == "all_gather":
                ops[e.op] = ops.get(e.op, 0) + 1
    return ops


def test_processors_and_speculative_sampling_gather_no_scores():
    ops = run(2, _gathers, 2)[0]
    # multinomial's / top-k's exchange of k candidates per rank
    assert set(ops) <= {"torch.topk", "torch.multinomial"}, ops
