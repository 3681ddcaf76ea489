"""The persistent rank pool (shardtensor.testing): a task whose ranks fail apart, or issue
different collectives, is reported as such and leaves a fresh pool behind instead of ranks
stuck in a collective that the next task would pair with its own."""
import time

import pytest
import torch
import torch.distributed as dist

from shardtensor.launch import RemoteError
from shardtensor.testing import _mismatch, pool, run


def _rank0_fails_before_all_reduce(rank):
    if rank == 0:
        raise ValueError("rank 0 stops here")
    dist.all_reduce(torch.ones(3))      # rank 1 waits for a partner that never comes
    return rank


def _all_reduce_sum(rank):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_a_rank_failing_alone_is_reported_fast_and_the_pool_restarts():
    before = pool(2)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="rank 0 stops here") as info:
        run(2, _rank0_fails_before_all_reduce)
    assert time.monotonic() - start < 40, "waited for gloo's timeout instead of restarting"
    assert "_rank0_fails_before_all_reduce" in str(info.value)
    assert pool(2) is not before                 # a fresh pool ...
    assert run(2, _all_reduce_sum) == [3.0, 3.0]  # ... whose collectives pair up again


def test_collectives_are_logged_per_task():
    # the same call twice: the log of each task holds exactly its own collectives
    assert run(2, _all_reduce_sum) == [3.0, 3.0]
    assert run(2, _all_reduce_sum) == [3.0, 3.0]


def test_mismatch_names_the_group_and_the_ranks():
    same = [(None, "all_reduce", ((4,), "torch.float32"))]
    assert _mismatch({0: same, 1: list(same)}, 2) == ""
    extra = same + [(None, "all_gather", None)]
    msg = _mismatch({0: same, 1: extra}, 2)
    assert "different collectives on group WORLD" in msg
    assert "rank 0: 1 calls" in msg and "rank 1: 2 calls" in msg
    size = [(None, "all_reduce", ((5,), "torch.float32"))]
    assert "different collectives" in _mismatch({0: same, 1: size}, 2)
    # a subgroup's calls are compared among its members only
    sub = [((0, 1), "broadcast", ((2,), "torch.float32"))]
    assert _mismatch({0: sub, 1: sub, 2: [], 3: []}, 4) == ""
    assert "group (0, 1)" in _mismatch({0: sub, 1: [], 2: [], 3: []}, 4)
