"""No pickle on any load path: st.load (model and optimizer) and st.load_pretrained run with
every unpickling entry point replaced by one that fails."""
import pickle

import torch

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run


def _forbidden(*args, **kwargs):
    raise AssertionError("an unpickling function was called on a load path")


def _loads_without_pickle(rank, ckpt, hf_dir):
    pg = st.ProcessGroup()
    model = build("gpt2", "sdpa")
    st.parallelize(model, pg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**inputs_for("gpt2")).loss.backward()
    opt.step()
    st.save(model, f"{ckpt}/model")
    st.save(opt, f"{ckpt}/optim", model=model)
    if rank == 0:
        build("gpt2", "sdpa").save_pretrained(hf_dir)
    torch.distributed.barrier()

    fresh = build("gpt2", "sdpa", seed=7)
    st.parallelize(fresh, pg)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with torch.device("meta"):
        meta = type(fresh)(fresh.config)
    st.parallelize(meta, pg)
    saved = pickle.load, pickle.loads, torch.load
    pickle.load = pickle.loads = torch.load = _forbidden
    try:
        st.load(fresh, f"{ckpt}/model")
        st.load(fresh_opt, f"{ckpt}/optim", model=fresh)
        st.load_pretrained(meta, hf_dir)
    finally:
        pickle.load, pickle.loads, torch.load = saved
    same = all(torch.equal(p.full(), q.full()) for p, q in zip(fresh.parameters(), model.parameters()))
    return same, len(fresh_opt.state) == len(opt.state)


def test_no_pickle_on_any_load_path(tmp_path):
    (tmp_path / "hf").mkdir()
    for same, state in run(2, _loads_without_pickle, str(tmp_path), str(tmp_path / "hf")):
        assert same and state
