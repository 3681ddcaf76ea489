"""The dispatch table: one registry from torch functions to sharding rules.

A rule is `fn(func, args, kwargs)`: it reads the input layouts, decides the output layout and
the collectives, runs plain torch on local shards and returns wrapped results. Rules live in
`shardtensor/ops/<family>.py` and register themselves with `@rule(...)`.
"""
from __future__ import annotations

from typing import Callable, Dict

__all__ = ["rule", "RULES", "UnsupportedOpError", "ShardingError", "config", "has_rule",
           "UnsupportedOpInParametrizationError"]

RULES: Dict[object, Callable] = {}


def rule(*funcs) -> Callable:
    """Register the decorated function as the sharding rule of every torch function in `funcs`.

    >>> @rule(torch.fft.fft)
    ... def fft_rule(func, args, kwargs): ...
    """
    def deco(fn: Callable) -> Callable:
        for f in funcs:
            if f in RULES and RULES[f] is not fn:
                raise ValueError(f"{f!r} already has the rule {RULES[f].__qualname__}; "
                                 f"unregister it first (del shardtensor.dispatch.RULES[f])")
            RULES[f] = fn
        return fn
    return deco


def has_rule(func) -> bool:
    return func in RULES


class UnsupportedOpError(NotImplementedError):
    """A torch function met a ShardedTensor and no sharding rule exists for it."""

    # whether `config.fallback = "gather"` may answer it with the gathered global value (not
    # for a question about this tensor's own memory: a temporary's would be a wrong answer)
    gather = True


class ShardingError(ValueError):
    """Inputs whose layouts, process groups or shapes cannot be combined as asked."""


class UnsupportedOpInParametrizationError(RuntimeError):
    """An UnsupportedOpError raised inside `torch.nn.utils.parametrize`'s registration, which
    takes any NotImplementedError from a parametrization's `right_inverse` to mean "the
    identity" and would silently register the wrong tensor: raised instead, as a RuntimeError."""


def _swallowed_by_torch(e: UnsupportedOpError):
    """`e` re-raised as an error torch's parametrize cannot mistake for "no right_inverse"
    when it would reach one of its `except NotImplementedError`; None otherwise (the frames are
    walked only on this error path)."""
    import sys
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_filename.endswith("parametrize.py") and "torch" in code.co_filename and \
                code.co_name in ("__init__", "register_parametrization"):
            err = UnsupportedOpInParametrizationError(
                f"{e} (raised inside torch.nn.utils.parametrize.register_parametrization, in the "
                f"parametrization's right_inverse or forward: torch takes a NotImplementedError "
                f"from right_inverse to mean 'identity' and would silently register the wrong "
                f"tensor, so it is raised as a RuntimeError)")
            return err
        f = f.f_back
    return None


class _Config:
    """Library-wide settings.

    fallback: None (default) raises UnsupportedOpError for an op with no rule; "gather" gathers
        the inputs, runs the op serially and warns once per op.
    dropout: "independent" (default): sharded regions draw per-rank streams, replicated regions
        the same mask on every rank; "serial": masks equal the serial model's for the same seed.
    """

    __slots__ = ("fallback", "dropout")

    def __init__(self):
        self.fallback = None
        self.dropout = "independent"

    def __setattr__(self, name, value):
        if name == "fallback" and value not in (None, "gather"):
            raise ValueError(f"shardtensor.config.fallback must be None or 'gather', got {value!r}")
        if name == "dropout" and value not in ("independent", "serial"):
            raise ValueError(f"shardtensor.config.dropout must be 'independent' or 'serial', got {value!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"shardtensor.config(fallback={self.fallback!r}, dropout={self.dropout!r})"


config = _Config()
