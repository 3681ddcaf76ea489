"""Test helpers: a persistent pool of rank processes and hypothesis strategies for layouts.

`run(world_size, fn, *args)` runs `fn(rank, *args)` on every rank of a pool of gloo processes
that stays up between calls, so a property test can try hundreds of cases in seconds. `fn` must
be importable (a module-level function) or picklable by cloudpickle. Each task's collectives are
logged per rank; a task whose ranks issued different ones fails (naming the group and both
sequences), and any failed task leaves a fresh pool for the next.
"""
from __future__ import annotations

import atexit
import inspect
import os
import pickle
import queue as _queue
import sys
import traceback
from datetime import timedelta
from typing import Any, Dict, List

import torch
import torch.multiprocessing as mp

from .launch import RemoteError, dumps, free_port

__all__ = ["RankPool", "run", "close_pools", "assert_close"]


# torch.distributed functions whose calls a pool worker logs, so that the parent can check every
# rank issued the same collectives (a rule that communicates on some ranks only would otherwise
# desynchronise the pool and fail every later test with a timeout far from the cause)
_LOGGED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_to_all_single", "broadcast", "barrier", "all_gather_object",
           "broadcast_object_list", "reduce", "gather", "scatter", "all_gather_single",
           "reduce_scatter_single", "send", "recv")
_SAME_SIZE = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
              "all_gather_single", "reduce_scatter_single")


def _log_collectives(log: list) -> None:
    """Make every collective named in _LOGGED append (group ranks, name, size) to `log`; calls
    nested in another (all_gather_object's all_gather) are not logged twice."""
    import torch.distributed as dist
    from . import collectives
    depth = [0]

    def logged(name, f):
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            sig = None

        def call(*args, **kwargs):
            if depth[0] == 0:
                group = kwargs.get("group")
                if group is None and sig is not None and len(args) > 1:   # passed positionally
                    try:
                        group = sig.bind_partial(*args, **kwargs).arguments.get("group")
                    except TypeError:
                        pass
                try:
                    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else None
                except Exception:
                    ranks = "?"
                size = None
                if name in _SAME_SIZE and args and isinstance(args[0], torch.Tensor):
                    size = (tuple(args[0].shape), str(args[0].dtype))
                log.append((ranks, name, size))
            depth[0] += 1
            try:
                return f(*args, **kwargs)
            finally:
                depth[0] -= 1
        call.__wrapped__ = f
        return call

    for name in _LOGGED:
        f = getattr(dist, name, None)
        if f is not None:
            setattr(dist, name, logged(name, f))
    collectives._all_gather_base = (getattr(dist, "all_gather_single", None)
                                    or dist.all_gather_into_tensor)
    collectives._reduce_scatter_base = (getattr(dist, "reduce_scatter_single", None)
                                        or dist.reduce_scatter_tensor)


def _mismatch(logs: Dict[int, list], world_size: int) -> str:
    """'' when, for every group, its members issued the same collectives in the same order;
    otherwise a description of the first group whose members disagree."""
    groups = {g for log in logs.values() for g, _, _ in log}
    for g in sorted(groups, key=repr):
        members = range(world_size) if g is None else g
        seqs = {r: [(n, s) for gg, n, s in logs.get(r, []) if gg == g] for r in members
                if r in logs}
        if len({repr(v) for v in seqs.values()}) > 1:
            lines = "".join(f"\n  rank {r}: {len(v)} calls {v[:12]}{' ...' if len(v) > 12 else ''}"
                            for r, v in seqs.items())
            return f"ranks issued different collectives on group {g or 'WORLD'}:{lines}"
    return ""


def _worker(rank, world_size, port, tasks, results, sys_path, threads):
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    log: list = []
    _log_collectives(log)
    while True:
        payload = tasks.get()
        if payload is None:
            break
        del log[:]
        try:
            fn, args = pickle.loads(payload)
            out = fn(rank, *args)
            results.put((rank, True, dumps(out), list(log)))
        except BaseException:
            results.put((rank, False, traceback.format_exc(), list(log)))
    dist.destroy_process_group()


class RankPool:
    """`world_size` gloo rank processes that run one task after another."""

    def __init__(self, world_size: int, threads: int = 1):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, port, self._tasks[r], self._results,
                                         list(sys.path), threads))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()

    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn, *args, timeout: float = 300.0) -> List[Any]:
        """`fn(rank, *args)` on every rank; the results in rank order. A rank's exception is
        raised as RemoteError carrying its traceback; so is a task whose ranks issued different
        collectives. After either the pool is closed (the next `pool()` starts a fresh one):
        ranks left waiting in a collective would pair it with the next task's."""
        payload = dumps((fn, args))
        for q in self._tasks:
            q.put(payload)
        out: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        logs: Dict[int, list] = {}
        wait = timeout
        while len(out) + len(errors) < self.world_size:
            try:
                rank, ok, data, logs[rank] = self._results.get(timeout=wait)
            except _queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(out) - set(errors))
                errors.setdefault(-1, f"ranks {missing} did not answer within {wait:.0f}s"
                                      + (" (left waiting for the failed rank)" if errors else ""))
                break
            if ok:
                out[rank] = pickle.loads(data)
            else:
                errors[rank] = data
                wait = 10.0  # the others may be stuck in a collective the failed rank never joined
        name = getattr(fn, "__qualname__", repr(fn))
        mismatch = _mismatch(logs, self.world_size) if len(logs) == self.world_size else ""
        if errors or mismatch:
            self.close()
        if errors:
            # the first to fail is the cause; the others may only have timed out waiting for it
            rank = next(iter(errors))
            others = "".join(f"\n--- rank {r} also failed:\n{e[-600:]}" for r, e in errors.items() if r != rank)
            raise RemoteError(f"{name}: rank {rank} of {self.world_size} failed:\n{errors[rank]}{others}"
                              + (f"\n{mismatch}" if mismatch else ""))
        if mismatch:
            raise RemoteError(f"{name}: {mismatch}")
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
        self._procs = []


_POOLS: Dict[int, RankPool] = {}


def pool(world_size: int) -> RankPool:
    p = _POOLS.get(world_size)
    if p is None or not p.alive():
        p = _POOLS[world_size] = RankPool(world_size)
    return p


def run(world_size: int, fn, *args, timeout: float = 300.0) -> List[Any]:
    """Run `fn(rank, *args)` on a persistent pool of `world_size` gloo ranks."""
    return pool(world_size).run(fn, *args, timeout=timeout)


@atexit.register
def close_pools() -> None:
    for p in list(_POOLS.values()):
        p.close()
    _POOLS.clear()


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6, what: str = "") -> None:
    """Relative-error check against a serial reference, with a message naming `what`."""
    from .tensor import ShardedTensor
    if isinstance(actual, ShardedTensor):
        actual = actual.full()
    if isinstance(expected, ShardedTensor):
        expected = expected.full()
    actual = actual.detach().float()
    expected = expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"
