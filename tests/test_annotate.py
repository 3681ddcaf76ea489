"""split_row / split_col / replicate convert a module's parameter in place."""
import pytest
import torch
from torch import nn

import shardtensor as st
from shardtensor.testing import run


def _convert(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)   # 7 rows: uneven over 2 and 4
    full_w, full_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    w, b = lin.weight, lin.bias
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)   # built before the conversion
    st.split_row(lin.weight, pg)
    st.split_col(lin.bias, pg)
    assert lin.weight is w and lin.bias is b            # same Python objects
    assert opt.param_groups[0]["params"][0] is w
    assert isinstance(w, nn.Parameter) and isinstance(w, st.ShardedTensor)
    assert dict(lin.named_parameters())["weight"] is w
    assert w.shape == (7, 5) and w.spec == st.ShardSpec(0, n) and w.requires_grad
    assert b.spec == st.ShardSpec(0, n)  # dim -1 of a vector is dim 0
    assert torch.equal(w.full(), full_w) and torch.equal(b.full(), full_b)
    assert torch.equal(w.to_local(), torch.tensor_split(full_w, n)[pg.tp_local_rank()])
    # gradients arrive as ShardedTensors with the parameter's layout
    ((w.full() ** 2).sum() + (b.full() ** 3).sum()).backward()
    assert isinstance(w.grad, st.ShardedTensor) and w.grad.spec == w.spec
    assert torch.allclose(w.grad.full(), 2 * full_w)
    assert torch.allclose(b.grad.full(), 3 * full_b ** 2)
    # zero_grad(set_to_none=True) really clears the shard's gradient
    opt.zero_grad()
    assert w.grad is None and w.to_local().grad is None
    # a replicated parameter keeps the full value
    ln = nn.LayerNorm(5)
    st.replicate(ln.weight, pg)
    assert ln.weight.spec == st.ReplicaSpec() and torch.equal(ln.weight.to_local(), torch.ones(5))
    # converting twice is an error that names the layout
    with pytest.raises(st.ShardingError, match="already sharded"):
        st.split_row(lin.weight, pg)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_and_replicate_in_place(world):
    assert all(run(world, _convert))


def _bad_plan(rank):
    pg = st.ProcessGroup()
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="stride 4"):
        st.parallelize(model, pg, plan={"0.weight": "row", "1.weight": ("col", {"stride": 4})})
    # nothing was converted: bad input changes nothing
    assert not any(isinstance(p, st.ShardedTensor) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(KeyError, match="no built-in tensor-parallel plan"):
        st.parallelize(model, pg)
    st.parallelize(model, pg, plan={"0.*": "row", "1.weight": "col"})
    specs = {n: p.spec for n, p in model.named_parameters()}
    return specs


def test_parallelize_plan_globs_and_errors():
    specs = run(2, _bad_plan)[0]
    assert specs == {"0.weight": st.ShardSpec(0, 2), "0.bias": st.ShardSpec(0, 2),
                     "1.weight": st.ShardSpec(1, 2), "1.bias": st.ReplicaSpec()}


def _tied(rank):
    pg = st.ProcessGroup()
    emb = nn.Embedding(11, 4)
    head = nn.Linear(4, 11, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head))
    st.parallelize(model, pg, plan={"emb.weight": "row"})
    return model.head.weight is model.emb.weight and isinstance(model.head.weight, st.ShardedTensor)


def test_tied_weights_stay_tied():
    assert all(run(2, _tied))


def _unmatched_glob(rank):
    import warnings
    pg = st.ProcessGroup()
    out = []
    for plan in ({"0.wieght": "row", "0.bias": "row"}, {"0.weight": "row", "0.bias": "row"}):
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            st.parallelize(model, pg, plan=plan)
        out.append(([str(x.message) for x in w if "match no parameter" in str(x.message)],
                    model[0].weight.spec.is_shard))
    return out


def test_a_plan_glob_matching_no_parameter_is_named():
    """A typo in a plan leaves a correct but unparallel layer: parallelize names the glob."""
    for (typo, typo_sharded), (ok, ok_sharded) in run(2, _unmatched_glob):
        assert len(typo) == 1 and "'0.wieght'" in typo[0] and "0.bias" not in typo[0].split("(")[0]
        assert not typo_sharded
        assert ok == [] and ok_sharded


def _state(model):
    """(name, layout or None, full value) of every parameter: what a failed call must not change."""
    return [(n, p.spec if isinstance(p, st.ShardedTensor) else None,
             (p.full() if isinstance(p, st.ShardedTensor) else p).detach().clone())
            for n, p in model.named_parameters()]


def _same_state(a, b):
    return [(n, s) for n, s, _ in a] == [(n, s) for n, s, _ in b] and all(
        torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))


# plan -> what the error must say besides "parallelize", the glob and the parameter
_BAD_PLANS = [
    ({"0.weight": ("col", {"strid": 3})}, "'strid' (did you mean 'stride'?)"),
    ({"0.weight": ("col", {"stride": 0})}, "stride must be >= 1"),
    ({"0.weight": ("row", {"dim": 1})}, "unknown option 'dim'"),
    ({"0.weight": ("col", {}, 1)}, "(layout, options)"),
    ({"0.weight": ("col", {"stride": 3})}, "not a multiple of stride 3"),
    ({"0.*": "column"}, "use 'row', 'col'"),
]


def _named_errors(rank):
    pg = st.ProcessGroup()
    n = pg.tp_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    said = []
    for plan, hint in _BAD_PLANS:
        before = _state(model)
        with pytest.raises(ValueError) as e:
            st.parallelize(model, pg, plan={"1.weight": "col", **plan})
        glob = next(iter(plan))
        said.append(all(s in str(e.value) for s in ("parallelize", repr(glob), "'0.weight'", hint)))
        assert _same_state(before, _state(model)), plan   # nothing converted
    # a parameter annotated twice: split_row then split_col names the helper
    st.split_row(model[0].weight, pg)
    before = _state(model)
    with pytest.raises(st.ShardingError) as e:
        st.split_col(model[0].weight, pg)
    said.append("split_col" in str(e.value) and "already sharded" in str(e.value))
    # ... then a plan that lays it out otherwise: parallelize, the parameter and the glob
    with pytest.raises(st.ShardingError) as e:
        st.parallelize(model, pg, plan={"1.weight": "col", "0.w*": "col"})
    said.append(all(s in str(e.value) for s in (
        "parallelize", "'0.weight'", "'0.w*'", repr(st.ShardSpec(0, n)), repr(st.ShardSpec(1, n)))))
    assert _same_state(before, _state(model))   # 1.weight not converted either
    # parallelize twice: the same plan again changes nothing, another plan is refused
    st.parallelize(model, pg, plan={"0.weight": "row", "1.weight": "col"})
    before = _state(model)
    st.parallelize(model, pg, plan={"0.weight": "row", "1.weight": "col"})
    assert _same_state(before, _state(model))
    with pytest.raises(st.ShardingError) as e:
        st.parallelize(model, pg, plan={"0.weight": "row", "1.*": "replicate"})
    said.append(all(s in str(e.value) for s in ("parallelize", "'1.weight'", "'1.*'")))
    assert _same_state(before, _state(model))
    return said


@pytest.mark.parametrize("world", [1, 2])
def test_plan_and_annotation_errors_name_their_cause_and_change_nothing(world):
    # a misspelled option raised ShardSpec's TypeError (no parallelize, glob or parameter), a
    # second split named no helper, and parallelize over annotated parameters silently kept
    # the earlier layout where the new plan asked another
    for said in run(world, _named_errors):
        assert said == [True] * len(said)
