"""Conv nets' per-channel norms against serial torch over random layouts (ops/norm.py):
F.group_norm (local where every rank holds whole groups, else the statistics summed over the
group), F.instance_norm (running statistics included) and nn.BatchNorm training over a
batch-sharded input (SyncBatchNorm's statistics). Output, every gradient, running statistics;
float64; worlds 1, 2 and 4."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as hs

import shardtensor as st
from shardtensor.testing import run
from strategies import WORLDS, specs

TOL = dict(rtol=1e-9, atol=1e-10)


def _lay(pg, t, how):
    """`t` as a plain tensor, a replicated or a channel-sharded (dim 0) ShardedTensor."""
    if how == "sharded":
        return st.ShardedTensor.from_global(t, pg, st.ShardSpec(0, pg.tp_world_size()))
    return st.ShardedTensor.from_global(t, pg, st.ReplicaSpec()) if how == "replica" else t


def _full(t):
    return t.full() if isinstance(t, st.ShardedTensor) else t


def _one(pg, kind, shape, x_spec, affine, stats, arg, seed):
    """F.group_norm (arg: num_groups) or F.instance_norm (arg: use_input_stats) with the input in
    `x_spec`, weight/bias and running statistics laid out by `affine` / `stats` (None, "plain",
    "replica", "sharded"), vs serial -> (output spec, forward collectives)."""
    torch.manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    ref = [t.detach().clone() for t in (x, w, b, rm, rv)]
    for t in (x, ref[0]) + ((w, b, ref[1], ref[2]) if affine else ()):
        t.requires_grad_()
    tx = st.ShardedTensor.from_global(x, pg, x_spec)
    tw, tb = (None, None) if affine is None else (_lay(pg, w, affine), _lay(pg, b, affine))
    trm, trv = (None, None) if stats is None else (_lay(pg, rm, stats), _lay(pg, rv, stats))
    rw, rb = (ref[1], ref[2]) if affine else (None, None)
    rrm, rrv = (ref[3], ref[4]) if stats else (None, None)
    with st.CommTrace() as trace:
        if kind == "group":
            out = F.group_norm(tx, arg, tw, tb, 1e-5)
        else:
            out = F.instance_norm(tx, trm, trv, tw, tb, arg, 0.3, 1e-5)
    expect = (F.group_norm(ref[0], arg, rw, rb, 1e-5) if kind == "group"
              else F.instance_norm(ref[0], rrm, rrv, rw, rb, arg, 0.3, 1e-5))
    g = torch.randn(expect.shape, dtype=torch.float64)
    (out.full() * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(out.full(), expect.detach(), **TOL)
    torch.testing.assert_close(x.grad, ref[0].grad, **TOL)
    if affine:
        torch.testing.assert_close(w.grad, ref[1].grad, **TOL)
        torch.testing.assert_close(b.grad, ref[2].grad, **TOL)
    if stats:
        torch.testing.assert_close(_full(trm), ref[3], **TOL)
        torch.testing.assert_close(_full(trv), ref[4], **TOL)
    return out.spec, [e.kind for e in trace.events
                      if e.phase == "forward" and e.op != "from_global"]


def _cases(rank, cases):
    pg = st.ProcessGroup()
    return [_one(pg, *case) for case in cases]


@hs.composite
def _case(draw, world):
    kind = draw(hs.sampled_from(["group", "instance"]))
    groups, size = draw(hs.integers(1, 3)), draw(hs.integers(1, 3))
    c = groups * size if kind == "group" else draw(hs.integers(1, 6))
    spatial = tuple(draw(hs.lists(hs.integers(1, 4), min_size=kind == "instance", max_size=2)))
    shape = (draw(hs.integers(1, 3)), c) + spatial
    use = kind == "group" or draw(hs.booleans())
    stats = None if kind == "group" else draw(hs.sampled_from(
        ["plain", "replica", "sharded"] + [None] * use))
    # torch needs two values per statistic
    if use and (size if kind == "group" else 1) * torch.Size(shape[2:]).numel() * (
            shape[0] if kind == "group" else 1) < 2:
        shape = shape[:-1] + (2,) if spatial else (2,) + shape[1:]
    x_spec = draw(specs(shape, world))
    affine = draw(hs.sampled_from([None, "plain", "replica", "sharded"]))
    return (kind, shape, x_spec, affine, stats, groups if kind == "group" else use,
            draw(hs.integers(0, 2**16)))


@pytest.mark.parametrize("world", WORLDS)
@given(data=hs.data())
def test_group_and_instance_norm_match_serial(world, data):
    cases = [data.draw(_case(world)) for _ in range(2)]
    got = run(world, _cases, cases)[0]
    for case, (spec, _) in zip(cases, got):
        x_spec, nd = case[2], len(case[1])
        laid = (st.ShardSpec(x_spec.dim % nd, world, x_spec.stride) if x_spec.is_shard
                else st.ReplicaSpec())
        if world > 1:   # the output keeps the input's layout (a pending sum reduced first)
            assert spec == laid, (case, spec)


@pytest.mark.parametrize("world", [2, 4])
def test_norms_communicate_only_where_statistics_span_ranks(world):
    """Whole groups per rank (also uneven: 6 single-channel groups over 4 ranks), instance norm
    of a channel- or batch-sharded input: no forward communication; groups straddling the
    shards, or a spatial-sharded input: two all-reduces (mean, then variance); running
    statistics of a batch-sharded instance norm: one all-reduce."""
    s = lambda d: st.ShardSpec(d, world)                              # noqa: E731
    cases = [("group", (2, 8, 3), s(1), "sharded", None, 4),          # whole groups
             ("group", (2, 6, 3), s(1), "plain", None, 6),            # uneven at 4, whole
             ("group", (3, 8, 3), s(0), "plain", None, 2),            # batch-sharded
             ("group", (2, 6, 3), s(1), "plain", None, 3),            # straddling: 2 per group
             ("group", (2, 4, 5, 3), s(2), "plain", None, 2),         # spatial-sharded
             ("instance", (2, 5, 4), s(1), "sharded", "plain", True),
             ("instance", (3, 5, 4), s(0), "plain", None, True),
             ("instance", (3, 5, 4), s(0), "plain", "plain", True),
             ("instance", (2, 5, 4), s(2), "plain", "plain", True),
             ("instance", (2, 5, 4), s(2), "plain", "plain", False)]  # eval: running stats
    got = run(world, _cases, [c + (i,) for i, c in enumerate(cases)])[0]
    two, gather = ["all_reduce", "all_reduce"], ["all_gather"]
    forward = [f for _, f in got]
    assert forward == [[], [], [], two, two, gather, [], ["all_reduce"], two, []], forward


def _bad(rank):
    """Bad calls on sharded inputs: each raises torch's error on every rank, before running."""
    pg = st.ProcessGroup()
    x = st.ShardedTensor.from_global(torch.randn(2, 6, 3), pg, st.ShardSpec(1, 2))
    out = []
    for call in (lambda: F.group_norm(x, 4), lambda: F.group_norm(x, 2, torch.ones(5)),
                 lambda: F.instance_norm(x[:, :, :1])):
        try:
            call()
            out.append(None)
        except (RuntimeError, ValueError) as e:
            out.append(type(e).__name__ + ": " + str(e))
    return out


def test_bad_norm_calls_raise_torch_errors():
    for msgs in run(2, _bad):
        assert [m and m.split(":")[0] for m in msgs] == [
            "RuntimeError", "RuntimeError", "ValueError"], msgs
        assert "num_groups" in msgs[0] and "weight" in msgs[1] and "spatial" in msgs[2], msgs


def _bn_batch_sharded(rank, batch):
    """nn.BatchNorm2d trained on a batch split over the group (uneven: `batch` samples), two
    steps with SGD: outputs, gradients, running statistics and weights equal serial's every
    step; -> the collectives of the last step."""
    pg = st.ProcessGroup()
    world = pg.tp_world_size()
    torch.manual_seed(0)
    serial = torch.nn.BatchNorm2d(5, momentum=0.2, dtype=torch.float64)
    torch.nn.init.normal_(serial.weight), torch.nn.init.normal_(serial.bias)
    model = st.parallelize(copy.deepcopy(serial), pg, plan={"*": "replicate"})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (serial, model)]
    for step in range(2):
        x = torch.randn(batch, 5, 3, 2, dtype=torch.float64) * 3 + 2
        g = torch.randn(x.shape, dtype=torch.float64)
        xs = x.clone().requires_grad_()
        tx = st.ShardedTensor.from_global(x.clone(), pg, st.ShardSpec(0, world))
        tx.requires_grad_()
        with st.CommTrace() as trace:
            out = model(tx)
            (out * g).sum().backward()
        ref = serial(xs)
        (ref * g).sum().backward()
        torch.testing.assert_close(out.full(), ref.detach(), **TOL)
        torch.testing.assert_close(tx.grad.full(), xs.grad, **TOL)
        for (name, p), q in zip(model.named_parameters(), serial.parameters()):
            torch.testing.assert_close(p.grad.full(), q.grad, **TOL)
        for name, buf in model.named_buffers():
            assert type(buf) is torch.Tensor, name
            torch.testing.assert_close(buf, getattr(serial, name), **TOL)
        for opt in opts:
            opt.step(), opt.zero_grad()
        for p, q in zip(model.parameters(), serial.parameters()):
            torch.testing.assert_close(p.full(), q.detach(), **TOL)
    return sorted((e.phase, e.kind, e.nbytes) for e in trace.events
                  if e.op != "from_global" and e.op != "ShardedTensor.full")


@pytest.mark.parametrize("world,batch", [(1, 3), (2, 3), (4, 3)])
def test_batch_norm_trains_on_a_batch_sharded_input_as_serial(world, batch):
    """Batch statistics over every rank's samples (a rank at tp 4 holds none): SyncBatchNorm's
    two forward all-reduces of the channels' sums (mean, then variance), their two backward, and
    one each for the replicated weight's and bias's gradients; the running statistics stay
    plain and equal serial's."""
    events = run(world, _bn_batch_sharded, batch)
    c = 5 * 8
    expected = [] if world == 1 else sorted([("forward", "all_reduce", c)] * 2
                                            + [("backward", "all_reduce", c)] * 4)
    for e in events:
        assert [x for x in e if x[1] == "all_reduce"] == expected, e


def _low_precision(rank, world):
    """bfloat16 / float16 input with float32 weight and bias (nn.BatchNorm/GroupNorm kept in
    float32 in a half-precision net) through the paths whose statistics span ranks: serial's
    output dtype and values, the input gradient's dtype."""
    pg = st.ProcessGroup()
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(4, 6, 5, generator=g) * 2 + 1).to(dtype)
        w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
        calls = {"batch_norm": lambda t: F.batch_norm(t, torch.zeros(6), torch.ones(6), w, b,
                                                      True),
                 "group_norm": lambda t: F.group_norm(t, 3, w, b),
                 "instance_norm": lambda t: F.instance_norm(t, None, None, w, b)}
        for name, dims in (("batch_norm", (0, 2)), ("group_norm", (1, 2)),
                           ("instance_norm", (2,))):
            for d in dims:
                spec = st.ShardSpec(d, world)
                if name == "group_norm" and d == 1 and world == 2:
                    spec = st.ShardSpec(1, 2, 3)   # groups of 2 channels straddle the shards
                leaf = x.clone().requires_grad_()
                ref = calls[name](leaf)
                ref.float().sum().backward()
                tx = st.ShardedTensor.from_global(x.clone(), pg, spec).requires_grad_()
                got = calls[name](tx)
                got.full().float().sum().backward()
                torch.testing.assert_close(got.full(), ref.detach())   # dtype included
                out.append((name, d, str(got.dtype), str(tx.grad.dtype)))
                assert got.dtype == ref.dtype and tx.grad.dtype == leaf.grad.dtype
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_low_precision_inputs_keep_their_dtype(world):
    # the statistics-spanning paths cast the normalised input to bfloat16 and then applied the
    # float32 weight and bias: a float32 output (serial: bfloat16), rounded twice
    assert len(run(world, _low_precision, world)[0]) == 10


def _batch_norm_one_dim(rank):
    """F.batch_norm of a 1-D input (no channel dim: serial accepts the empty one with empty
    statistics and raises IndexError otherwise), sharded or replicated, training or not."""
    pg = st.ProcessGroup()
    out = []
    for n in (0, 5):
        for training in (True, False):
            x = torch.randn(n, dtype=torch.float64)
            stats = (torch.zeros(0, dtype=torch.float64), torch.ones(0, dtype=torch.float64))
            for spec in (st.ShardSpec(0, pg.tp_world_size()), st.ReplicaSpec(), None):
                xi = x if spec is None else st.ShardedTensor.from_global(x, pg, spec)
                try:
                    y = F.batch_norm(xi, *stats, training=training)
                    got = ("ok", tuple(y.shape))
                except Exception as e:  # noqa: BLE001  (compared with serial's)
                    got = ("error", type(e).__name__)
                out.append(((n, training, repr(spec)), got))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_batch_norm_of_a_one_dim_input_answers_as_serial(world):
    # sharded training read the channel count of a 1-D input (IndexError where serial returns
    # the empty input; found by the OpInfo sweep)
    cases = dict(run(world, _batch_norm_one_dim)[0])
    for (n, training, spec), got in cases.items():
        serial = cases[(n, training, "None")]        # the plain tensor, same rank
        assert serial == (("ok", (0,)) if n == 0 else ("error", "IndexError"))
        assert got == serial, (n, training, spec, got)
