"""Vision, speech and encoder-decoder HuggingFace models, unchanged, made tensor parallel by
`parallelize`'s built-in plan (`encoder_plan`): ViT, CLIP (text and vision towers, contrastive
loss), Whisper (conv front end, encoder-decoder, greedy generation) and BART. Loss, logits,
every gradient and two AdamW steps equal serial at tp 2 and 4, and the collectives per block
are counted exactly. ResNet (BatchNorm) too, channel-parallel.

Tiny random configs (hidden 32, 4 heads, 1 or 2 layers, vocabulary 61: uneven over 2 and 4).
One pool task per architecture and world."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.testing import run
from test_more_archs import _rel, _value   # one relative error for both model files

VOCAB = 61


def _config(arch: str, layers: int):
    """(model class, config) of a tiny random `arch`; "-uneven": ViT with 2 heads, BART with 2
    decoder heads, CLIP with 2 vision heads (over 4 ranks that attention stays replicated);
    "-untied": Whisper with its own proj_out; "-bottleneck": ResNet-50's layers."""
    import transformers as tf
    arch, _, variant = arch.partition("-")
    enc = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
               intermediate_size=64)
    seq2seq = dict(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                   decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   decoder_start_token_id=1)
    if arch == "vit":
        return tf.ViTForImageClassification, tf.ViTConfig(
            image_size=16, patch_size=4, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **dict(enc, num_attention_heads=2 if variant else 4))
    if arch == "clip":
        return tf.CLIPModel, tf.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=2,
                             bos_token_id=1, pad_token_id=0, **enc),
            vision_config=dict(image_size=16, patch_size=4, **dict(
                enc, num_attention_heads=2 if variant else 4)), projection_dim=16)
    if arch == "whisper":
        return tf.WhisperForConditionalGeneration, tf.WhisperConfig(
            num_mel_bins=8, max_source_positions=8, max_target_positions=16,
            tie_word_embeddings=not variant, **seq2seq)
    if arch == "resnet":
        return tf.ResNetForImageClassification, tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32] if variant else [8, 16],
            depths=[layers, layers], layer_type=variant or "basic", num_labels=5)
    if arch == "bart":
        return tf.BartForConditionalGeneration, tf.BartConfig(
            max_position_embeddings=32,
            **dict(seq2seq, decoder_attention_heads=2 if variant else 4))
    raise ValueError(arch)


def build(arch: str, layers: int = 2, seed: int = 0):
    cls, config = _config(arch, layers)
    if not arch.startswith("resnet"):
        config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(config).train()


def _batch(arch: str, seed: int, dtype=None):
    """A batch with labels (CLIP: return_loss); float inputs in `dtype` when given."""
    batch = _inputs(arch, seed)
    return {k: v.to(dtype) if dtype and torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()}


def _inputs(arch: str, seed: int):
    arch = arch.partition("-")[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0                                  # right padding on the last row
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    if arch in ("vit", "resnet"):
        return dict(pixel_values=pixels, labels=torch.randint(0, 5, (2,), generator=g))
    if arch == "clip":
        ids[:, -1] = 2                                 # eos: CLIP pools at the highest id
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                    return_loss=True)
    labels = torch.randint(3, VOCAB, (2, 5), generator=g)
    labels[-1, -1] = -100
    if arch == "whisper":
        return dict(input_features=torch.randn(2, 8, 16, generator=g), labels=labels)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _logits(arch, out):
    return out.logits_per_image if arch.startswith("clip") else out.logits


def _counts(model, batch):
    with st.CommTrace() as trace:
        out = model(**batch)
        out.loss.backward()
    counts = {}
    for e in trace.events:
        counts[(e.phase, e.kind)] = counts.get((e.phase, e.kind), 0) + 1
    return counts, out, {e.kind for e in trace.events}


def _check(rank, arch, world):
    """Everything for one architecture at one world: errors vs serial (forward, gradients, two
    AdamW steps), collectives per block, the number of sharded parameters."""
    pg = st.ProcessGroup(tp_degree=world)
    serial = build(arch)
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = _batch(arch, 1)
    ref = serial(**batch)
    ref.loss.backward()
    two, out, kinds = _counts(model, batch)
    errs = {"loss": _rel(out.loss, ref.loss), "logits": _rel(_logits(arch, out),
                                                             _logits(arch, ref))}
    grads = {n: q.grad for n, q in serial.named_parameters()}
    for name, p in model.named_parameters():
        assert isinstance(p, st.ShardedTensor), name
        if grads[name] is None:                        # Whisper's frozen position tables
            assert p.grad is None, name
            continue
        assert isinstance(p.grad, st.ShardedTensor) and p.grad.spec == p.spec, name
        # the key bias's gradient is zero in exact arithmetic (softmax ignores a per-query
        # constant): both runs hold rounding noise, measured on the query bias's scale
        query_bias = grads.get(name.replace("k_proj.bias", "q_proj.bias"))
        floor = query_bias.abs().max() if name.endswith("k_proj.bias") else 1e-5
        errs[name] = _rel(p.grad, grads[name], floor)
    for (name, b), c in zip(model.named_buffers(), serial.buffers()):   # BatchNorm's statistics
        assert type(b) is torch.Tensor, name                                # stay plain and whole
        errs[name] = _rel(b, c)
    with torch.no_grad():
        serial.eval(), model.eval()
        errs["eval logits"] = _rel(_logits(arch, model(**batch)), _logits(arch, serial(**batch)))
        serial.train(), model.train()
    sharded = sum(p.spec.is_shard for p in model.parameters())
    vocab = {name: p.spec for name, p in model.named_parameters() if p.shape[:1] == (VOCAB,)}
    one = build(arch, layers=1)
    st.parallelize(one, pg)
    per_block = {k: v - _counts(one, batch)[0].get(k, 0) for k, v in two.items()}
    per_block = {k: v for k, v in per_block.items() if v}
    # two AdamW steps, in float64: float32 AdamW amplifies rounding (its update is up to lr / eps
    # sensitive to a gradient element near zero): serial float32 ends 6e-5 away from the float64
    # trajectory (CLIP), sharded float32 9.8e-5 from serial's (BART, tp 4). In float64 the two
    # agree to 1e-13, given eps 1e-6: gradients that are zero in exact arithmetic (the key
    # biases: softmax ignores a per-query constant; a dead channel's BatchNorm bias) hold 1e-17
    # of either run's own rounding, which the default 1e-8 turns into steps of 1e-9 lr
    serial = build(arch).double()
    model = st.parallelize(copy.deepcopy(serial), pg)
    lr = 1e-3
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, eps=1e-6, weight_decay=0.1)
            for m in (serial, model)]
    default = torch.get_default_dtype()   # transformers 4.x's CLIP fills its causal mask with
    torch.set_default_dtype(torch.float64)   # float64's min in the default dtype (overflow)
    try:
        for step in range(2):
            for m, opt in zip((serial, model), opts):
                opt.zero_grad()
                m(**_batch(arch, 2 + step, torch.float64)).loss.backward()
                opt.step()
    finally:
        torch.set_default_dtype(default)
    # measured on the weight's scale, or a step's where that is smaller (zero-initialised biases)
    steps = {name: _rel(p, q, lr) for (name, p), q in
             zip(model.named_parameters(), serial.parameters())}
    steps.update((name, _rel(b, c))
                 for (name, b), c in zip(model.named_buffers(), serial.buffers()))
    generated = _generate(arch, pg) if arch == "whisper" or arch == "bart" and world == 2 else None
    return errs, steps, per_block, sharded, generated, kinds, vocab


def _generate(arch, pg):
    """Greedy generation, serial and parallel: (tokens, tokens, largest score error). Seed 2:
    a tiny random Whisper of seed 0 says token 1 at every step, this one changes its mind."""
    serial = build(arch, seed=2).eval()
    model = st.parallelize(copy.deepcopy(serial), pg)
    batch = _batch(arch, 3)
    inputs = {k: batch[k] for k in ("input_features", "input_ids", "attention_mask") if k in batch}
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    with torch.no_grad():
        ref, out = serial.generate(**inputs, **kw), model.generate(**inputs, **kw)
    err = max(_rel(a, b) for a, b in zip(out.scores, ref.scores))
    return ref.sequences.tolist(), _value(out.sequences).tolist(), err, len(out.scores)


# collectives per block (for Whisper and BART an encoder layer plus a decoder layer, for CLIP a
# text layer plus a vision layer): Megatron's one all-reduce after attention and one after the
# MLP forward, one for each one's input gradient backward; a decoder layer's cross-attention adds
# one each. Where the heads do not divide by the degree ("-uneven" at tp 4) that attention is
# replicated: no collective (ViT's layer, BART's decoder layer, CLIP's vision layer: 1 + 1).
EXPECTED = {"vit": 2, "clip": 4, "whisper": 5, "bart": 5, "whisper-untied": 5,
            "vit-uneven": 1, "bart-uneven": 3, "clip-uneven": 3,
            # ResNet: a residual layer per stage (two); each one all-reduce forward and backward
            # (its column-then-row convolutions) and one all-gather of the sharded BatchNorm's
            # running statistics (2 x channels) into its whole buffers
            "resnet": {("forward", "all_reduce"): 2, ("backward", "all_reduce"): 2,
                       ("forward", "all_gather"): 2}}
EXPECTED["resnet-bottleneck"] = EXPECTED["resnet"]
# variants at one world: uneven heads where they do not divide (4), the others at 2
CASES = [(a, w) for a in EXPECTED
         for w in ((2, 4) if "-" not in a else (4,) if "uneven" in a else (2,))]


@pytest.mark.parametrize("arch,world", CASES)
def test_arch_equals_serial(arch, world):
    errs, steps, per_block, sharded, generated, kinds, vocab = run(world, _check, arch, world)[0]
    bad = {k: v for k, v in errs.items() if not v < 1e-4}
    assert not bad, bad
    bad = {k: v for k, v in steps.items() if not v < 1e-9}   # float64 weights after AdamW
    assert not bad, bad
    assert sharded >= (4 if arch == "vit-uneven" else 6), sharded   # the plan really shards
    # token embeddings and LM heads (tied or not) vocab-parallel; ViT, ResNet: no vocabulary
    images = arch.startswith(("vit", "resnet"))
    assert set(vocab.values()) == (set() if images else {st.ShardSpec(0, world)}), vocab
    assert len(vocab) == (2 if arch == "whisper-untied" else 0 if images else 1), vocab
    n = EXPECTED[arch]
    if isinstance(n, int):
        n = {("forward", "all_reduce"): n, ("backward", "all_reduce"): n}
    assert per_block == n, per_block
    assert kinds == {kind for _, kind in n}, kinds     # nothing else gathered, the logits neither
    if generated is not None:
        ref, tokens, err, n = generated
        assert tokens == ref and n == 6, generated
        assert len({t for row in ref for t in row}) > 1, ref  # not one token over and over
        assert err < 1e-4, err                          # every step's scores


def _legacy_vit(heads: int):
    """A module named like ViT before transformers 5.24 (BERT's names: attention.attention.query,
    attention.output.dense, intermediate.dense, output.dense), with a ViT config."""
    import transformers as tf
    from torch import nn
    lin = lambda n, m: nn.Linear(n, m)
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.attention = nn.ModuleDict({k: lin(32, 32) for k in ("query", "key", "value")})
    layer.attention.output = nn.ModuleDict({"dense": lin(32, 32)})
    layer.intermediate = nn.ModuleDict({"dense": lin(32, 64)})
    layer.output = nn.ModuleDict({"dense": lin(64, 32)})
    layer.layernorm_before = nn.LayerNorm(32)
    model = nn.Module()
    model.vit = nn.Module()
    model.vit.encoder = nn.Module()
    model.vit.encoder.layer = nn.ModuleList([layer])
    model.classifier = lin(32, 5)
    model.config = tf.ViTConfig(hidden_size=32, num_attention_heads=heads, intermediate_size=64)
    return model


def _legacy_vit_layouts(rank, world):
    pg = st.ProcessGroup(tp_degree=world)
    return [{n: str(p.spec) for n, p in st.parallelize(_legacy_vit(h), pg).named_parameters()}
            for h in (4, 2)]


def test_vit_plan_covers_the_names_before_transformers_5_24():
    four, two = run(4, _legacy_vit_layouts, 4)[0]
    col, row, rep = (str(s) for s in (st.ShardSpec(0, 4), st.ShardSpec(1, 4), st.ReplicaSpec()))
    attn = "vit.encoder.layer.0.attention."
    for kind in ("query", "key", "value"):
        for p in ("weight", "bias"):
            name = f"{attn}attention.{kind}.{p}"
            assert four[name] == col and two[name] == rep, name
    assert four[f"{attn}output.dense.weight"] == row and two[f"{attn}output.dense.weight"] == rep
    for layouts in (four, two):                        # 2 heads over 4 ranks: the MLP still split
        assert layouts["vit.encoder.layer.0.intermediate.dense.weight"] == col
        assert layouts["vit.encoder.layer.0.intermediate.dense.bias"] == col
        assert layouts["vit.encoder.layer.0.output.dense.weight"] == row
        for name in ("output.dense.bias", "layernorm_before.weight"):
            assert layouts[f"vit.encoder.layer.0.{name}"] == rep
        assert layouts["classifier.weight"] == rep
