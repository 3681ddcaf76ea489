from hypothesis import given, strategies as hs
import pytest

import shardtensor as st


def test_contract_16_rank_example():
    t = st.Topology(world_size=16, tp_degree=2, pp_degree=4)
    assert t.dp_degree == 2
    assert t.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert t.pp_groups() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert t.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert t.model_parallel_groups() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert t.embedding_groups() == [[0, 12], [1, 13], [2, 14], [3, 15]]


def megatron_groups(world, tp, pp):
    """Megatron-LM's initialize_model_parallel loops (parallel_state.py, pre-RankGenerator)."""
    dp = world // (tp * pp)
    num_pp_groups = world // pp
    dp_groups = []
    for i in range(pp):
        start, end = i * num_pp_groups, (i + 1) * num_pp_groups
        for j in range(tp):
            dp_groups.append(list(range(start + j, end, tp)))
    mp_groups = [[g[i] for g in dp_groups] for i in range(dp)]
    tp_groups = [list(range(i * tp, (i + 1) * tp)) for i in range(world // tp)]
    pp_groups = [list(range(i, world, num_pp_groups)) for i in range(num_pp_groups)]
    emb = [[g[0], g[-1]] if len(g) > 1 else g for g in pp_groups]
    return tp_groups, dp_groups, pp_groups, mp_groups, emb


@given(hs.sampled_from([1, 2, 4, 8]), hs.sampled_from([1, 2, 4]), hs.integers(1, 4))
def test_topology_matches_megatron(tp, pp, dp):
    world = tp * pp * dp
    t = st.Topology(world_size=world, tp_degree=tp, pp_degree=pp)
    tp_g, dp_g, pp_g, mp_g, emb = megatron_groups(world, tp, pp)
    assert t.tp_groups() == tp_g
    assert t.dp_groups() == dp_g
    assert t.pp_groups() == pp_g
    assert sorted(map(sorted, t.model_parallel_groups())) == sorted(map(sorted, mp_g))
    assert t.embedding_groups() == emb
    for r in range(world):
        assert t.rank(*t.coords(r)) == r


def test_topology_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        st.Topology(world_size=6, tp_degree=4)
    with pytest.raises(ValueError, match="tp_degree"):
        st.Topology(world_size=4, tp_degree=0)
