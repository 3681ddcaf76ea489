"""load_pretrained: a serial HuggingFace `save_pretrained` directory loads straight into a model
built on the meta device and parallelized, each rank reading and materialising only its shards;
the model then computes what the serial model computes. And back: a parallelized model's
`save_pretrained` names the recipe (a full state dict gathered to rank 0), whose directory loads
serially."""
import os
import re

import pytest
import torch

import shardtensor as st
from shardtensor import checkpoint as ckpt
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run


def _full(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach()


def _meta_model(arch, directory, tp):
    import transformers as tf
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[arch]
    config = tf.AutoConfig.from_pretrained(directory)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config)
    st.parallelize(model, st.ProcessGroup(tp_degree=tp))   # layouts only: no memory yet
    assert all(p.is_meta for p in model.parameters())
    return model


def _load(rank, arch, directory, tp):
    model = _meta_model(arch, directory, tp)
    info = st.load_pretrained(model, directory)
    assert not any(p.is_meta or p.to_local().is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight   # still tied
        assert isinstance(model.lm_head.weight, st.ShardedTensor) and model.lm_head.weight.spec.is_shard
    model.train()
    out = model(**inputs_for(arch))
    return (st.full_state_dict(model), dict(model.named_buffers()), _full(out.logits),
            _full(out.loss), info)


@pytest.mark.parametrize("arch,tp,shards", [("gpt2", 2, None), ("gpt2", 4, "30KB"),
                                            ("llama", 2, None)])
def test_load_pretrained_into_meta_parallel_model(tmp_path, arch, tp, shards):
    serial = build(arch)
    serial.save_pretrained(tmp_path, **({"max_shard_size": shards} if shards else {}))
    if shards:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ref = serial(**inputs_for(arch))
    state, buffers, logits, loss, info = run(tp, _load, arch, str(tmp_path), tp)[0]
    expect = serial.state_dict()
    assert state.keys() == expect.keys()
    assert all(torch.equal(state[k], expect[k]) for k in expect)
    for name, b in serial.named_buffers():      # recomputed, e.g. llama's rotary inv_freq
        assert torch.equal(buffers[name], b), name
    assert info["reinitialised"] == [n for n, _ in serial.named_buffers()]
    assert torch.allclose(logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - ref.loss.item()) < 1e-5 * abs(ref.loss.item())


def _peak(rank, directory, tp):
    model = _meta_model("gpt2", directory, tp)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # reset this process's peak resident set (VmHWM)
    status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                              if l.startswith(key))
    before = status("VmRSS:")
    st.load_pretrained(model, directory)
    peak = status("VmHWM:") - before
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return peak, local, ckpt.last_load["bytes_read"]


def test_load_pretrained_memory_is_a_quarter_at_tp4(tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128,
                           bos_token_id=0, eos_token_id=0)
    serial = tf.GPT2LMHeadModel(config)
    serial.save_pretrained(tmp_path)
    size = sum(p.numel() * p.element_size() for p in serial.parameters())
    replicated = sum(p.numel() * p.element_size() for n, p in serial.named_parameters()
                     if "wpe" in n or "ln_" in n or "c_proj.bias" in n)
    del serial
    results = run(4, _peak, str(tmp_path), 4)
    mb = lambda n: f"{n / 2**20:.1f} MB"
    for rank, (peak, local, read) in enumerate(results):
        print(f"load_pretrained tp=4 rank {rank}: peak RSS +{mb(peak)}, local shards {mb(local)},"
              f" bytes read {mb(read)}; model {mb(size)} (1/4 + replicated = "
              f"{mb((size - replicated) / 4 + replicated)})")
        assert local < (size - replicated) / 4 + replicated + 1e4
        assert read <= 2 * local                 # only its own byte ranges
        assert peak < 0.45 * size, (peak, size)  # never the whole model in memory


# --- save_pretrained: a parallelized model's shards have no memory holding the global tensor -----

def _save_pretrained(rank, arch, plain, directory):
    model = build(arch)
    model.eval()
    st.parallelize(model, st.ProcessGroup(tp_degree=2))
    recipe = "state_dict=shardtensor.full_state_dict(model)"
    # HF reads the state dict through tensor storage: a clear error naming the recipe, also
    # where the gather fallback would otherwise hand HF a temporary gathered copy's memory
    for fallback in (None, "gather"):
        st.config.fallback = fallback
        try:
            with pytest.raises(st.UnsupportedOpError, match=re.escape(recipe)):
                model.save_pretrained(plain, is_main_process=rank == 0)
        finally:
            st.config.fallback = None
        # refused before writing anything (config.json was written first)
        assert not os.path.exists(plain) or os.listdir(plain) == [], os.listdir(plain)
    model.save_pretrained(directory, state_dict=st.full_state_dict(model),
                          is_main_process=rank == 0)
    return _full(model(**inputs_for(arch)).logits)


def _save_pretrained_at_tp_one(rank, directory):
    model = build("gpt2")
    model.eval()
    st.parallelize(model, st.ProcessGroup(tp_degree=1))
    model.save_pretrained(directory)    # a layout of degree 1 is the whole tensor: as serially
    return _full(model(**inputs_for("gpt2")).logits)


def test_save_pretrained_at_tp_one_needs_no_recipe(tmp_path):
    import transformers as tf
    logits = run(1, _save_pretrained_at_tp_one, str(tmp_path))[0]
    serial = tf.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    serial.eval()
    expect = build("gpt2")
    assert all(torch.equal(serial.state_dict()[k], v) for k, v in expect.state_dict().items())
    assert torch.allclose(serial(**inputs_for("gpt2")).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_pretrained_names_the_recipe_and_the_recipe_loads_serially(tmp_path, arch):
    import transformers as tf
    directory = tmp_path / "hf"
    logits = run(2, _save_pretrained, arch, str(tmp_path / "plain"), str(directory))[0]
    assert not (tmp_path / "plain" / "model.safetensors").exists()
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[arch]
    serial = cls.from_pretrained(directory, attn_implementation="sdpa")
    serial.eval()
    if arch == "gpt2":
        assert serial.lm_head.weight is serial.transformer.wte.weight
    expect = build(arch)
    assert all(torch.equal(serial.state_dict()[k], v) for k, v in expect.state_dict().items())
    assert torch.allclose(serial(**inputs_for(arch)).logits, logits, rtol=1e-5, atol=1e-5)
