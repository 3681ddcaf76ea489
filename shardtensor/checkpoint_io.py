"""The checkpoint format's lower layer: agreeing on errors over the world, layouts as blocks of
global index ranges, safetensors files written whole and read by byte ranges (a plain parser
over `os.preadv`: no pickle, no mmap, so a rank's memory holds only what it reads), checksums
and durable writes."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .collectives import gather_output
from .spec import shard_ranges

__all__ = ["CheckpointError", "agree", "blocks", "SafetensorsFile", "sha256_file"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded as asked (raised on every rank alike)."""


# --- the world: rank, size, and agreeing on an error -------------------------------------------

def world_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device():
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def gather_bytes(data: bytes, size: int) -> List[bytes]:
    """Every rank's `data` (at most `size` bytes), on every rank. No pickle."""
    buf = torch.zeros(size + 4, dtype=torch.uint8)
    data = data[:size]
    buf[:4] = torch.tensor(list(struct.pack("<I", len(data))), dtype=torch.uint8)
    if data:
        buf[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_device())
    out = [gather_output(buf.shape, buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    res = []
    for t in out:
        raw = bytes(t.cpu().tolist())
        (n,) = struct.unpack("<I", raw[:4])
        res.append(raw[4:4 + n])
    return res


def agree(error: Optional[str]) -> None:
    """Collective: raise CheckpointError on every rank if any rank has an `error` message."""
    rank, world = world_info()
    if world == 1:
        if error:
            raise CheckpointError(error)
        return
    msgs = gather_bytes((error or "").encode()[:4000], 4000)
    bad = [(r, m.decode(errors="replace")) for r, m in enumerate(msgs) if m]
    if bad:
        r, msg = bad[0]
        also = f" (ranks {[b[0] for b in bad]} failed)" if len(bad) > 1 else ""
        raise CheckpointError(f"{msg} [rank {r}{also}]")


def checked(fn, *args):
    """Run fn(*args) and agree on its failure over the world; returns its result."""
    err, out = None, None
    try:
        out = fn(*args)
    except Exception as e:  # every rank must hear of it, or the others wait forever
        err = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    agree(err)
    return out


# --- layouts as blocks of global index ranges ---------------------------------------------------

def spec_to_json(spec) -> dict:
    if spec.is_shard:
        return {"type": "shard", "dim": spec.dim, "degree": spec.degree, "stride": spec.stride}
    return {"type": "replicate"}


def blocks(shape: Sequence[int], spec, rank: int) -> List[Tuple[Optional[int], int, int, int]]:
    """This rank's piece as (dim, global start, length, local start) blocks; dim None = all."""
    if not spec.is_shard:
        return [(None, 0, 0, 0)]
    out, lo = [], 0
    for start, n in shard_ranges(shape[spec.dim], spec.degree, spec.stride, rank):
        out.append((spec.dim, start, n, lo))
        lo += n
    return out


def overlap(shape, tgt, src):
    """Boxes (per dim: target local start, source local start, length) where blocks meet."""
    box = []
    for d, n in enumerate(shape):
        lo, hi, t0, s0 = 0, n, 0, 0
        if tgt[0] == d:
            lo, hi = max(lo, tgt[1]), min(hi, tgt[1] + tgt[2])
        if src[0] == d:
            lo, hi = max(lo, src[1]), min(hi, src[1] + src[2])
        if hi <= lo:
            return None
        t0 = lo - tgt[1] + tgt[3] if tgt[0] == d else lo
        s0 = lo - src[1] + src[3] if src[0] == d else lo
        box.append((t0, s0, hi - lo))
    return box


# --- safetensors files: write whole, read byte ranges -------------------------------------------

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class SafetensorsFile:
    """A safetensors file's header, and reads of boxes of its tensors with positioned reads."""

    def __init__(self, path: str):
        self.path, self.bytes_read, self.fd = path, 0, None
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        size = os.fstat(self.fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(os.pread(self.fd, n, 8))
            self.base = 8 + n
            self.entries = {}
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                b, end = e["data_offsets"]
                dt, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
                if end - b != math.prod(shape) * dt.itemsize or self.base + end > size:
                    raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
                self.entries[key] = (dt, shape, self.base + b)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            self.close()
            raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {e}") from None

    def read(self, key: str, box: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """The sub-tensor [start:start+len per dim] of tensor `key`, reading only its bytes."""
        dt, shape, base = self.entries[key]
        es = dt.itemsize
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        out = torch.empty([n for _, n in box], dtype=dt)
        if out.numel() == 0:
            return out
        raw = out.view(-1).view(torch.uint8).numpy()
        # the run: the last dims the box covers fully, plus the first partial dim before them
        j = len(shape) - 1
        while j >= 0 and box[j][0] == 0 and box[j][1] == shape[j]:
            j -= 1
        if j < 0:
            self._pread(raw, base)
            return out
        run = box[j][1] * strides[j] * es
        first = base + sum(s * st for (s, _), st in zip(box, strides)) * es
        last = base + sum((s + n - 1) * st for (s, n), st in zip(box, strides)) * es
        span = last + es - first
        if span <= 2 * raw.nbytes:  # dense enough: one read, then a strided view
            flat = torch.empty(span // es, dtype=dt)
            self._pread(flat.view(torch.uint8).numpy(), first)
            out.copy_(flat.as_strided(out.shape, strides))
            return out
        pos = 0
        for idx in itertools.product(*[range(s, s + n) for s, n in box[:j]]):
            off = base + (sum(i * st for i, st in zip(idx, strides)) + box[j][0] * strides[j]) * es
            self._pread(raw[pos:pos + run], off)
            pos += run
        return out

    def _pread(self, buf, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        self.bytes_read += len(mv)
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"checkpoint file {self.path} ended early (truncated?)")
            done += n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_durable(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
