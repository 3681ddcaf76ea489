"""torch's OpInfo samples at tp 2 against serial (tests/ops/opinfo_sweep.py): for a curated list
of ops over the rule families, every sample's first input sharded on each dim, stride 2,
replicated and partial, the other inputs plain or laid out alike, in float64: no case may be
WRONG (values, shape, dtype, gradient or a write differ from serial's) or CRASH (an exception
other than shardtensor's clear refusal or serial's own). REFUSED cases are counted; every op
must have cases that run and match serial."""
import collections

from shardtensor.testing import run

import opinfo_sweep as sw

# cheap ops over the families: elementwise, reductions, views/joins, linear algebra, losses,
# norms, indexing and writes, padding, casts (int16 travels as bytes)
OPS = {
    "add", "mul", "div.no_rounding_mode", "abs", "sin", "exp", "where", "clamp", "pow", "lerp",
    "addcmul", "masked_fill", "short",
    "sum", "mean", "amax", "argmax", "var", "softmax", "log_softmax", "logsumexp", "cumsum",
    "view", "reshape", "transpose", "permute", "flatten", "unsqueeze", "expand", "narrow",
    "split", "chunk", "select", "squeeze",
    "nn.functional.linear", "matmul", "mm", "bmm", "addmm",
    "nn.functional.cross_entropy", "nn.functional.mse_loss", "nn.functional.layer_norm",
    "nn.functional.embedding", "gather", "index_select", "index_add", "index_fill", "scatter_add",
    "nn.functional.pad.constant", "nn.functional.pad.reflect", "topk",
}


def test_opinfo_samples_at_tp2_match_serial():
    rows = sw.merge(run(2, sw.sweep, OPS, 2, 3, timeout=120))   # (a hang: ranks diverged)
    by_op = collections.defaultdict(collections.Counter)
    for r in rows:
        by_op[r[0]][r[5]] += 1
    bad = [r[:7] for r in rows if r[5] in ("WRONG", "CRASH")]
    assert not bad, "\n".join(map(str, bad[:20]))
    assert set(by_op) == OPS, sorted(OPS - set(by_op))   # every name is an OpInfo that ran
    never = sorted(op for op, c in by_op.items() if not c["OK"])
    assert not never, f"no case of {never} ran (all refused)"
    total = collections.Counter(r[5] for r in rows)
    print(f"OpInfo sweep at tp 2: {dict(total)} over {len(by_op)} ops")
