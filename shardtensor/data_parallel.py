"""Data parallelism across tensor-parallel replicas: average every gradient over its
data-parallel group, bucketed and overlapped with the backward pass.

Why not `torch.nn.parallel.DistributedDataParallel`: DDP's reducer hooks each parameter's
AccumulateGrad node and broadcasts parameter storage; a ShardedTensor parameter is a wrapper
whose autograd leaf and storage are its local shard, so DDP would wait forever for hooks that
never fire. `data_parallel` hooks the shards themselves, the same way DDP hooks plain tensors.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from . import trace as _trace
from .groups import ProcessGroup
from .tensor import ShardedTensor

__all__ = ["data_parallel", "GradSync"]


class GradSync:
    """Handle returned by `data_parallel`: `no_sync()` skips synchronisation (gradient
    accumulation), `remove()` unhooks."""

    def __init__(self, model: nn.Module, pg: ProcessGroup, bucket_mb: float = 25.0,
                 broadcast: bool = True):
        self.pg = pg
        self.group = pg.dp_process_group()
        self.size = pg.dp_world_size()
        self.enabled = True
        self._handles = []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.leaves = [p._local if isinstance(p, ShardedTensor) else p for _, p in named]
        # tables with sparse gradients (nn.Embedding / EmbeddingBag(sparse=True)), known up
        # front so that every replica sends the same payload whether or not it used them
        tables = {id(m.weight) for m in model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
        self.sparse = {i for i, (_, p) in enumerate(named) if id(p) in tables}
        if self.size == 1:
            return
        if broadcast:  # replicas start identical: dp rank 0's shards win
            with torch.no_grad():
                for t in self.leaves:
                    dist.broadcast(t, src=pg.dp_rank_list()[0], group=self.group)
        # buckets in reverse registration order (≈ the order gradients become ready)
        limit = bucket_mb * 2 ** 20
        self.buckets: List[List[int]] = [[]]
        size = 0
        for i in reversed(range(len(self.leaves))):
            t = self.leaves[i]
            if size and (size + t.numel() * t.element_size() > limit or
                         t.dtype != self.leaves[self.buckets[-1][0]].dtype):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += t.numel() * t.element_size()
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        for i, t in enumerate(self.leaves):
            self._handles.append(t.register_post_accumulate_grad_hook(self._hook(i)))
        self._reset()

    def _reset(self):
        self.pending = [len(b) for b in self.buckets]
        self.next_bucket = 0
        self.works = []
        self.queued = False

    def _hook(self, i: int):
        def hook(_):
            if not self.enabled:
                return
            if not self.queued:
                self.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            b = self.bucket_of[i]
            self.pending[b] -= 1
            while self.next_bucket < len(self.buckets) and self.pending[self.next_bucket] == 0:
                self._launch(self.next_bucket)
                self.next_bucket += 1
        return hook

    def _launch(self, b: int):
        parts, rows, used = [], [], []
        for i in self.buckets[b]:
            t = self.leaves[i]
            g = t.grad
            used.append(g is not None)
            if i in self.sparse:   # sent dense, with one flag per row: the rows this replica used
                r = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
                if g is None:
                    g = torch.zeros_like(t)
                elif g.layout == torch.sparse_coo:
                    r[g._indices()[0]] = 1
                    g = g.to_dense()
                else:
                    r.fill_(1)
                rows.append(r)
            elif g is None:   # unused in this step (or frozen): contributes zeros
                g = t.grad = torch.zeros_like(t)
            elif g.layout != torch.strided:
                raise RuntimeError(f"data_parallel: parameter {self.names[i]!r} has a {g.layout} "
                                   f"gradient; only nn.Embedding / nn.EmbeddingBag(sparse=True) "
                                   f"weights may have sparse gradients")
            parts.append(g)
        # one flag per parameter, summed with the gradients: how many replicas had a gradient.
        # A parameter no replica used gets grad None back, as serially and in DDP, so that the
        # optimizer skips it rather than stepping on zeros (weight decay, momentum would move it)
        flags = torch.tensor(used, dtype=parts[0].dtype, device=parts[0].device)
        flat = torch.cat([g.reshape(-1) for g in parts] + rows + [flags])
        if _trace._ACTIVE:
            _trace.record("all_reduce", flat.numel() * flat.element_size(), self.size,
                          "data_parallel", "backward")
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.works.append((work, flat, parts, b, used))

    def _finish(self):
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
            self.next_bucket += 1
        for work, flat, parts, b, used in self.works:
            work.wait()
            flat.div_(self.size)
            off, tables = 0, []
            for i, g in zip(self.buckets[b], parts):
                avg = flat[off: off + g.numel()].view_as(g)
                off += g.numel()
                if i in self.sparse:
                    tables.append((i, avg))
                else:
                    g.copy_(avg)
            counts = flat[-len(parts):]
            # (only a parameter this replica did not use can be unused by all)
            if tables or not all(used):
                counts = counts.tolist()
            for k, i in enumerate(self.buckets[b]):
                if not used[k] and counts[k] == 0:
                    self.leaves[i].grad = None
            for i, avg in tables:   # a sparse gradient listing the rows any replica used
                r = flat[off: off + avg.shape[0]]
                off += avg.shape[0]
                if counts[self.buckets[b].index(i)] == 0:
                    continue
                idx = r.nonzero().view(1, -1)
                self.leaves[i].grad = torch.sparse_coo_tensor(idx, avg[idx[0]], avg.shape).coalesce()
        self._reset()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no communication) inside this block."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def data_parallel(model: nn.Module, pg: ProcessGroup, bucket_mb: float = 25.0,
                  broadcast: bool = True) -> GradSync:
    """Average `model`'s gradients over `pg`'s data-parallel group after every backward pass
    (bucketed all-reduces launched as gradients become ready, overlapping the rest of the
    backward). With `broadcast`, data-parallel rank 0's parameters are copied to the other
    replicas first. Call after `parallelize`; returns a handle with `no_sync()`."""
    return GradSync(model, pg, bucket_mb, broadcast)
