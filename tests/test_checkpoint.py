"""Sharded checkpoints: save at one tp degree, load at another; optimizer state reshards and
training resumes as if uninterrupted; bad checkpoints fail on every rank and change nothing;
a save killed midway leaves the previous checkpoint loadable."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor import checkpoint as ckpt
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run


def _locals(model):
    return {n: (p.to_local() if isinstance(p, st.ShardedTensor) else p).detach().clone()
            for n, p in model.state_dict(keep_vars=True).items()}


def _model(arch, tp, dp=1, seed=0):
    pg = st.ProcessGroup(tp_degree=tp, dp_degree=dp)
    model = build(arch, seed=seed)
    st.parallelize(model, pg)
    return model


# --- resharding: tp=2 -> tp=1, tp=4, tp=2 x dp=2 ------------------------------------------------

def _save_tp2(rank, path):
    model = _model("gpt2", 2)
    st.save(model, path)
    return st.full_state_dict(model)


def _load_everywhere(rank, path, again):
    out = {}
    for tp, dp in ((4, 1), (2, 2), (1, 4)):
        model = _model("gpt2", tp, dp, seed=9)   # other weights, overwritten by the load
        st.load(model, path)
        # only this rank's byte ranges are read (at most twice them, for strided reads)
        local_bytes = sum(t.to_local().numel() * t.element_size() for t in model.parameters())
        assert ckpt.last_load["bytes_read"] <= 2 * local_bytes, (ckpt.last_load, local_bytes)
        out[(tp, dp)] = st.full_state_dict(model)
        if (tp, dp) == (2, 2):
            st.save(model, again)                 # tp x dp: only dp rank 0 of each group writes
    return out


def test_save_tp2_load_tp1_tp4_tp2xdp2(tmp_path):
    path, again = str(tmp_path / "ck"), str(tmp_path / "again")
    saved = run(2, _save_tp2, path)[0]
    serial = build("gpt2").state_dict()
    assert saved.keys() == serial.keys()
    assert all(torch.equal(saved[k], serial[k]) for k in serial)
    assert saved["lm_head.weight"] is saved["transformer.wte.weight"]   # tied, as HF has them

    index = json.loads((tmp_path / "ck" / "index.json").read_text())
    assert sorted(os.listdir(path)) == ["index.json", "tp00000-of-00002.safetensors",
                                        "tp00001-of-00002.safetensors"]
    assert index["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    c_attn = index["tensors"]["transformer.h.0.attn.c_attn.weight"]
    assert c_attn["spec"] == {"type": "shard", "dim": 1, "degree": 2, "stride": 3}
    assert c_attn["pieces"][1]["blocks"] == [[1, 16, 16, 0], [1, 48, 16, 16], [1, 80, 16, 32]]
    for f, info in index["files"].items():
        assert ckpt.sha256_file(os.path.join(path, f)) == info["sha256"]

    loaded = run(4, _load_everywhere, path, again)[0]
    for layout, sd in loaded.items():
        assert sd.keys() == serial.keys(), layout
        bad = [k for k in serial if not torch.equal(sd[k], serial[k])]
        assert not bad, (layout, bad)
    assert sorted(os.listdir(again)) == ["index.json", "tp00000-of-00002.safetensors",
                                         "tp00001-of-00002.safetensors"]
    # the same shards as the tp=2 save: the checkpoint does not depend on the dp degree
    for f in ("tp00000-of-00002.safetensors", "tp00001-of-00002.safetensors"):
        assert ckpt.sha256_file(os.path.join(again, f)) == index["files"][f]["sha256"]


# --- a state dict, not the model: tied names are found by their memory --------------------------

def _save_state_dicts(rank, d):
    model = _model("gpt2", 2)
    st.save(model.state_dict(), d + "/sd")    # a fresh detached tensor per name: ties by memory
    st.save(model, d + "/model")


def _load_tied(rank, paths):
    out = {}
    for path in paths:
        for tp in (1, 2, 4):
            model = _model("gpt2", tp, 4 // tp, seed=9)   # other weights, overwritten by the load
            st.load(model, path)
            assert model.lm_head.weight is model.transformer.wte.weight, (path, tp)
            logits = model(**inputs_for("gpt2")).logits
            out[(path, tp)] = _full(logits, None)
    return out


def test_save_state_dict_keeps_ties_and_loads_at_any_degree(tmp_path):
    d = str(tmp_path)
    run(2, _save_state_dicts, d)
    serial = build("gpt2")
    st.save(serial.state_dict(), d + "/serial")          # never parallelized, one process
    for name, files in (("sd", ["tp00000-of-00002.safetensors", "tp00001-of-00002.safetensors"]),
                        ("serial", ["tp00000-of-00001.safetensors"])):
        assert sorted(os.listdir(tmp_path / name)) == ["index.json"] + files
        index = json.loads((tmp_path / name / "index.json").read_text())
        assert index["aliases"] == {"lm_head.weight": "transformer.wte.weight"}, name
        assert "lm_head.weight" not in index["tensors"]                     # written once
    # exactly the checkpoint st.save(model) writes
    for f in ("index.json", "tp00000-of-00002.safetensors", "tp00001-of-00002.safetensors"):
        assert (tmp_path / "sd" / f).read_bytes() == (tmp_path / "model" / f).read_bytes(), f

    ref = serial(**inputs_for("gpt2")).logits.detach()
    loaded = run(4, _load_tied, [d + "/sd", d + "/serial"])[0]
    assert len(loaded) == 6
    for key, logits in loaded.items():
        assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), key


# --- optimizer state: resume at another degree continues the serial run -------------------------

def _loss(out):
    loss = out.loss
    return (loss.full() if isinstance(loss, st.ShardedTensor) else loss).item()


def _steps(model, opt, n):
    batch, losses = inputs_for("gpt2"), []
    for _ in range(n):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        losses.append(_loss(out))
    return losses


def _full(t, like):
    if isinstance(t, st.ShardedTensor):
        return t.full().detach().clone()   # a replicated tensor's full() is its shard
    if isinstance(like, st.ShardedTensor) and t.dim() and t.shape != like.shape:  # a plain shard
        return st.ShardedTensor.from_local(t, like.pg, like.spec, like.shape).full().detach().clone()
    return t.detach().clone()


def _opt_state(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p.to_local()): n for n, p in model.named_parameters()
                  if isinstance(p, st.ShardedTensor)})
    params = dict(model.named_parameters())
    return {(names[id(p)], k): _full(v, params[names[id(p)]]) for p, s in opt.state.items()
            for k, v in s.items()}


def _train_and_save(rank, d):
    model = _model("gpt2", 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    losses = _steps(model, opt, 3)
    st.save(model, d + "/model")
    st.save(opt, d + "/adamw", model=model)
    # an optimizer over the plain shards (its state is plain local tensors), SGD with momentum
    sgd = torch.optim.SGD([p.to_local() for p in model.parameters()], lr=0.0, momentum=0.9)
    opt.zero_grad()
    model(**inputs_for("gpt2")).loss.backward()
    sgd.step()
    st.save(sgd, d + "/sgd", model=model)
    return losses, _opt_state(model, opt), _opt_state(model, sgd)


def _resume(rank, d, tp):
    model = _model("gpt2", tp, 4 // tp, seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)   # hyperparameters come from the checkpoint
    st.load(model, d + "/model")
    st.load(opt, d + "/adamw", model=model)
    state = _opt_state(model, opt)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    st.load(sgd, d + "/sgd", model=model)
    # the same state into an optimizer over the plain shards: plain local state tensors
    sgd_local = torch.optim.SGD([p.to_local() for p in model.parameters()], lr=0.0, momentum=0.9)
    st.load(sgd_local, d + "/sgd", model=model)
    assert all(type(s["momentum_buffer"]) is torch.Tensor for s in sgd_local.state.values())
    assert all(type(s["momentum_buffer"]) is st.ShardedTensor for s in sgd.state.values())
    sgd_states = (_opt_state(model, sgd), _opt_state(model, sgd_local))
    return _steps(model, opt, 2), state, group, sgd_states


def test_optimizer_resume_at_another_degree_continues_serial_run(tmp_path):
    d = str(tmp_path)
    serial = build("gpt2")
    ref = _steps(serial, torch.optim.AdamW(serial.parameters(), lr=1e-2, betas=(0.8, 0.95),
                                           weight_decay=0.1), 5)
    first, adam_state, sgd_state = run(2, _train_and_save, d)[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(first, ref[:3])) < 1e-5, (first, ref)
    assert {k for _, k in adam_state} == {"step", "exp_avg", "exp_avg_sq"}
    kinds = {m["kind"] for s in json.loads((tmp_path / "sgd" / "index.json").read_text())
             ["optimizer"]["state"].values() for m in s.values()}
    assert kinds == {"local"}
    for tp in (4, 1):
        rest, state, group, sgd_loaded = run(4, _resume, d, tp)[0]
        assert group["lr"] == 1e-2 and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
        assert state.keys() == adam_state.keys()
        assert all(torch.equal(state[k], adam_state[k]) for k in state), tp
        for loaded in sgd_loaded:
            assert loaded.keys() == sgd_state.keys()
            assert all(torch.equal(loaded[k], sgd_state[k]) for k in sgd_state), tp
        err = max(abs(a - b) / abs(b) for a, b in zip(rest, ref[3:]))
        assert err < 1e-5, (tp, rest, ref[3:])


# --- faults: every rank raises a clear error, no rank's model changes ---------------------------

def _save(rank, path, arch):
    st.save(_model(arch, 2), path)


def _load_bad(rank, cases):
    model = _model("gpt2", 2, seed=9)
    before = _locals(model)
    msgs = []
    for path in cases:
        with pytest.raises(st.CheckpointError) as e:
            st.load(model, path)
        after = _locals(model)
        assert all(torch.equal(before[k], after[k]) for k in before), path
        msgs.append(str(e.value))
    return msgs


def test_bad_checkpoints_fail_on_every_rank_and_change_nothing(tmp_path):
    good = str(tmp_path / "good")
    run(2, _save, good, "gpt2")
    run(2, _save, str(tmp_path / "opt"), "opt")
    f0, f1 = "tp00000-of-00002.safetensors", "tp00001-of-00002.safetensors"

    def copy(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    d = copy("flipped")                       # only rank 1 reads tp1's shards
    data = bytearray((d / f1).read_bytes())
    data[-9] ^= 0xFF
    (d / f1).write_bytes(bytes(data))
    d = copy("truncated")
    (d / f0).write_bytes((d / f0).read_bytes()[:-100])
    d = copy("missing")
    (d / f1).unlink()
    d = copy("checksum")
    index = json.loads((d / "index.json").read_text())
    index["files"][f0]["sha256"] = "0" * 64
    (d / "index.json").write_text(json.dumps(index))
    cases = {"flipped": f"flipped/{f1} fails its sha256", "truncated": f"truncated/{f0} has",
             "missing": f"missing/{f1} is missing", "checksum": f"checksum/{f0} fails its sha256",
             "opt": "opt/index.json does not match the model: missing tensors ['transformer"}
    msgs = run(2, _load_bad, [str(tmp_path / c) for c in cases])
    for rank_msgs in msgs:                    # the same clear error on both ranks
        for (case, expect), msg in zip(cases.items(), rank_msgs):
            assert expect in msg, (case, msg)
    assert msgs[0] == msgs[1]
    assert "unexpected tensors ['model.decoder." in msgs[0][-1]


# --- a save killed midway leaves the previous checkpoint loadable -------------------------------

def _tiny(tp, seed):
    pg = st.ProcessGroup(tp_degree=tp)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4))
    st.parallelize(model, pg, plan={"0.*": "row", "1.weight": "col"})
    return model


def _save_tiny(rank, path, seed):
    st.save(_tiny(2, seed), path)


def _load_tiny(rank, path):
    model = _tiny(2, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.load(model, path)
    return st.full_state_dict(model), [str(w.message) for w in caught]


def _serial_tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4)).state_dict()


_KILLED_SAVE = """
import os, sys, time
import shardtensor as st
from shardtensor import checkpoint
sys.path.insert(0, {tests!r})
from test_checkpoint import _tiny

def slow_save(rank, path, marker):
    def hook(stage):
        if stage == "shards_written":
            open(f"{{marker}}.{{rank}}", "w").close()
            time.sleep(300)
    checkpoint._crash_hook = hook
    st.save(_tiny(2, seed=1), path)

if __name__ == "__main__":
    st.launch(slow_save, world_size=2, args=(sys.argv[1], sys.argv[2]))
"""


def _same(sd, ref):
    return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    path, marker = str(tmp_path / "ck"), str(tmp_path / "marker")
    run(2, _save_tiny, path, 0)
    script = tmp_path / "killed_save.py"
    script.write_text(textwrap.dedent(_KILLED_SAVE.format(tests=os.path.dirname(__file__))))
    proc = subprocess.Popen([sys.executable, str(script), path, marker], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not all(os.path.exists(f"{marker}.{r}") for r in (0, 1)):
            assert proc.poll() is None and time.time() < deadline, "the save never got going"
            time.sleep(0.1)
        # both ranks have written their new shards; the index is not written yet
        assert sorted(os.listdir(path + ".partial")) == ["tp00000-of-00002.safetensors",
                                                         "tp00001-of-00002.safetensors"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    sd, caught = run(2, _load_tiny, path)[0]
    assert _same(sd, _serial_tiny(0)) and not caught
    # a crash between the two final renames leaves the previous checkpoint at <path>.old and the
    # complete new one at <path>.partial: the previous one is loaded, with a warning
    shutil.rmtree(path + ".partial")
    run(2, _save_tiny, path + ".partial", 1)
    os.rename(path, path + ".old")
    sd, caught = run(2, _load_tiny, path)[0]
    assert _same(sd, _serial_tiny(0)) and "interrupted" in caught[0]
    # the next save cleans up and takes its place
    run(2, _save_tiny, path, 1)
    sd, caught = run(2, _load_tiny, path)[0]
    assert _same(sd, _serial_tiny(1))
    assert sorted(os.listdir(tmp_path)) == ["ck", "killed_save.py", "marker.0", "marker.1"]


# --- full_state_dict is safetensors-compatible ------------------------------------------------------

def _full_llama(rank, path):
    model = _model("llama", st.ProcessGroup().tp_world_size())
    sd = st.full_state_dict(model)
    if rank == 0:   # the untied llama state dict: save_file takes it as it takes the serial one
        import safetensors.torch
        safetensors.torch.save_file(sd, path)
    return {k: v.is_contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("world", (1, 2, 4))
def test_full_state_dict_saves_with_safetensors_save_file(tmp_path, world):
    # API.md: rank 0 gets plain full tensors, safetensors-compatible. A gathered column-split
    # weight (o_proj, down_proj) came back as a non-contiguous view, which save_file refuses
    import safetensors.torch
    path = str(tmp_path / "full.safetensors")
    contiguous = run(world, _full_llama, path)
    assert all(contiguous[0].values()) and contiguous[1:] == [{}] * (world - 1)
    serial = build("llama").state_dict()
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == serial.keys()
    for k, v in serial.items():
        assert torch.equal(loaded[k], v), k
