"""Parallelization plans: which parameter is split how, by glob over parameter names.

A plan maps globs (fnmatch, over `model.named_parameters()` names) to a layout:
"row" (shard dim 0), "col" (shard dim -1), ("col", {"stride": 3}), "replicate", or a ShardSpec /
ReplicaSpec. The first matching glob wins; parameters no glob matches are replicated.

Which is which: an `nn.Linear` weight is (out, in), so Megatron's ColumnParallelLinear is "row"
(and its bias "row") and RowParallelLinear is "col" (its bias "replicate"); GPT-2's `Conv1D`
weight is (in, out), so there it is the other way round. An embedding table sharded over the
vocabulary is "row".

Built-in plans are functions `(config, tp_degree) -> plan`, chosen by `config.model_type`, or for
a model without a config by its class name, else by the qualified name (`module.Class`) of its
class or a base class: torch's nn.Transformer family is registered so, which a class of yours
that happens to be called `Transformer` does not match. `register_plan(model_type,
plan_or_function)` adds one for your architecture. Plans name
layouts, never collectives: the rules infer the communication.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

from torch import nn

from .spec import ShardSpec

__all__ = ["register_plan", "get_plan", "PLANS"]

Plan = Dict[str, object]
PLANS: Dict[str, Union[Plan, Callable[[object, int], Plan]]] = {}


def register_plan(model_type: str, plan: Union[Plan, Callable[[object, int], Plan]]) -> None:
    """Make `plan` the built-in plan for models whose `config.model_type` (or, without a config,
    class name) is `model_type`. `plan` is a dict or a function (config, tp_degree) -> dict."""
    PLANS[model_type] = plan


def get_plan(model, tp_degree: int) -> Plan:
    config = getattr(model, "config", None)
    key = getattr(config, "model_type", None) or type(model).__name__
    plan = PLANS.get(key) or PLANS.get(type(model).__name__)
    if plan is None and config is None:
        plan = next((PLANS[q] for q in (f"{c.__module__}.{c.__qualname__}"
                                        for c in type(model).__mro__) if q in PLANS), None)
    if plan is None:
        raise KeyError(f"no built-in tensor-parallel plan for {key!r} (known: {sorted(PLANS)}); "
                       f"pass plan={{glob: 'row' | 'col' | 'replicate' | ShardSpec}} or "
                       f"shardtensor.register_plan({key!r}, plan)")
    return plan(config, tp_degree) if callable(plan) else plan


def _heads_fit(n_heads: int, tp: int) -> bool:
    return n_heads % tp == 0


def gpt2_plan(config, tp: int) -> Plan:
    return {
        "*wte.weight": "row",                          # vocab-parallel embedding, tied LM head
        "*attn.c_attn.weight": ("col", {"stride": 3}),  # Conv1D (in, 3h): fused q|k|v
        "*attn.c_attn.bias": ("row", {"stride": 3}),
        "*attn.c_proj.weight": "row",                   # Conv1D (h, h): row parallel
        "*mlp.c_fc.weight": "col",
        "*mlp.c_fc.bias": "row",
        "*mlp.c_proj.weight": "row",
        "*": "replicate",                               # norms, position table, row biases
    }


def opt_plan(config, tp: int) -> Plan:
    return {
        "*embed_tokens.weight": "row",
        "*self_attn.[qkv]_proj.weight": "row",
        "*self_attn.[qkv]_proj.bias": "row",
        "*self_attn.out_proj.weight": "col",
        "*fc1.weight": "row",
        "*fc1.bias": "row",
        "*fc2.weight": "col",
        "*": "replicate",
    }


def bert_plan(config, tp: int) -> Plan:
    return {
        "*word_embeddings.weight": "row",               # tied with the MLM decoder
        "*attention.self.*.weight": "row",
        "*attention.self.*.bias": "row",
        "*attention.output.dense.weight": "col",
        "*intermediate.dense.weight": "row",
        "*intermediate.dense.bias": "row",
        "*layer.*.output.dense.weight": "col",
        "cls.predictions.bias": "row",                  # the decoder's bias, over the vocabulary
        "*": "replicate",
    }


def t5_plan(config, tp: int) -> Plan:
    return {
        "shared.weight": "row",
        "lm_head.weight": "row",
        "*Attention.[qkv].weight": "row",               # self- and cross-attention
        "*Attention.o.weight": "col",
        "*relative_attention_bias.weight": "col",       # (buckets, heads): heads sharded
        "*DenseReluDense.wi*.weight": "row",            # wi, or gated wi_0 / wi_1
        "*DenseReluDense.wo.weight": "col",
        "*": "replicate",
    }


def llama_plan(config, tp: int) -> Plan:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # kv heads split only when each rank gets whole kv heads; otherwise every rank keeps all kv
    # heads (replicated k/v projections) and slices what its q heads need.
    kv = "row" if _heads_fit(kv_heads, tp) else "replicate"
    return {
        "*embed_tokens.weight": "row",
        "lm_head.weight": "row",
        "*self_attn.q_proj.*": "row",
        "*self_attn.[kv]_proj.*": kv,
        "*self_attn.o_proj.weight": "col",
        "*mlp.gate_proj.weight": "row",
        "*mlp.up_proj.weight": "row",
        "*mlp.down_proj.weight": "col",
        "*": "replicate",
    }


def _kv_layout(config, tp: int) -> str:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return "row" if _heads_fit(kv_heads, tp) else "replicate"


def decoder_plan(config, tp: int) -> Plan:
    """Llama-style decoders with other MLP names or biases (Qwen2/3, Gemma 1-3, StarCoder2)
    and their mixture-of-experts forms (Mixtral, Qwen2/3-MoE, OLMoE): every expert's MLP is
    split Megatron-style (gate|up (experts, 2 * ffn, h) over dim 1 with stride 2, down
    (experts, h, ffn) over its last dim); the router and Qwen2-MoE's shared-expert gate are
    replicated (every rank routes every token). q_norm / k_norm over one head_dim (Qwen3,
    Gemma3) are replicated; OLMoE's q_norm / k_norm over all heads are split like q / k."""
    kv = _kv_layout(config, tp)
    whole = config.model_type == "olmoe"                # q_norm / k_norm over all heads
    return {
        "*embed_tokens.weight": "row",
        "lm_head.weight": "row",
        "*self_attn.q_proj.*": "row",
        "*self_attn.[kv]_proj.*": kv,
        "*self_attn.q_norm.weight": "row" if whole else "replicate",
        "*self_attn.k_norm.weight": kv if whole else "replicate",
        "*self_attn.o_proj.weight": "col",
        "*mlp.gate_proj.weight": "row",
        "*mlp.up_proj.weight": "row",
        "*mlp.down_proj.weight": "col",
        "*mlp.shared_expert.gate_proj.weight": "row",
        "*mlp.shared_expert.up_proj.weight": "row",
        "*mlp.shared_expert.down_proj.weight": "col",
        "*mlp.c_fc.*": "row",                           # StarCoder2: c_fc column parallel
        "*mlp.c_proj.weight": "col",
        "*mlp.experts.gate_up_proj": ShardSpec(1, tp, stride=2),
        "*mlp.experts.down_proj": "col",
        "*": "replicate",
    }


def phi3_plan(config, tp: int) -> Plan:
    """Phi-3: fused q|k|v and gate|up. The q|k|v blocks are equal only without grouped-query
    attention; with fewer kv heads no stride describes the split and attention is replicated."""
    mha = (config.num_key_value_heads or config.num_attention_heads) == config.num_attention_heads
    attn = _heads_fit(config.num_attention_heads, tp) and mha
    return {
        "*embed_tokens.weight": "row",
        "lm_head.weight": "row",
        "*self_attn.qkv_proj.weight": ("row", {"stride": 3}) if attn else "replicate",
        "*self_attn.o_proj.weight": "col" if attn else "replicate",
        "*mlp.gate_up_proj.weight": ("row", {"stride": 2}),
        "*mlp.down_proj.weight": "col",
        "*": "replicate",
    }


def fused_per_head_plan(config, tp: int) -> Plan:
    """GPT-NeoX (Pythia), BLOOM, Falcon: query_key_value's output features are laid out per
    head (heads, 3, head_dim), or per kv group (groups, q_per_group + 2, head_dim) in Falcon's
    new decoder architecture, so a plain "row" split hands every rank whole heads (groups) when
    they divide by tp. Falcon's multi-query layout (q heads | k | v) cannot be split:
    its attention stays replicated, the MLP is split."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    units = heads
    if config.model_type == "falcon":
        if config.new_decoder_architecture:
            units = config.num_kv_heads
        elif config.multi_query:
            units = 0
    attn = units > 0 and _heads_fit(units, tp)
    return {
        "*embed_in.weight": "row",                      # GPT-NeoX
        "*word_embeddings.weight": "row",               # BLOOM, Falcon (tied head)
        "lm_head.weight": "row",
        "embed_out.weight": "row",
        "*.query_key_value.*": "row" if attn else "replicate",
        "*attention.dense.weight": "col" if attn else "replicate",
        "*self_attention.dense.weight": "col" if attn else "replicate",
        "*mlp.dense_h_to_4h.*": "row",
        "*mlp.dense_4h_to_h.weight": "col",
        "*": "replicate",
    }


def gptj_plan(config, tp: int) -> Plan:
    return {
        "*wte.weight": "row",
        "lm_head.*": "row",                             # untied head with a bias over the vocab
        "*attn.[qkv]_proj.weight": "row",
        "*attn.out_proj.weight": "col",
        "*mlp.fc_in.*": "row",
        "*mlp.fc_out.weight": "col",
        "*": "replicate",
    }


def torch_transformer_plan(config, tp: int) -> Plan:
    """torch.nn's MultiheadAttention, TransformerEncoder/DecoderLayer, TransformerEncoder/Decoder
    and Transformer (also as the prefix of a larger plan: the globs match at any depth). The
    heads must divide by tp (F.multi_head_attention_forward says so otherwise); then replicate
    "*in_proj_*" and "*[qkv]_proj_weight" instead."""
    return {
        "*in_proj_weight": ("row", {"stride": 3}),      # (3E, E) fused q|k|v: column parallel
        "*in_proj_bias": ("row", {"stride": 3}),
        "*[qkv]_proj_weight": "row",                    # kdim/vdim != embed_dim: separate q, k, v
        "*bias_[kv]": "col",                            # add_bias_kv's (1, 1, E): over the heads
        "*out_proj.weight": "col",                      # row parallel
        "*linear1.weight": "row",
        "*linear1.bias": "row",
        "*linear2.weight": "col",
        "*": "replicate",                               # norms, row-parallel biases
    }


# an attention's q/k/v and output projections: ViT's and DeiT's (transformers < 5.24 names them
# BERT's way), CLIP's, SigLIP's (its pooling head is an nn.MultiheadAttention: fused in_proj),
# Whisper's and the BART family's
_ATTENTION = ("*[qkv]_proj.*", "*in_proj_*", "*out_proj.weight", "*attention.o_proj.weight",
              "*attention.attention.*", "*attention.output.dense.weight")


def _attention_stacks(config) -> tuple:
    """(name prefix glob, head count) of each stack of attention layers sharing a head count."""
    if config.model_type in ("clip", "siglip"):
        return (("text_model.", config.text_config.num_attention_heads),
                ("vision_model.", config.vision_config.num_attention_heads))
    if config.model_type in ("vit", "deit"):
        return (("", config.num_attention_heads),)
    # Whisper and the BART family (a decoder's cross-attention is the decoder's own)
    return (("*encoder.", config.encoder_attention_heads),
            ("*decoder.", config.decoder_attention_heads))


def encoder_plan(config, tp: int) -> Plan:
    """ViT, DeiT, CLIP, SigLIP (text and vision towers), Whisper, and BART with its relatives
    mBART, Marian and Pegasus: q/k/v column parallel (biases with them; SigLIP's pooling head's
    fused in_proj with stride 3), the attention output and fc2 row parallel, fc1 column
    parallel, the token embedding vocab-parallel (the tied LM head with it). Conv front ends
    (patches, mel), position tables, norms, classifiers and CLIP's projections are replicated.
    A stack whose heads do not divide by tp keeps its attention replicated (its MLP is still
    split)."""
    plan: Plan = {prefix + glob: "replicate" for prefix, heads in _attention_stacks(config)
                  if not _heads_fit(heads, tp) for glob in _ATTENTION}
    for glob, layout in {   # after those: the first match wins (ViT's prefix is "": same globs)
        "*embed_tokens.weight": "row",                  # Whisper's decoder (tied proj_out)
        "*shared.weight": "row",                        # BART (tied embeddings and lm_head)
        "*token_embedding.weight": "row",               # CLIP's text tower
        "lm_head.weight": "row",                        # untied heads (tie_word_embeddings=False)
        "proj_out.weight": "row",
        "*[qkv]_proj.*": "row",
        "*in_proj_weight": ("row", {"stride": 3}),      # SigLIP's pooling head: fused q|k|v
        "*in_proj_bias": ("row", {"stride": 3}),
        "*attention.attention.*": "row",                # ViT before transformers 5.24
        "*out_proj.weight": "col",
        "*attention.o_proj.weight": "col",              # ViT
        "*attention.output.dense.weight": "col",
        "*fc1.*": "row",
        "*intermediate.dense.*": "row",
        "*fc2.weight": "col",
        "*output.dense.weight": "col",
        "*": "replicate",
    }.items():
        plan.setdefault(glob, layout)
    return plan


def resnet_plan(config, tp: int) -> Plan:
    """ResNet: in each residual layer the 3x3 convolution (the second of a bottleneck's three, the
    first of a basic layer's two) is column parallel over its out channels, its BatchNorm follows
    the channels, and the next convolution is row parallel over its in channels (weight (out,
    in, kh, kw): ShardSpec(1)): one forward all-reduce per layer, one backward, plus one small
    all-gather of the sharded BatchNorm's running statistics (its buffers stay whole) per
    training step. The stem, the shortcuts and the classifier are replicated."""
    first, second = ("1", "2") if config.layer_type == "bottleneck" else ("0", "1")
    return {
        f"*layers.*.layer.{first}.convolution.weight": "row",
        f"*layers.*.layer.{first}.normalization.*": "row",
        f"*layers.*.layer.{second}.convolution.weight": ShardSpec(1, tp),
        "*": "replicate",
    }


for _cls in (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
             nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer):
    register_plan(f"{_cls.__module__}.{_cls.__qualname__}", torch_transformer_plan)

for _name, _plan in (("gpt2", gpt2_plan), ("opt", opt_plan), ("bert", bert_plan),
                     ("t5", t5_plan), ("llama", llama_plan), ("mistral", llama_plan),
                     ("qwen2", llama_plan), ("phi3", phi3_plan), ("gptj", gptj_plan)):
    register_plan(_name, _plan)
for _name in ("qwen3", "gemma", "gemma2", "gemma3_text", "starcoder2", "mixtral", "qwen2_moe",
              "qwen3_moe", "olmoe"):
    register_plan(_name, decoder_plan)
for _name in ("gpt_neox", "bloom", "falcon"):
    register_plan(_name, fused_per_head_plan)
for _name in ("vit", "deit", "clip", "siglip", "whisper", "bart", "mbart", "marian", "pegasus"):
    register_plan(_name, encoder_plan)
register_plan("resnet", resnet_plan)
