"""Test helpers: a persistent pool of rank processes and hypothesis strategies for layouts.

`run(world_size, fn, *args)` runs `fn(rank, *args)` on every rank of a pool of gloo processes
that stays up between calls, so a property test can try hundreds of cases in seconds. `fn` must
be importable (a module-level function) or picklable by cloudpickle.
"""
from __future__ import annotations

import atexit
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
    while True:
        payload = tasks.get()
        if payload is None:
            break
        try:
            fn, args = pickle.loads(payload)
            out = fn(rank, *args)
            results.put((rank, True, dumps(out)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
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
        return all(p.is_alive() for p in self._procs)

    def run(self, fn, *args, timeout: float = 300.0) -> List[Any]:
        """`fn(rank, *args)` on every rank; the results in rank order. A rank's exception is
        raised as RemoteError carrying its traceback."""
        payload = dumps((fn, args))
        for q in self._tasks:
            q.put(payload)
        out: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        wait = timeout
        while len(out) + len(errors) < self.world_size:
            try:
                rank, ok, data = self._results.get(timeout=wait)
            except _queue.Empty:
                self.close()
                errors.setdefault(-1, f"ranks {sorted(set(range(self.world_size)) - set(out) - set(errors))}"
                                      f" did not answer within {wait:.0f}s; pool restarted")
                break
            if ok:
                out[rank] = pickle.loads(data)
            else:
                errors[rank] = data
                wait = 70.0  # the others may be stuck in a collective until gloo's timeout
        if errors:
            # the first to fail is the cause; the others may only have timed out waiting for it
            rank = next(iter(errors))
            others = "".join(f"\n--- rank {r} also failed:\n{e[-600:]}" for r, e in errors.items() if r != rank)
            raise RemoteError(f"rank {rank} of {self.world_size} failed:\n{errors[rank]}{others}")
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
