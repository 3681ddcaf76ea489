"""Backports for the oldest supported torch (shardtensor/compat.py), replayed on this torch.

torch 2.4's `_ParameterMeta.__instancecheck__` counted a tensor flagged `_is_param` (every
sharded parameter) as an instance of every Parameter subclass: the deprecated
`torch.nn.utils.weight_norm` and `spectral_norm` refused a sharded weight ("can't have
uninitialized parameters"). Here torch's check is made torch 2.4's, `compat.install()` run, and
both train as serially. torch 2.4's gloo wrote gathered pieces from its own thread, outside
InferenceMode, refusing inference-tensor outputs: replayed, every gather under inference_mode
works."""
import threading

import pytest
import torch
import torch.distributed as dist
from torch.nn import parameter

import shardtensor as st
from shardtensor import compat
from shardtensor.testing import run

from test_finetune import _mlp_pair, _rel, _train_side_by_side


def _torch_24_instancecheck(cls, instance):   # torch 2.4.1's, verbatim
    return super(parameter._ParameterMeta, cls).__instancecheck__(instance) or (
        isinstance(instance, torch.Tensor) and getattr(instance, "_is_param", False))


def _old_norms(rank, kind):
    meta = parameter._ParameterMeta
    saved = meta.__dict__["__instancecheck__"]
    meta.__instancecheck__ = _torch_24_instancecheck
    try:
        compat.install()
        serial, model = _mlp_pair(st.ProcessGroup(), torch.float64)
        w = model.fc1.weight
        kinds = (isinstance(w, parameter.UninitializedParameter), isinstance(w, torch.nn.Parameter))
        for m in (serial, model):
            for lin in (m.fc1, m.fc2):
                torch.manual_seed(3)   # spectral_norm draws its u, v
                getattr(torch.nn.utils, kind)(lin)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (serial, model)]
        errs = _train_side_by_side(serial, model, opts, seed=4)
        return kinds, max(errs + [_rel(model.fc1.weight, serial.fc1.weight)])
    finally:
        meta.__instancecheck__ = saved


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_torch_24_parameter_check_lets_old_norms_take_sharded_weights(kind):
    for (uninitialized, is_param), err in run(2, _old_norms, kind):
        assert not uninitialized and is_param
        assert err < 1e-10, err
    # and on this torch, whichever it is, once shardtensor is imported
    assert not compat._flag_makes_any_parameter_subclass()


# --- torch 2.4's gloo under inference_mode ------------------------------------------------------

def _from_gloo_thread(out, tmp):
    """Copy `tmp` into `out` from another thread, as torch 2.4's gloo does with gathered
    pieces: that thread is outside InferenceMode, so an inference-tensor `out` is refused."""
    err = []

    def copy():
        try:
            for o, t in zip(out, tmp):
                o.copy_(t)
        except RuntimeError as e:
            err.append(e)
    th = threading.Thread(target=copy)
    th.start()
    th.join()
    if err:
        raise err[0]


def _gloo_24(gather, listed):
    def call(out, x, group=None, **kw):
        with torch.inference_mode(False):
            tmp = [torch.empty_like(o) for o in out] if listed else torch.empty_like(out)
        gather(tmp, x, group=group, **kw)
        _from_gloo_thread(out if listed else [out], tmp if listed else [tmp])
    return call


def _gathers_in_inference_mode(rank):
    from shardtensor import checkpoint_io, collectives
    pg = st.ProcessGroup()
    saved = collectives._all_gather_base, dist.all_gather
    collectives._all_gather_base = _gloo_24(saved[0], False)
    dist.all_gather = _gloo_24(saved[1], True)
    try:
        x = torch.randn(2, 61, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            s = st.ShardedTensor.from_global(x, pg, st.ShardSpec(1, 2))
            top = torch.topk(s, 5)[0]                       # gathers k candidates per rank
            again = st.ShardedTensor.from_local(s.to_local(), pg, s.spec, shape=s.shape)
            names = checkpoint_io.gather_bytes(b"rank%d" % rank, 8)
            return (torch.equal(top.full(), torch.topk(x, 5)[0]), torch.equal(again.full(), x),
                    names)
    finally:
        collectives._all_gather_base, dist.all_gather = saved


def test_gathers_under_inference_mode_on_torch_24_gloo():
    # before: 'Inplace update to inference tensor outside InferenceMode is not allowed' (the
    # decode step's top-k in transformers' generate under torch.inference_mode, torch 2.4)
    for top_ok, full_ok, names in run(2, _gathers_in_inference_mode):
        assert top_ok and full_ok and names == [b"rank0", b"rank1"]
