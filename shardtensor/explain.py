"""explain: run a model once and report, per dispatched op, the input layouts, the output
layout and the collectives its rule inserted (forward, and backward when asked)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from . import trace as _trace
from .tensor import ShardedTensor

__all__ = ["explain", "Explanation", "ExplainRow"]

# plumbing that is not computation: kept out of the report
_QUIET = {"passthrough", "on_local", "text", "get_grad", "set_grad", "get_data", "set_data",
          "requires_grad_", "set_requires_grad", "detach", "backward"}


def _layout(x) -> str:
    if isinstance(x, ShardedTensor):
        return repr(x._spec)
    if isinstance(x, torch.Tensor):
        return "plain"
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return "[" + ", ".join(_layout(v) for v in x if isinstance(v, torch.Tensor)) + "]"
    return ""


@dataclass
class ExplainRow:
    op: str
    inputs: Tuple[str, ...]
    output: str
    collectives: List[Tuple[str, str, int]] = field(default_factory=list)  # (phase, kind, nbytes)


class Explanation:
    """Rows of (op, input layouts, output layout, collectives); prints as a table."""

    def __init__(self):
        self.rows: List[ExplainRow] = []
        self.output = None
        self._trace = _trace.CommTrace()

    def call(self, rule, func, args, kwargs):
        if rule.__name__ in _QUIET:
            return rule(func, args, kwargs)
        before = len(self._trace.events)
        out = rule(func, args, kwargs)
        ins = tuple(s for s in (_layout(a) for a in list(args) + list(kwargs.values())) if s)
        row = ExplainRow(_trace.func_name(func), ins, _layout(out) or type(out).__name__)
        row.collectives = [(e.phase, e.kind, e.nbytes) for e in self._trace.events[before:]]
        self.rows.append(row)
        return out

    def _backward_events(self, start: int) -> None:
        for e in self._trace.events[start:]:
            row = ExplainRow(e.op, (), "(backward)", [(e.phase, e.kind, e.nbytes)])
            self.rows.append(row)

    def collectives(self, phase=None) -> List[Tuple[str, str, int]]:
        return [c for r in self.rows for c in r.collectives if phase is None or c[0] == phase]

    def __str__(self) -> str:
        head = ("#", "op", "inputs", "output", "collectives")
        body = []
        for i, r in enumerate(self.rows):
            comm = ", ".join(f"{k} {n:,}B ({p})" for p, k, n in r.collectives) or "-"
            body.append((str(i), r.op, ", ".join(r.inputs), r.output, comm))
        widths = [min(60, max(len(x[j]) for x in [head] + body)) for j in range(5)]
        line = lambda x: "  ".join(c[:w].ljust(w) for c, w in zip(x, widths)).rstrip()
        return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body])

    __repr__ = __str__


def explain(model, *args, backward: bool = False, **kwargs) -> Explanation:
    """Run `model(*args, **kwargs)` once and return an Explanation: for every op that reached a
    sharding rule, its input layouts, output layout and the collectives inserted. With
    `backward=True`, also runs backward from the output's loss (or the sum of its first tensor)
    and lists the backward collectives. Prints as a table."""
    ex = Explanation()
    _trace.EXPLAIN.append(ex)
    try:
        with ex._trace:
            out = model(*args, **kwargs)
            if backward:
                loss = getattr(out, "loss", None)
                if loss is None:
                    loss = out if isinstance(out, torch.Tensor) else out[0]
                    loss = loss.sum()
                start = len(ex._trace.events)
                loss.backward()
                ex._backward_events(start)
    finally:
        _trace.EXPLAIN.remove(ex)
    ex.output = out
    return ex
