"""Backports for the oldest supported torch (shardtensor/compat.py), replayed on this torch.

torch 2.4's `_ParameterMeta.__instancecheck__` counted a tensor flagged `_is_param` (every
sharded parameter) as an instance of every Parameter subclass: the deprecated
`torch.nn.utils.weight_norm` and `spectral_norm` refused a sharded weight ("can't have
uninitialized parameters"). Here torch's check is made torch 2.4's, `compat.install()` run, and
both train as serially."""
import pytest
import torch
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
