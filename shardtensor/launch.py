"""Run a function on N local ranks without torchrun: from a script, pytest or a notebook."""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp

__all__ = ["launch", "RemoteError"]


class RemoteError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dumps(obj) -> bytes:
    """Pickle by reference where possible; by value (cloudpickle) for notebook/`__main__` code."""
    try:
        import cloudpickle
        return cloudpickle.dumps(obj)
    except ImportError:
        return pickle.dumps(obj)


def init_rank(rank: int, world_size: int, backend: str, port: int, threads: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    import torch.distributed as dist
    if backend == "nccl":
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def _entry(rank, world_size, backend, port, payload, queue, sys_path):
    import sys
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    try:
        fn, args = pickle.loads(payload)
        init_rank(rank, world_size, backend, port, threads=max(1, (os.cpu_count() or 1) // world_size))
        result = fn(rank, *args)
        queue.put((rank, True, dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int = 2, backend: str = "gloo", args: Sequence = (),
           timeout: float = 600.0) -> List[Any]:
    """Run `fn(rank, *args)` on `world_size` fresh processes with torch.distributed initialised
    (`backend`), and return the ranks' results in rank order. A rank's exception is raised here
    as RemoteError with its traceback."""
    import sys
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    payload = dumps((fn, tuple(args)))
    procs = [ctx.Process(target=_entry, args=(r, world_size, backend, port, payload, queue,
                                              list(sys.path)), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, ok, data = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(data)
            else:
                errors[rank] = data
                break
    except Exception as e:  # queue.Empty: a rank hung or died
        errors.setdefault(-1, f"no answer from every rank within {timeout}s ({e!r})")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
    if errors:
        rank = min(errors)
        raise RemoteError(f"rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
