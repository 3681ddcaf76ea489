"""Memory queries (`untyped_storage`, `storage`, `data_ptr`): a replicated tensor answers with its
shard's memory (the whole tensor); a sharded or partial one raises an error naming how to save a
parallelized model, also under the gather fallback (a gathered copy's memory is freed at once,
and a gather issued only on the rank that writes mismatches the other ranks' collectives)."""
import warnings

import pytest
import torch

import shardtensor as st
from shardtensor.testing import run

T = torch.Tensor
QUERIES = [T.untyped_storage, T.storage, T.data_ptr]


def _memory(rank):
    pg = st.ProcessGroup()
    full = torch.arange(24.0).view(4, 6)
    rep = st.ShardedTensor.from_global(full, pg, st.ReplicaSpec())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        assert rep.data_ptr() == rep.to_local().data_ptr()
        assert rep.untyped_storage().data_ptr() == rep.to_local().untyped_storage().data_ptr()
        assert rep.untyped_storage().nbytes() == rep.nbytes
        assert rep.storage().data_ptr() == rep.to_local().data_ptr()
    partial = st.ShardedTensor.from_local(full / 2, pg, st.PartialSpec())
    msgs = []
    for t in (st.ShardedTensor.from_global(full, pg, st.ShardSpec(1, 2)), partial):
        for fallback in (None, "gather"):
            st.config.fallback = fallback
            try:
                for q in QUERIES:
                    with pytest.raises(st.UnsupportedOpError) as e:
                        q(t)
                    msgs.append(str(e.value))
            finally:
                st.config.fallback = None
    return msgs


def test_memory_of_replicated_is_the_shard_and_of_sharded_raises_with_the_recipe():
    msgs = run(2, _memory)[0]
    assert len(msgs) == 12
    assert msgs[0].startswith("Tensor.untyped_storage: a ShardedTensor with "
                              "ShardSpec(dim=1, degree=2) has no memory holding its global value "
                              "of shape (4, 6), only this rank's shard of shape (4, 3)")
    for m in msgs:
        assert "shardtensor.save(model, path)" in m
        assert "state_dict=shardtensor.full_state_dict(model)" in m
