"""Small HuggingFace models for tests, demos and tutorials (random weights, no downloads)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["ARCHS", "build", "has_sdpa", "inputs_for"]

ARCHS = ("gpt2", "opt", "bert", "t5", "llama")


def _config(arch: str, layers: int, vocab: int):
    import transformers as tf
    if arch == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(
            n_layer=layers, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if arch == "opt":
        return tf.OPTForCausalLM, tf.OPTConfig(
            num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, ffn_dim=64,
            vocab_size=vocab, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, pad_token_id=1,
            bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return tf.BertForMaskedLM, tf.BertConfig(
            num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            vocab_size=vocab, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0)
    if arch == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(
            num_layers=layers, num_decoder_layers=layers, d_model=32, num_heads=4, d_kv=8, d_ff=64,
            vocab_size=vocab, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1)
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
            attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    raise ValueError(f"unknown architecture {arch!r}; known: {ARCHS}")


def has_sdpa(arch: str) -> bool:
    """Whether the installed transformers has an sdpa attention for `arch` (T5 has none before
    transformers 5: asking for it raises ValueError at construction)."""
    cls, _ = _config(arch, 1, 61)
    return bool(getattr(cls, "_supports_sdpa", False))


def build(arch: str, attn: Optional[str] = None, layers: int = 2, vocab: int = 61, seed: int = 0,
          dtype=torch.float32):
    """A small random-weight model of `arch` ("gpt2", "opt", "bert", "t5", "llama") with the
    attention implementation `attn` ("sdpa" or "eager"; by default sdpa where the installed
    transformers has it for `arch`, else eager: T5 before transformers 5). The same seed gives
    the same weights."""
    cls, config = _config(arch, layers, vocab)
    if attn is None:
        attn = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.train()
    return model


def inputs_for(arch: str, batch: int = 2, seq: int = 7, vocab: int = 61, seed: int = 1,
               padding: bool = True) -> Dict[str, torch.Tensor]:
    """A batch with labels (and a padded attention mask) for `arch`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding and batch > 1:
        mask[-1, -2:] = 0  # right padding on the last row
    if arch == "bert":
        labels = torch.full_like(ids, -100)
        labels[:, ::2] = ids[:, ::2]
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    if arch == "t5":
        labels = torch.randint(2, vocab, (batch, seq - 2), generator=g)
        labels[-1, -1] = -100
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    labels = ids.clone()
    labels[mask == 0] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def weight_error(model, serial) -> float:
    """Largest relative difference between a (parallelized) model's weights and the serial
    model's, per parameter (scale floored at 1e-6).

    GPT-2's fused c_attn.bias is compared without its key third: that gradient is identically
    zero (softmax ignores a per-query constant), so both runs only see ~1e-11 of rounding noise
    there, which Adam normalises into steps of +-lr: those numbers follow noise in either run."""
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), serial.parameters()):
        p = p.full() if hasattr(p, "full") else p
        p, q = p.detach().double(), q.detach().double()
        if name.endswith("c_attn.bias"):
            h = q.shape[0] // 3
            p, q = torch.cat([p[:h], p[2 * h:]]), torch.cat([q[:h], q[2 * h:]])
        err = ((p - q).abs().max() / q.abs().max().clamp_min(1e-6)).item()
        worst = max(worst, err)
    return worst
