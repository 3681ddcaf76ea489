"""User flows that used to lose data or answer silently wrong, each against serial torch:
a refused torch.save writes nothing, load_pretrained initialises what the checkpoint lacks as
from_pretrained does, PEFT's save_pretrained refuses before writing, out-of-range indices into
a sharded dim raise as serial, and cat with legacy empty 1-D inputs keeps them in the graph."""
import io
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import shardtensor as st
from shardtensor.testing import run


# --- torch.save of ShardedTensors: refused before anything is written -------------------------

def _refused_saves(rank, directory):
    pg = st.ProcessGroup(tp_degree=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    st.split_row(model[0].weight, pg)
    st.split_col(model[2].weight, pg)
    kept = os.path.join(directory, f"kept{rank}.pt")
    with open(kept, "wb") as f:
        f.write(b"an earlier checkpoint")
    absent = os.path.join(directory, f"absent{rank}.pt")
    buf = io.BytesIO(b"header")
    buf.seek(6)
    errors = []
    for obj in (model.state_dict(), model, {"step": 3, "w": [model[0].weight]}):
        for dest in (kept, absent, buf):
            try:
                torch.save(obj, dest)
            except TypeError as e:
                errors.append("shardtensor.save" in str(e))
    with open(kept, "rb") as f:
        kept_bytes = f.read()
    # plain objects still save and load as before (to a path, a buffer, a non-ascii path)
    plain = {k: v.full() if isinstance(v, st.ShardedTensor) else v
             for k, v in model.state_dict().items()}
    round_trips = []
    for dest in (os.path.join(directory, f"plain{rank}.pt"), io.BytesIO(),
                 os.path.join(directory, f"pläin{rank}.pt")):
        torch.save(plain, dest)
        if isinstance(dest, io.BytesIO):
            dest.seek(0)
        back = torch.load(dest)
        round_trips.append(all(torch.equal(back[k], plain[k]) for k in plain))
    return (errors, kept_bytes, os.path.exists(absent), buf.getvalue(), buf.tell(), round_trips)


def test_refused_torch_save_leaves_the_destination_as_it_was(tmp_path):
    for errors, kept, absent_exists, buf, pos, round_trips in run(2, _refused_saves,
                                                                   str(tmp_path)):
        assert errors == [True] * 9                 # every save refused, naming shardtensor.save
        assert kept == b"an earlier checkpoint"     # the existing file is untouched
        assert not absent_exists                    # no file created
        assert (buf, pos) == (b"header", 6)         # nothing written into the buffer
        assert round_trips == [True, True, True]


# --- PEFT's save_pretrained: refused before anything is written ---------------------------------

def _peft_saves(rank, directory):
    import peft
    from shardtensor.models_testing import build, inputs_for
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                          init_lora_weights=False)
    torch.manual_seed(5)
    serial = peft.get_peft_model(build("gpt2"), cfg)
    model = peft.get_peft_model(build("gpt2"), cfg)
    model.load_state_dict(serial.state_dict())
    st.parallelize(model, st.ProcessGroup(tp_degree=2))
    refused = os.path.join(directory, f"refused{rank}")
    try:
        model.save_pretrained(refused)
        message = ""
    except st.UnsupportedOpError as e:
        message = str(e)
    with pytest.raises(ValueError, match="selected_adapters"):   # PEFT's own error stands
        model.save_pretrained(refused, selected_adapters=["nope"])
    # selected_adapters=[] saves no adapter in PEFT (None is every adapter): nothing to refuse
    none, none_serial = (os.path.join(directory, f"{k}{rank}") for k in ("none", "none_serial"))
    model.save_pretrained(none, selected_adapters=[])
    serial.save_pretrained(none_serial, selected_adapters=[])
    assert sorted(os.listdir(none)) == sorted(os.listdir(none_serial))
    # the recipe the error names saves the adapters, which load serially
    recipe = os.path.join(directory, "recipe")
    model.save_pretrained(recipe, state_dict=st.full_state_dict(model),
                          is_main_process=(rank == 0))
    torch.distributed.barrier()
    back = peft.PeftModel.from_pretrained(build("gpt2"), recipe)
    batch = inputs_for("gpt2")
    same = torch.equal(back(**batch).logits, serial(**batch).logits)
    # a plain (unparallelized) PEFT model still saves without the recipe
    plain = os.path.join(directory, f"plain{rank}")
    serial.save_pretrained(plain)
    return (message, os.path.exists(refused), same,
            sorted(os.listdir(plain)) == ["README.md", "adapter_config.json",
                                          "adapter_model.safetensors"])


def test_peft_save_pretrained_refuses_before_writing(tmp_path):
    pytest.importorskip("peft")
    for message, written, same, plain_saved in run(2, _peft_saves, str(tmp_path)):
        assert "PeftModel.save_pretrained" in message and "lora_" in message, message
        assert "full_state_dict" in message and "Nothing was written" in message
        assert not written          # no README.md, no directory
        assert same and plain_saved


# --- load_pretrained: parameters the checkpoint lacks are initialised as from_pretrained does ---

def _heads(arch):
    """(checkpoint model class, model class with a head the checkpoint lacks, config)."""
    import transformers as tf
    from shardtensor.models_testing import build
    config = build(arch).config
    if arch == "gpt2":
        config.pad_token_id, config.num_labels = 0, 3
        return tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification, config
    config.tie_word_embeddings = False     # lm_head: its own, vocab-sharded table
    return tf.LlamaModel, tf.LlamaForCausalLM, config


def _with_missing(rank, arch, directory, seed, meta):
    import warnings
    from shardtensor.models_testing import inputs_for
    _, cls, config = _heads(arch)
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        model = cls(config)
    st.parallelize(model, st.ProcessGroup(tp_degree=2))
    if not meta:
        before = {n: p.full().clone() if isinstance(p, st.ShardedTensor) else p.detach().clone()
                  for n, p in model.named_parameters()}
    torch.manual_seed(seed)          # as serial: from_pretrained right after manual_seed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = st.load_pretrained(model, directory)
    warned = [str(w.message) for w in caught if "newly initialized" in str(w.message)]
    state = {n: p.full() if isinstance(p, st.ShardedTensor) else p.detach()
             for n, p in model.state_dict().items()}
    batch = {k: v for k, v in inputs_for(arch).items() if k != "labels"}
    out = model(**batch).logits
    changed = None if meta else [n for n in info["missing"] if not torch.equal(state[n], before[n])]
    layout = model.get_parameter(info["missing"][0]).spec
    return (info["missing"], warned, state, (out.full() if isinstance(out, st.ShardedTensor)
                                              else out).detach(), changed, layout)


def _both_builds(rank, arch, directory, seed):
    return [_with_missing(rank, arch, directory, seed, meta) for meta in (True, False)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_load_pretrained_initialises_missing_parameters_as_from_pretrained(tmp_path, arch):
    from shardtensor.models_testing import inputs_for
    base, cls, config = _heads(arch)
    torch.manual_seed(0)
    base(config).save_pretrained(tmp_path)
    torch.manual_seed(7)
    serial = cls.from_pretrained(tmp_path)
    want = serial.state_dict()
    missing = sorted(set(want) - {k for k in want if k in base(config).state_dict()
                                  or k.split(".", 1)[-1] in base(config).state_dict()})
    assert missing in (["score.weight"], ["lm_head.weight"])
    batch = {k: v for k, v in inputs_for(arch).items() if k != "labels"}
    logits = serial(**batch).logits.detach()
    for rank_out in run(2, _both_builds, arch, str(tmp_path), 7):
        for meta, (got, warned, state, out, changed, layout) in zip((True, False), rank_out):
            # GPT-2's score is replicated, Llama's untied lm_head vocab-sharded
            assert layout.is_shard == (arch == "llama")
            assert got == missing and len(warned) == 1 and missing[0] in warned[0]
            assert state.keys() == want.keys()
            if meta:   # the same draws as serial from_pretrained under the same seed
                bad = [k for k in want if not torch.equal(state[k], want[k])]
                assert bad == [], bad
                torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
            else:      # built on the CPU: loaded as serial, the missing ones re-initialised
                assert all(torch.equal(state[k], want[k]) for k in want if k not in missing)
                assert changed == missing
                assert abs(state[missing[0]].std().item() - 0.02) < 0.01


def _plain_missing(rank, directory):
    pg = st.ProcessGroup(tp_degree=2)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4))
    st.split_row(model[0].weight, pg)
    with pytest.raises(st.CheckpointError, match=r"\['1.bias'\].*no HuggingFace _init_weights"):
        st.load_pretrained(model, directory)
    return all(p.is_meta for p in model.parameters())


def test_load_pretrained_refuses_missing_parameters_nothing_initialises(tmp_path):
    import safetensors.torch
    sd = {k: v for k, v in nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)).state_dict().items()
          if k != "1.bias"}
    safetensors.torch.save_file(sd, str(tmp_path / "model.safetensors"))
    assert run(2, _plain_missing, str(tmp_path)) == [True, True]   # nothing changed


# --- indices into a sharded dim: out of range raises as serial --------------------------------

def _pick(op, x, d, idx):
    """op applied to x along dim d with the index values idx (a list), as model code would."""
    k = len(idx)
    shape = list(x.shape)
    shape[d] = k
    i1 = torch.tensor(idx)
    full = i1.view([k if j == d else 1 for j in range(x.dim())]).expand(shape).contiguous()
    if op == "gather":
        return torch.gather(x, d, full)
    if op == "take_along_dim":
        return torch.take_along_dim(x, full, d)
    if op == "index_select":
        return x.index_select(d, i1)
    if op == "embedding":
        return torch.nn.functional.embedding(i1, x)
    if op == "getitem":
        return x[(slice(None),) * d + (i1,)]
    y = x.clone()
    if op == "setitem":
        y[(slice(None),) * d + (i1,)] = 2.5
        return y
    if op == "scatter_":
        return y.scatter_(d, full, 2.5)
    if op == "scatter_add_":
        return y.scatter_add_(d, full, torch.ones(shape, dtype=x.dtype))
    if op == "index_add_":
        return y.index_add_(d, i1, torch.ones(shape, dtype=x.dtype))
    if op == "index_fill_":
        return y.index_fill_(d, i1, -1.5)
    raise ValueError(op)


INDEX_OPS = ("gather", "take_along_dim", "index_select", "embedding", "getitem", "setitem",
             "scatter_", "scatter_add_", "index_add_", "index_fill_")
_NAMED = {"getitem": "__getitem__", "setitem": "__setitem__"}   # as the error names the op


def _outcome(f):
    try:
        out = f()
    except (IndexError, RuntimeError) as e:
        return type(e), str(e)
    if isinstance(out, st.ShardedTensor):
        out = out.full()
    return None, out.detach()


def _indices_vs_serial(rank, cases):
    results = []
    for shape, d, stride, op, idx in cases:
        pg = st.ProcessGroup()
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        want = _outcome(lambda: _pick(op, x, d, idx))
        xs = st.ShardedTensor.from_global(x, pg, st.ShardSpec(d, pg.tp_world_size(), stride))
        got = _outcome(lambda: _pick(op, xs, d, idx))
        if want[0] is None:
            ok = got[0] is None and torch.allclose(got[1], want[1], rtol=0, atol=1e-12)
        else:   # the same exception class as serial, naming the op and the size
            ok = (got[0] is not None and issubclass(got[0], want[0])
                  and f"size {shape[d]}" in got[1] and _NAMED.get(op, op) in got[1])
        results.append(ok or (shape, d, stride, op, idx, want[0], got))
    return results


@settings(max_examples=30)
@given(data=hs.data())
def test_out_of_range_indices_on_the_sharded_dim_raise_as_serial(data):
    world = data.draw(hs.sampled_from((2, 4)))
    cases = []
    for _ in range(6):
        op = data.draw(hs.sampled_from(INDEX_OPS))
        ndim = 2 if op == "embedding" else data.draw(hs.integers(1, 3))
        shape = data.draw(hs.lists(hs.integers(1, 7), min_size=ndim, max_size=ndim))
        d = 0 if op == "embedding" else data.draw(hs.integers(0, ndim - 1))
        stride = data.draw(hs.sampled_from([s for s in (1, 2, 3) if shape[d] % s == 0]))
        n = shape[d]
        idx = data.draw(hs.lists(hs.integers(-n - 2, n + 2), min_size=1, max_size=4))
        cases.append((tuple(shape), d, stride, op, idx))
    for results in run(world, _indices_vs_serial, cases):
        assert all(r is True for r in results), [r for r in results if r is not True]


# --- torch.cat with legacy empty 1-D inputs --------------------------------------------------

def _empty(kind, pg):
    if kind == "plain":
        return torch.empty(0, dtype=torch.float64, requires_grad=True)
    if kind == "float32":   # takes part in type promotion, as serial
        return torch.empty(0, dtype=torch.float32, requires_grad=True)
    spec = st.ShardSpec(0, pg.tp_world_size()) if kind == "sharded" else st.ReplicaSpec()
    return st.ShardedTensor.from_global(torch.empty(0, dtype=torch.float64), pg, spec) \
        .requires_grad_()


def _cats_vs_serial(rank, cases):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    wrong = []
    for shape, sdim, kinds, where, dim in cases:
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        runs = []
        for sharded in (False, True):
            a = x.clone().requires_grad_() if not sharded else \
                st.ShardedTensor.from_global(x, pg, st.ShardSpec(sdim, n)).requires_grad_()
            es = [_empty(k, pg) if sharded else torch.empty(0, dtype=torch.float32 if k ==
                                                            "float32" else torch.float64,
                                                            requires_grad=True) for k in kinds]
            ts = es[:where] + [a] + es[where:]
            y = torch.cat(ts, dim)
            w = torch.arange(y.numel(), dtype=y.dtype).view(y.shape)
            (y * w).sum().backward()
            full = lambda t: t.full() if isinstance(t, st.ShardedTensor) else t
            runs.append((full(y).detach(), y.dtype, full(a.grad),
                         [None if e.grad is None else tuple(e.grad.shape) for e in es]))
        (y0, d0, g0, e0), (y1, d1, g1, e1) = runs
        if not (d0 == d1 and torch.equal(y0, y1) and torch.equal(g0, g1) and e0 == e1):
            wrong.append((shape, sdim, kinds, where, dim, e0, e1, d0, d1))
    return wrong


CAT_CASES = [((6,), 0, kinds, where, 0)
             for kinds in (["plain"], ["sharded"], ["replicated"], ["plain", "sharded"])
             for where in range(len(kinds) + 1)] + \
            [((4, 6), sdim, kinds, where, dim)
             for sdim in (0, 1) for dim in (0, 1, -1)
             for kinds, where in ((["plain"], 0), (["sharded", "replicated"], 1),
                                  (["float32"], 1))]


@pytest.mark.parametrize("world", [2, 4])
def test_cat_with_legacy_empty_inputs_keeps_them_in_the_graph(world):
    assert run(world, _cats_vs_serial, CAT_CASES) == [[]] * world
