"""The relatives of test_vision_speech's architectures under the same built-in plan
(`encoder_plan`): mBART, Marian and Pegasus (BART's layer names), SigLIP (CLIP's towers, plus a
pooling head that is an nn.MultiheadAttention) and DeiT (ViT with a distillation token). Loss,
logits and every gradient equal serial at tp 2 and 4, and the collectives per block are Megatron's.

Tiny random configs (hidden 32, 4 heads, vocabulary 61: uneven over 2 and 4); every
architecture of one world in one pool task."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.testing import run
from test_more_archs import _rel
from test_vision_speech import _counts

VOCAB = 61
ARCHS = ("mbart", "marian", "pegasus", "siglip", "deit")
# forward (= backward) all-reduces per block: one after attention, one after the MLP; a decoder
# layer's cross-attention adds one (encoder + decoder layer: 5); SigLIP: a text + a vision layer
EXPECTED = {"mbart": 5, "marian": 5, "pegasus": 5, "siglip": 4, "deit": 2}


def build(arch: str, layers: int):
    import transformers as tf
    torch.manual_seed(0)
    enc = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
               intermediate_size=64)
    if arch == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(
            text_config=dict(vocab_size=VOCAB, max_position_embeddings=7, **enc),
            vision_config=dict(image_size=16, patch_size=4, **enc)))
    elif arch == "deit":
        model = tf.DeiTForImageClassification(tf.DeiTConfig(
            image_size=16, patch_size=4, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **enc))
    else:
        cls, conf = {"mbart": (tf.MBartForConditionalGeneration, tf.MBartConfig),
                     "marian": (tf.MarianMTModel, tf.MarianConfig),
                     "pegasus": (tf.PegasusForConditionalGeneration, tf.PegasusConfig)}[arch]
        model = cls(conf(vocab_size=VOCAB, d_model=32, encoder_layers=layers,
                         decoder_layers=layers, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1))
    model.config._attn_implementation = "sdpa"
    return model.train()


def _batch(arch: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    if arch == "deit":
        return dict(pixel_values=pixels, labels=torch.randint(0, 5, (2,), generator=g))
    if arch == "siglip":
        return dict(input_ids=ids, pixel_values=pixels, return_loss=True)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0                                  # right padding on the last row
    labels = torch.randint(3, VOCAB, (2, 5), generator=g)
    labels[-1, -1] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _check(rank, world):
    """Per architecture: the largest relative error (loss, logits, every gradient), the
    collectives per block, the sharded parameters' count and the vocabulary's layouts."""
    pg = st.ProcessGroup(tp_degree=world)
    results = {}
    for arch in ARCHS:
        serial = build(arch, 2)
        model = st.parallelize(copy.deepcopy(serial), pg)
        batch = _batch(arch)
        ref = serial(**batch)
        ref.loss.backward()
        two, out, _ = _counts(model, batch)
        logits = "logits_per_image" if arch == "siglip" else "logits"
        errs = {"loss": _rel(out.loss, ref.loss),
                "logits": _rel(getattr(out, logits), getattr(ref, logits))}
        grads = dict(serial.named_parameters())
        for name, p in model.named_parameters():
            q = grads[name]
            if q.grad is None:
                errs[name] = 0.0 if p.grad is None else float("inf")
                continue
            assert p.grad.spec == p.spec, name
            # the key bias's gradient is zero in exact arithmetic: rounding noise on both sides,
            # measured on the query bias's scale (as test_vision_speech does)
            qb = grads.get(name.replace("k_proj.bias", "q_proj.bias"))
            floor = qb.grad.abs().max() if name.endswith("k_proj.bias") else 1e-5
            errs[name] = _rel(p.grad, q.grad, floor)
        one = st.parallelize(build(arch, 1), pg)
        per_block = {k: v - _counts(one, batch)[0].get(k, 0) for k, v in two.items()}
        results[arch] = (max(errs.items(), key=lambda kv: kv[1]),
                         {k: v for k, v in per_block.items() if v}, {k for _, k in two},
                         sum(p.spec.is_shard for p in model.parameters()),
                         {str(p.spec) for p in model.parameters() if p.shape[:1] == (VOCAB,)},
                         {n: str(p.spec) for n, p in model.named_parameters() if "head.att" in n})
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_encoder_family_equals_serial(world):
    results = run(world, _check, world)[0]
    for arch, (worst, per_block, kinds, sharded, vocab, head) in results.items():
        assert worst[1] < 1e-4, (arch, worst)
        n = EXPECTED[arch]
        assert per_block == {("forward", "all_reduce"): n, ("backward", "all_reduce"): n}, (
            arch, per_block)
        assert kinds == {"all_reduce"}, (arch, kinds)  # nothing gathered, the logits neither
        assert sharded >= 8, (arch, sharded)           # the plan really shards
        assert vocab == (set() if arch == "deit" else {str(st.ShardSpec(0, world))}), (
            arch, vocab)
    # SigLIP's pooling head (an nn.MultiheadAttention): fused q|k|v split per head, out_proj row
    q, o = str(st.ShardSpec(0, world, 3)), str(st.ShardSpec(1, world))
    assert results["siglip"][-1] == {"vision_model.head.attention.in_proj_weight": q,
                                     "vision_model.head.attention.in_proj_bias": q,
                                     "vision_model.head.attention.out_proj.weight": o,
                                     "vision_model.head.attention.out_proj.bias": "ReplicaSpec()"}
