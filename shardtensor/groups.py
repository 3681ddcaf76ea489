"""Process groups: Megatron-LM's rank layout (tensor-parallel ranks consecutive, then data
parallel, then pipeline), as pure arithmetic (`Topology`) and over torch.distributed
(`ProcessGroup`)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["Topology", "ProcessGroup", "init_distributed"]


class Topology:
    """Rank layout of `world_size` ranks as tp x dp x pp (dp inferred). No communication."""

    def __init__(self, world_size: int, tp_degree: int = 1, pp_degree: int = 1,
                 dp_degree: Optional[int] = None):
        for name, v in (("world_size", world_size), ("tp_degree", tp_degree), ("pp_degree", pp_degree)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Topology: {name} must be a positive int, got {v!r}")
        if world_size % (tp_degree * pp_degree):
            raise ValueError(f"Topology: world_size {world_size} is not divisible by "
                             f"tp_degree {tp_degree} x pp_degree {pp_degree}")
        dp = world_size // (tp_degree * pp_degree)
        if dp_degree is not None and dp_degree != dp:
            raise ValueError(f"Topology: tp {tp_degree} x dp {dp_degree} x pp {pp_degree} != "
                             f"world_size {world_size}")
        self.world_size, self.tp_degree, self.pp_degree, self.dp_degree = world_size, tp_degree, pp_degree, dp

    def __repr__(self) -> str:
        return (f"Topology(world_size={self.world_size}, tp_degree={self.tp_degree}, "
                f"dp_degree={self.dp_degree}, pp_degree={self.pp_degree})")

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """(tp index, dp index, pp index) of a global rank."""
        tp, dp = self.tp_degree, self.dp_degree
        return rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def rank(self, tp: int, dp: int, pp: int) -> int:
        return pp * self.tp_degree * self.dp_degree + dp * self.tp_degree + tp

    def tp_groups(self) -> List[List[int]]:
        t = self.tp_degree
        return [list(range(g * t, (g + 1) * t)) for g in range(self.world_size // t)]

    def pp_groups(self) -> List[List[int]]:
        n = self.world_size // self.pp_degree
        return [list(range(i, self.world_size, n)) for i in range(n)]

    def dp_groups(self) -> List[List[int]]:
        t, d = self.tp_degree, self.dp_degree
        return [[p * t * d + k + j * t for j in range(d)]
                for p in range(self.pp_degree) for k in range(t)]

    def model_parallel_groups(self) -> List[List[int]]:
        t, d = self.tp_degree, self.dp_degree
        return [[r for r in range(self.world_size) if (r // t) % d == i] for i in range(d)]

    def embedding_groups(self) -> List[List[int]]:
        return [[g[0], g[-1]] if len(g) > 1 else list(g) for g in self.pp_groups()]

    def _group_of(self, groups: List[List[int]], rank: int) -> List[int]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is outside {self!r}")


# torch.distributed subgroups are created collectively, once per rank list per world.
_SUBGROUPS: Dict[Tuple[int, Tuple[int, ...]], object] = {}


def _subgroups(groups: List[List[int]], rank: int):
    """Create (collectively, in the same order on every rank) the torch groups of `groups` and
    return the one holding `rank`."""
    world = dist.group.WORLD
    mine = None
    for ranks in groups:
        if len(ranks) == dist.get_world_size():
            g = world
        else:
            key = (id(world), tuple(ranks))
            g = _SUBGROUPS.get(key)
            if g is None:
                g = _SUBGROUPS[key] = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


class ProcessGroup:
    """tp x dp x pp groups over the initialised torch.distributed world, Megatron rank layout.

    A ShardedTensor knows its ProcessGroup; its collectives run over `tp_process_group()`."""

    def __init__(self, tp_degree: Optional[int] = None, dp_degree: Optional[int] = None,
                 pp_degree: int = 1):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroup needs an initialised torch.distributed world: call "
                               "shardtensor.init_distributed() (or run under shardtensor.launch)")
        world = dist.get_world_size()
        if tp_degree is None:
            tp_degree = world // (pp_degree * (dp_degree or 1))
        self._topo = Topology(world, tp_degree, pp_degree, dp_degree)
        self._rank = dist.get_rank()
        t = self._topo
        self._tp_ranks = t._group_of(t.tp_groups(), self._rank)
        self._dp_ranks = t._group_of(t.dp_groups(), self._rank)
        self._pp_ranks = t._group_of(t.pp_groups(), self._rank)
        self._tp_group = _subgroups(t.tp_groups(), self._rank)
        self._dp_group = _subgroups(t.dp_groups(), self._rank)
        self._tp_rank = self._tp_ranks.index(self._rank)
        self._tp_size = len(self._tp_ranks)
        self._key = (tuple(self._tp_ranks), tuple(self._dp_ranks), tuple(self._pp_ranks))

    # the contract's queries
    def tp_world_size(self) -> int:
        return self._tp_size

    def tp_local_rank(self) -> int:
        return self._tp_rank

    def tp_rank_list(self) -> List[int]:
        return list(self._tp_ranks)

    def dp_world_size(self) -> int:
        return len(self._dp_ranks)

    def dp_local_rank(self) -> int:
        return self._dp_ranks.index(self._rank)

    def dp_rank_list(self) -> List[int]:
        return list(self._dp_ranks)

    def pp_rank_list(self) -> List[int]:
        return list(self._pp_ranks)

    def tp_process_group(self):
        return self._tp_group

    def dp_process_group(self):
        return self._dp_group

    def rank(self) -> int:
        return self._rank

    def world_size(self) -> int:
        return self._topo.world_size

    @property
    def topology(self) -> Topology:
        return self._topo

    def __eq__(self, other) -> bool:
        return isinstance(other, ProcessGroup) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        t = self._topo
        return (f"ProcessGroup(tp_degree={t.tp_degree}, dp_degree={t.dp_degree}, "
                f"pp_degree={t.pp_degree}, rank={self._rank}, tp_ranks={self._tp_ranks})")


def init_distributed(backend: Optional[str] = None, tp_degree: Optional[int] = None) -> ProcessGroup:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) unless already initialised, and return a ProcessGroup with tp = world size (or
    `tp_degree`, the rest data parallel). Backend: nccl when CUDA is available with a GPU for
    every process of this node (LOCAL_WORLD_SIZE), else gloo."""
    if not dist.is_initialized():
        env = os.environ
        if backend is None:
            local = int(env.get("LOCAL_WORLD_SIZE", "1"))
            backend = "nccl" if torch.cuda.is_available() and \
                torch.cuda.device_count() >= local else "gloo"
        if "RANK" not in env or "WORLD_SIZE" not in env:
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", "29500")
            env.setdefault("RANK", "0")
            env.setdefault("WORLD_SIZE", "1")
        if backend == "nccl" and "LOCAL_RANK" in env:
            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        dist.init_process_group(backend)
    world = dist.get_world_size()
    return ProcessGroup(tp_degree=tp_degree or world, dp_degree=world // (tp_degree or world))
