"""Checkpoints as users meet them: a model built on the meta device and parallelized loads a
sharded checkpoint (st.load) and computes what the serial model computes; a mismatched optimizer
checkpoint names the parameters that differ. Uneven sizes (vocab 61, hidden 10), a fused q|k|v
(stride 3), tied embeddings and buffers."""
import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run


class Net(nn.Module):
    """Hidden 10 (not divisible by 4), vocab 61, fused q|k|v, head tied to the embedding, a
    persistent buffer and, with `extra`, a non-persistent one."""

    def __init__(self, extra: bool = False):
        super().__init__()
        self.emb = nn.Embedding(61, 10)
        self.qkv = nn.Linear(10, 30)
        self.proj = nn.Linear(10, 10)
        self.up = nn.Linear(10, 13)
        self.down = nn.Linear(13, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 61, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor([1.5]))
        if extra:
            self.register_buffer("shift", torch.zeros(1), persistent=False)

    def forward(self, ids):
        h = self.emb(ids)
        q, k, v = self.qkv(h).split(10, dim=-1)
        h = h + self.proj(torch.softmax(q @ k.transpose(-1, -2) / 3.0, -1) @ v)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h)) * self.scale


PLAN = {"emb.weight": "row", "qkv.*": ("row", {"stride": 3}), "proj.weight": "col",
        "up.*": "row", "down.weight": "col"}
IDS = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(3))


def _net(tp, seed=0, meta=False, extra=False):
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = Net(extra)
    else:
        model = Net(extra)
    if tp:
        st.parallelize(model, st.ProcessGroup(tp_degree=tp), plan=PLAN)
    return model


def _full(x):
    return (x.full() if isinstance(x, st.ShardedTensor) else x).detach().clone()


def _save_net(rank, path):
    st.save(_net(2), path)


def _is_meta(t):
    return t.is_meta or (isinstance(t, st.ShardedTensor) and t.to_local().is_meta)


# --- st.load into a model built on the meta device ----------------------------------------------

def _load_meta(rank, path, llama_path):
    tp = torch.distributed.get_world_size()
    model = _net(tp, seed=5, meta=True)
    st.load(model, path)
    metas = [n for n, t in model.state_dict(keep_vars=True).items() if _is_meta(t)]
    out = {"metas": metas, "tied": model.head.weight is model.emb.weight,
           "logits": _full(model(IDS)), "state": st.full_state_dict(model)}
    # an HF model: its non-persistent rotary inv_freq is recomputed, as load_pretrained does
    import transformers as tf
    config = build("llama").config
    with torch.device("meta"):
        llama = tf.LlamaForCausalLM(config)
    st.parallelize(llama, st.ProcessGroup(tp_degree=tp))
    st.load(llama, llama_path)
    out["llama_metas"] = [n for n, t in list(llama.state_dict(keep_vars=True).items())
                          + list(llama.named_buffers()) if _is_meta(t)]
    llama.train()
    out["llama_logits"] = _full(llama(**inputs_for("llama")).logits)
    return out


def _save_llama(rank, path):
    model = build("llama")
    st.parallelize(model, st.ProcessGroup(tp_degree=2))
    st.save(model, path)


@pytest.mark.parametrize("world", (1, 2, 4))
def test_load_into_a_meta_built_model_materialises_it(tmp_path, world):
    # st.load into a meta-built, parallelized model left every parameter on the meta device
    # (copy_ into meta is a no-op) and returned without a word: the model then had no weights
    path, llama_path = str(tmp_path / "net"), str(tmp_path / "llama")
    run(2, _save_net, path)
    run(2, _save_llama, llama_path)
    serial = _net(None)
    llama = build("llama")
    for out in run(world, _load_meta, path, llama_path):
        assert out["metas"] == [] and out["llama_metas"] == []
        assert out["tied"]
        torch.testing.assert_close(out["logits"], serial(IDS).detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["llama_logits"], llama(**inputs_for("llama")).logits.detach(),
                                   rtol=1e-5, atol=1e-5)
        if out["state"]:
            ref = serial.state_dict()
            assert out["state"].keys() == ref.keys()
            assert all(torch.equal(out["state"][k], v) for k, v in ref.items())


def _load_meta_unfillable(rank, path, hf_dir):
    # a plain module's non-persistent meta buffer: nothing can compute it, so nothing is loaded
    # (load_pretrained filled the parameters, then refused)
    out = []
    for load, where in ((st.load, path), (st.load_pretrained, hf_dir)):
        model = _net(torch.distributed.get_world_size(), meta=True, extra=True)
        with pytest.raises(st.CheckpointError, match=r"\['shift'\].*meta") as e:
            load(model, where)
        out.append((str(e.value), all(_is_meta(t) for t in model.state_dict(keep_vars=True).values())))
    return out


@pytest.mark.parametrize("world", (1, 2))
def test_load_into_a_meta_model_with_an_uncomputable_buffer_changes_nothing(tmp_path, world):
    import safetensors.torch
    path = str(tmp_path / "net")
    run(2, _save_net, path)
    (tmp_path / "hf").mkdir()
    serial = {k: v.clone() for k, v in _net(None).state_dict().items() if k != "head.weight"}
    safetensors.torch.save_file(serial, str(tmp_path / "hf" / "model.safetensors"))
    for rank_out in run(world, _load_meta_unfillable, path, str(tmp_path / "hf")):
        for msg, still_meta in rank_out:
            assert still_meta, msg


# --- an optimizer checkpoint that does not fit names the parameters that differ -----------------

def _step(model, opt):
    opt.zero_grad()
    out = model(IDS)
    torch.nn.functional.cross_entropy(out.reshape(-1, 61), IDS.reshape(-1)).backward()
    opt.step()


def _save_opts(rank, d):
    model = _net(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt)
    st.save(opt, d + "/named", model=model)
    st.save(opt, d + "/unnamed")            # without model=: names by position


def _load_opts(rank, d):
    model = _net(2, seed=4)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    msgs = []
    for opt, path, kwargs in ((torch.optim.AdamW(model.parameters()), "/unnamed", {"model": model}),
                              (torch.optim.AdamW(model.parameters()), "/named", {}),
                              (torch.optim.AdamW([{"params": decay}, {"params": rest}]), "/named",
                               {"model": model})):
        _step(model, opt)
        before = {k: _full(v) for s in opt.state.values() for k, v in s.items()}
        with pytest.raises(st.CheckpointError) as e:
            st.load(opt, d + path, **kwargs)
        after = {k: _full(v) for s in opt.state.values() for k, v in s.items()}
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        msgs.append(str(e.value))
    return msgs


def test_optimizer_checkpoint_that_does_not_fit_names_the_parameters(tmp_path):
    # the error said "parameter groups [11] (by name) differ from the saved ones [11]"
    d = str(tmp_path)
    run(2, _save_opts, d)
    msgs = run(2, _load_opts, d)
    assert msgs[0] == msgs[1]
    unnamed, named, grouped = msgs[0]
    assert "parameter 0 is 'emb.weight' here, 'group0.param0' saved" in unnamed, unnamed
    assert "without model=" in unnamed and "without model=" in named
    assert "parameter 0 is 'group0.param0' here, 'emb.weight' saved" in named, named
    assert "group 0 parameter 2 is 'proj.weight' here, 'qkv.bias' saved" in grouped, grouped
    assert "groups of [6, 5] parameters here, [11] saved" in grouped, grouped


# --- strict=False: a checkpoint of another head loads what matches, as load_state_dict does -------

class NetCls(Net):
    """Net with a new (row-parallel) classifier: a fine-tuning model over Net's checkpoint."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Linear(10, 3)


def _net_cls(tp, seed=0, meta=False):
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = NetCls()
    else:
        model = NetCls()
    if tp:
        st.parallelize(model, st.ProcessGroup(tp_degree=tp), plan={**PLAN, "cls.*": "row"})
    return model


def _save_both(rank, d):
    st.save(_net(2), d + "/net")
    st.save(_net_cls(2, seed=1), d + "/cls")


def _load_lenient(rank, d):
    tp = torch.distributed.get_world_size()
    out = {}
    model = _net_cls(tp, seed=5)                  # cls keeps its own weights
    out["more"] = tuple(st.load(model, d + "/net", strict=False)), st.full_state_dict(model)
    model = _net(tp, seed=5)
    out["fewer"] = tuple(st.load(model, d + "/cls", strict=False)), st.full_state_dict(model)
    model = _net(tp, seed=5)
    out["exact"] = tuple(st.load(model, d + "/net")), st.full_state_dict(model)
    with pytest.raises(st.CheckpointError, match=r"missing tensors \['cls.weight', 'cls.bias'\].*strict=False"):
        st.load(_net_cls(tp), d + "/net")
    model = _net_cls(tp, meta=True)               # nothing to fill cls with: nothing loaded
    with pytest.raises(st.CheckpointError, match=r"parameters \['cls.weight', 'cls.bias'\] are on the meta"):
        st.load(model, d + "/net", strict=False)
    out["meta untouched"] = all(_is_meta(t) for t in model.state_dict(keep_vars=True).values())
    return out


@pytest.mark.parametrize("world", (1, 2, 4))
def test_load_strict_false_loads_what_matches_like_load_state_dict(tmp_path, world):
    d = str(tmp_path)
    run(2, _save_both, d)
    expect = {}
    for key, (model, source) in {"more": (_net_cls(None, seed=5), _net(None)),
                                 "fewer": (_net(None, seed=5), _net_cls(None, seed=1)),
                                 "exact": (_net(None, seed=5), _net(None))}.items():
        keys = model.load_state_dict(source.state_dict(), strict=False)
        expect[key] = (keys.missing_keys, sorted(keys.unexpected_keys)), model.state_dict()
    assert expect["more"][0] == (["cls.weight", "cls.bias"], [])
    for out in run(world, _load_lenient, d)[:1]:
        assert out["meta untouched"]
        for key, ((missing, unexpected), state) in expect.items():
            assert (out[key][0][0], sorted(out[key][0][1])) == (missing, unexpected), key
            assert out[key][1].keys() == state.keys()
            assert all(torch.equal(out[key][1][k], v) for k, v in state.items()), key


# --- optimizer state is placed as torch's load_state_dict places it -------------------------------

def _train_double(rank, path):
    model = _net(2).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _step(model, opt)
    st.save(opt, path, model=model)


def _resume_float(rank, path, weights):
    model = _net(torch.distributed.get_world_size(), seed=4)     # float32 now
    model.load_state_dict(weights)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    st.load(opt, path, model=model)
    dtypes = {(n, k): v.dtype for n, p in model.named_parameters() for k, v in opt.state[p].items()}
    _step(model, opt)
    return dtypes, {n: _full(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("world", (1, 2, 4))
def test_optimizer_state_takes_the_parameters_dtype_as_in_load_state_dict(tmp_path, world):
    # AdamW state saved from a float64 model, resumed with the model in float32: the state kept
    # float64 and the first step raised "expected dtype double for `end` but got dtype float"
    # (torch's load_state_dict casts floating state to the parameter's dtype; it also puts
    # 'step' on the parameter's device for fused / capturable optimizers, on CUDA)
    path = str(tmp_path / "adamw")
    run(2, _train_double, path)
    serial = _net(None).double()
    opt = torch.optim.AdamW(serial.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _step(serial, opt)
    weights = {k: v.clone() for k, v in serial.state_dict().items()}
    ref = _net(None, seed=4)
    ref.load_state_dict(weights)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.5)
    ref_opt.load_state_dict(opt.state_dict())
    ref_dtypes = {(n, k): v.dtype for n, p in ref.named_parameters() for k, v in ref_opt.state[p].items()}
    _step(ref, ref_opt)
    for dtypes, params in run(world, _resume_float, path, weights):
        assert dtypes == ref_dtypes
        for n, p in ref.named_parameters():
            if n != "qkv.bias":   # its key third has a zero gradient: Adam steps on rounding
                torch.testing.assert_close(params[n], p.detach(), rtol=1e-5, atol=1e-6)
