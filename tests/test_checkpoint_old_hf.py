"""Loading into a meta-built, parallelized model whose non-persistent buffers only the model's
construction computes, as in transformers 4.x: GPT-2's causal mask (bool) and masked_bias and
Llama's rotary inv_freq are made in `__init__`, and 4.x's `_init_weights` leaves buffers alone.
Replayed on any transformers by a tiny HF model written that way and by Llama given 4.x's
`_init_weights`: `load_pretrained` and `st.load` give the buffers (and logits) the serial model
has. A model nothing can compute a buffer for is refused with nothing changed."""

import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run

import transformers as tf


class OldStyleConfig(tf.PretrainedConfig):
    model_type = "shardtensor-old-style"

    def __init__(self, vocab: int = 61, hidden: int = 16, n_pos: int = 8, **kw):
        super().__init__(**kw)
        self.vocab, self.hidden, self.n_pos = vocab, hidden, n_pos


class OldStyle(tf.PreTrainedModel):
    """transformers 4.x's pattern: buffers computed in __init__ (a bool causal mask, a rotary
    inv_freq, a scalar masked_bias, all non-persistent), `_init_weights` for parameters only."""
    config_class = OldStyleConfig

    def __init__(self, config):
        super().__init__(config)
        h, n = config.hidden, config.n_pos
        self.emb = nn.Embedding(config.vocab, h)
        self.up = nn.Linear(h, 2 * h)
        self.down = nn.Linear(2 * h, h)
        self.head = nn.Linear(h, config.vocab, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(n, n, dtype=torch.bool)),
                             persistent=False)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, h, 2).float() / h),
                             persistent=False)
        self.register_buffer("masked_bias", torch.tensor(-1e4), persistent=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.2)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def forward(self, ids):
        s = ids.shape[1]
        h = self.emb(ids)
        angle = torch.arange(s).float()[:, None] * self.inv_freq
        h = h + torch.cat([angle.sin(), angle.cos()], -1)
        scores = torch.where(self.causal[:s, :s], h @ h.transpose(-1, -2) / 4.0, self.masked_bias)
        h = h + torch.softmax(scores, -1) @ h
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


PLAN = {"emb.weight": "row", "up.*": "row", "down.weight": "col", "head.weight": "row"}
IDS = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))


def _llama_4x_init_weights(self, module):
    """transformers 4.x's LlamaPreTrainedModel._init_weights: parameters only."""
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()


def _full(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach().clone()


def _meta_old_style(tp):
    with torch.device("meta"):
        model = OldStyle(OldStyleConfig())
    return st.parallelize(model, st.ProcessGroup(tp_degree=tp), plan=PLAN)


def _load(rank, hf_dir, st_dir, llama_dir):
    tp = torch.distributed.get_world_size()
    out = {}
    for how in ("load_pretrained", "load"):
        model = _meta_old_style(tp)
        rng = torch.get_rng_state()
        if how == "load":
            st.load(model, st_dir)
        else:
            out["reinitialised"] = st.load_pretrained(model, hf_dir)["reinitialised"]
        out[how] = ({n: b.clone() for n, b in model.named_buffers()}, _full(model(IDS)),
                    torch.equal(torch.get_rng_state(), rng))
    config = tf.AutoConfig.from_pretrained(llama_dir)
    with torch.device("meta"):
        llama = tf.LlamaForCausalLM(config)
    llama._init_weights = _llama_4x_init_weights.__get__(llama)
    st.parallelize(llama, st.ProcessGroup(tp_degree=tp))
    st.load_pretrained(llama, llama_dir)
    llama.train()
    out["llama"] = ({n: b.clone() for n, b in llama.named_buffers()},
                    _full(llama(**inputs_for("llama")).logits))
    return out


def _save(rank, st_dir):
    torch.manual_seed(0)
    model = OldStyle(OldStyleConfig())
    st.save(st.parallelize(model, st.ProcessGroup(tp_degree=2), plan=PLAN), st_dir)


@pytest.mark.parametrize("world", (2, 4))
def test_buffers_only_construction_computes_load_as_serial(tmp_path, world):
    # before: CheckpointError 'buffers [inv_freq, masked_bias] were on the meta device ...'
    # after the parameters were filled (the bool mask passed as computed: all False)
    hf_dir, st_dir, llama_dir = (str(tmp_path / d) for d in ("hf", "st", "llama"))
    torch.manual_seed(0)
    serial = OldStyle(OldStyleConfig())
    serial.save_pretrained(hf_dir)
    run(2, _save, st_dir)
    llama = build("llama")
    llama.save_pretrained(llama_dir)
    ref = serial(IDS).detach()
    for out in run(world, _load, hf_dir, st_dir, llama_dir):
        assert out["reinitialised"] == ["causal", "inv_freq", "masked_bias"]
        for how in ("load_pretrained", "load"):
            buffers, logits, rng_kept = out[how]
            assert buffers.keys() == dict(serial.named_buffers()).keys()
            for name, b in serial.named_buffers():
                assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), (how, name)
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
            assert rng_kept, how
        buffers, logits = out["llama"]
        for name, b in llama.named_buffers():
            assert torch.equal(b, buffers[name]), name
        torch.testing.assert_close(logits, llama(**inputs_for("llama")).logits.detach(),
                                   rtol=1e-5, atol=1e-5)


class BoolBuffer(nn.Module):
    """Not an HF model; its `_init_weights` computes `scale` and leaves the bool `mask`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.register_buffer("mask", torch.ones(4, dtype=torch.bool), persistent=False)

    def _init_weights(self, module):
        if module is self:
            self.scale.fill_(2.0)

    def forward(self, x):
        return torch.where(self.mask, self.lin(x) * self.scale, 0.0)


def _bool_buffer(rank, path):
    tp = torch.distributed.get_world_size()
    with torch.device("meta"):
        model = BoolBuffer()
    st.parallelize(model, st.ProcessGroup(tp_degree=tp), plan={"lin.*": "row"})
    with pytest.raises(st.CheckpointError, match=r"\['mask'\].*meta.*_init_weights leaves them"):
        st.load(model, path)
    return [n for n, t in list(model.state_dict(keep_vars=True).items())
            + list(model.named_buffers()) if not (t.is_meta or _local(t).is_meta)]


def _local(t):
    return t.to_local() if isinstance(t, st.ShardedTensor) else t


def _save_bool(rank, path):
    torch.manual_seed(0)
    st.save(st.parallelize(BoolBuffer(), st.ProcessGroup(tp_degree=2), plan={"lin.*": "row"}),
            path)


def test_a_bool_buffer_init_leaves_is_refused_with_nothing_changed(tmp_path):
    # before: the bool placeholder (all False) passed as computed: every output was 0
    path = str(tmp_path / "ck")
    run(2, _save_bool, path)
    for filled in run(2, _bool_buffer, path):
        assert filled == [], filled
