"""Layouts: how a global tensor is laid out over the ranks of a tensor-parallel group.

Pure arithmetic and local tensor slicing; nothing here communicates.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ShardSpec", "ReplicaSpec", "PartialSpec", "Spec",
    "ComputePattern", "ComputeSpec",
    "part_sizes", "shard_ranges", "local_size",
]


@dataclass(frozen=True)
class ShardSpec:
    """Split `dim` into `degree` parts; with `stride` s the dim is s equal blocks, each split in
    `degree` parts (like `torch.tensor_split`: the first ranks get one more), and rank r holds
    part r of every block. A fused q|k|v weight is `stride=3` (Megatron's `stride`)."""

    dim: int
    degree: int
    stride: int = 1

    def __post_init__(self):
        for name in ("dim", "degree", "stride"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"ShardSpec.{name} must be an int, got {getattr(self, name)!r}")
        if self.degree < 1:
            raise ValueError(f"ShardSpec degree must be >= 1, got {self.degree}")
        if self.stride < 1:
            raise ValueError(f"ShardSpec stride must be >= 1, got {self.stride}")
        object.__setattr__(self, "_hash", hash((self.dim, self.degree, self.stride)))

    def __repr__(self) -> str:
        s = f", stride={self.stride}" if self.stride != 1 else ""
        return f"ShardSpec(dim={self.dim}, degree={self.degree}{s})"

    def normalize(self, shape: Sequence[int]) -> "ShardSpec":
        """This spec with a non-negative dim, checked against `shape` (ValueError otherwise)."""
        ndim = len(shape)
        if not -ndim <= self.dim < ndim:
            raise ValueError(f"{self!r}: dim {self.dim} is out of range for a tensor of shape "
                             f"{tuple(shape)} ({ndim} dims)")
        n = shape[self.dim]
        if n % self.stride:
            raise ValueError(f"{self!r}: dim {self.dim} of shape {tuple(shape)} has size {n}, "
                             f"which is not a multiple of stride {self.stride}")
        if self.dim >= 0:
            return self
        return ShardSpec(self.dim + ndim, self.degree, self.stride)

    def __eq__(self, other):
        if self is other:
            return True
        if other.__class__ is not ShardSpec:
            return NotImplemented
        return (self.dim == other.dim and self.degree == other.degree
                and self.stride == other.stride)

    def __hash__(self) -> int:
        return self._hash

    is_shard = True
    is_replicate = False
    is_partial = False


_SHARD_SPECS: dict = {}


def shard_spec(dim: int, degree: int, stride: int = 1) -> ShardSpec:
    """ShardSpec(dim, degree, stride) for ints already known valid (rules deriving an output
    layout): interned, so the hot path neither validates nor allocates, and equal specs are
    usually the same object (`==` answers on identity)."""
    key = (dim, degree, stride)
    s = _SHARD_SPECS.get(key)
    if s is None:
        if len(_SHARD_SPECS) > 4096:
            _SHARD_SPECS.clear()
        s = _SHARD_SPECS[key] = ShardSpec(dim, degree, stride)
    return s


@dataclass(frozen=True)
class ReplicaSpec:
    """Every rank holds the whole tensor."""

    def __repr__(self) -> str:
        return "ReplicaSpec()"

    def normalize(self, shape: Sequence[int]) -> "ReplicaSpec":
        return self

    def __eq__(self, other):
        return self is other or other.__class__ is ReplicaSpec

    def __hash__(self) -> int:
        return hash(ReplicaSpec)

    is_shard = False
    is_replicate = True
    is_partial = False


@dataclass(frozen=True)
class PartialSpec:
    """Every rank holds a summand; the value is their sum (a pending all-reduce)."""

    def __repr__(self) -> str:
        return "PartialSpec()"

    def normalize(self, shape: Sequence[int]) -> "PartialSpec":
        return self

    def __eq__(self, other):
        return self is other or other.__class__ is PartialSpec

    def __hash__(self) -> int:
        return hash(PartialSpec)

    is_shard = False
    is_replicate = False
    is_partial = True


Spec = Union[ShardSpec, ReplicaSpec, PartialSpec]
REPLICA = ReplicaSpec()


def grad_spec(spec: Spec) -> Spec:
    """The layout of the gradient of a value laid out by `spec`: the same, but replicated for a
    partial value (each summand's gradient is the gradient of the whole sum)."""
    return REPLICA if spec.is_partial else spec
PARTIAL = PartialSpec()


class ComputePattern(enum.Enum):
    """How a parameter takes part in computation. TP1D: Megatron-style 1D tensor parallelism."""

    TP1D = "TP1D"


@dataclass(frozen=True)
class ComputeSpec:
    """A parameter's compute pattern; `output_replicate=True` asks a column-parallel layer to
    all-gather its output instead of leaving it sharded."""

    pattern: ComputePattern = ComputePattern.TP1D
    output_replicate: bool = False

    def __repr__(self) -> str:
        return f"ComputeSpec({self.pattern}, output_replicate={self.output_replicate})"


# --- layout arithmetic -------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def part_sizes(n: int, degree: int) -> Tuple[int, ...]:
    """Sizes of the `degree` parts of a length-n dim, `torch.tensor_split` style."""
    q, r = divmod(n, degree)
    return tuple(q + (1 if i < r else 0) for i in range(degree))


@lru_cache(maxsize=4096)
def shard_ranges(n: int, degree: int, stride: int, rank: int) -> Tuple[Tuple[int, int], ...]:
    """The (start, length) ranges of global indices that `rank` holds, in local order."""
    block = n // stride
    sizes = part_sizes(block, degree)
    off = sum(sizes[:rank])
    return tuple((b * block + off, sizes[rank]) for b in range(stride))


@lru_cache(maxsize=4096)
def local_size(n: int, degree: int, stride: int, rank: int) -> int:
    return stride * part_sizes(n // stride, degree)[rank]


def local_shape(shape: Sequence[int], spec: Spec, rank: int) -> Tuple[int, ...]:
    if not spec.is_shard:
        return tuple(shape)
    out = list(shape)
    out[spec.dim] = local_size(shape[spec.dim], spec.degree, spec.stride, rank)
    return tuple(out)


def take_shard(full: torch.Tensor, spec: ShardSpec, rank: int) -> torch.Tensor:
    """This rank's piece of `full` (a view when the piece is contiguous in the dim)."""
    ranges = shard_ranges(full.shape[spec.dim], spec.degree, spec.stride, rank)
    if len(ranges) == 1:
        start, length = ranges[0]
        return full.narrow(spec.dim, start, length)
    return torch.cat([full.narrow(spec.dim, s, l) for s, l in ranges], dim=spec.dim)


def assemble(pieces: Sequence[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of `take_shard`: the global tensor from every rank's piece, in rank order."""
    if spec.stride == 1:
        return torch.cat(list(pieces), dim=spec.dim)
    blocks = []
    for p in pieces:
        blocks.append(torch.tensor_split(p, spec.stride, dim=spec.dim))
    # piece r holds `stride` equal sub-blocks; global = block 0 of every rank, block 1 ..., ...
    return torch.cat([blocks[r][b] for b in range(spec.stride) for r in range(len(pieces))],
                     dim=spec.dim)


def describe(spec: Optional[Spec]) -> str:
    return "plain" if spec is None else repr(spec)
