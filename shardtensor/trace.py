"""CommTrace: a record of every collective shardtensor issues, forward and backward."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

__all__ = ["CommTrace", "CommEvent", "func_name"]

_ACTIVE: List["CommTrace"] = []
# An active `explain` recorder, if any (checked once per dispatched op).
EXPLAIN: List[object] = []
# The function whose rule is running; set by the dispatcher, read when a collective is recorded.
current_op: List[object] = [None]


@dataclass(frozen=True)
class CommEvent:
    """One collective: `kind` is the torch.distributed name, `nbytes` the size of the tensor
    the collective works on (the full tensor for all_reduce / all_gather / reduce_scatter, this
    rank's send buffer for all_to_all), `op` the function whose rule issued it."""

    kind: str
    nbytes: int
    group_size: int
    op: str
    phase: str


class CommTrace:
    """Context manager recording the collectives issued inside it (on this rank).

    >>> with st.CommTrace() as trace:
    ...     model(x).sum().backward()
    >>> trace.count("all_reduce", phase="forward")
    """

    def __init__(self):
        self.events: List[CommEvent] = []

    def __enter__(self) -> "CommTrace":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def count(self, kind: Optional[str] = None, phase: Optional[str] = None,
              op: Optional[str] = None) -> int:
        """Number of recorded collectives matching every given field."""
        return sum(1 for e in self.events
                   if (kind is None or e.kind == kind) and (phase is None or e.phase == phase)
                   and (op is None or e.op == op))

    def nbytes(self, kind: Optional[str] = None, phase: Optional[str] = None) -> int:
        return sum(e.nbytes for e in self.events
                   if (kind is None or e.kind == kind) and (phase is None or e.phase == phase))

    def summary(self) -> str:
        """A table: count and bytes per (phase, collective kind, function)."""
        rows: Dict[tuple, List[int]] = defaultdict(lambda: [0, 0])
        for e in self.events:
            r = rows[(e.phase, e.kind, e.op)]
            r[0] += 1
            r[1] += e.nbytes
        head = ("phase", "collective", "function", "count", "bytes")
        body = [(p, k, o, str(c), f"{b:,}") for (p, k, o), (c, b) in sorted(rows.items())]
        tot = ("total", "", "", str(len(self.events)), f"{sum(e.nbytes for e in self.events):,}")
        table = [head] + body + [tot]
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        lines += ["  ".join("-" * w for w in widths), fmt(tot)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CommTrace({len(self.events)} events)"


def record(kind: str, nbytes: int, group_size: int, op: object, phase: str) -> None:
    ev = CommEvent(kind, int(nbytes), group_size, func_name(op), phase)
    for t in _ACTIVE:
        t.events.append(ev)


_NAMES: Dict[object, str] = {}


def func_name(func: object) -> str:
    """A readable name for a torch function: 'F.linear', 'torch.matmul', 'Tensor.view'."""
    if func is None:
        return "?"
    if isinstance(func, str):
        return func
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(getattr(func, "__self__", None), "__objclass__", None)
    sub = next((m for m in ("fft", "linalg", "special") if name.startswith(m + "_")
                and getattr(getattr(torch, m), name[len(m) + 1:], None) is func), None)
    if sub is not None:
        out = f"torch.{sub}.{name[len(sub) + 1:]}"
    elif getattr(torch.nn.functional, name, None) is func:
        out = f"F.{name}"
    elif getattr(torch, name, None) is func:
        out = f"torch.{name}"
    elif getattr(torch.Tensor, name, None) is func or (owner is not None and issubclass(owner, torch._C.TensorBase)):
        out = f"Tensor.{name}"
    else:
        out = getattr(func, "__qualname__", name)
    try:
        _NAMES[func] = out
    except TypeError:
        pass
    return out
