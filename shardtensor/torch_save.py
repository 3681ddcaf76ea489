"""`torch.save` that fails while pickling leaves the file (or buffer) as it was.

torch.save opens its destination (creating or truncating the file) before it pickles the object,
and on an error its zip writer still writes an end record: `torch.save(model.state_dict(), p)`
of a parallelized model, which a ShardedTensor refuses to pickle (naming `shardtensor.save`),
destroyed the file at `p` and left a corrupt one there. torch's `_save` pickles the whole object
into memory before its first write (torch 1.6 to 2.13), so `install` makes torch open the writer
at that first write: a pickling error leaves an existing file unchanged, creates none, and
writes nothing into a buffer (`io.BytesIO`). One wrapper of `torch.serialization.
_open_zipfile_writer` (guarded, idempotent); the legacy format
(`_use_new_zipfile_serialization=False`), which writes a header before pickling, is unchanged.
"""
from __future__ import annotations

from torch import serialization as _serialization

__all__ = ["install"]


class _OpenAtFirstWrite:
    """torch's zip writer context, opened when `_save` first touches the writer (its first
    `write_record`, after the object is pickled); a context that never opened writes nothing."""

    def __init__(self, open_writer, name_or_buffer) -> None:
        self._open, self._dest, self._ctx, self._writer = open_writer, name_or_buffer, None, None

    def __enter__(self):
        return self

    def __getattr__(self, name):
        if self._ctx is None:
            ctx = self._open(self._dest)
            self._writer = ctx.__enter__()
            self._ctx = ctx
        return getattr(self._writer, name)

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return None


def install() -> None:
    """Wrap `torch.serialization._open_zipfile_writer` (once; nothing where it is absent)."""
    orig = getattr(_serialization, "_open_zipfile_writer", None)
    if orig is None or getattr(orig, "_shardtensor_deferred", False):
        return

    def _open_zipfile_writer(name_or_buffer, *args, **kwargs):   # any later torch's arguments
        return _OpenAtFirstWrite(lambda dest: orig(dest, *args, **kwargs), name_or_buffer)

    _open_zipfile_writer._shardtensor_deferred = True
    _open_zipfile_writer.__wrapped__ = orig
    _serialization._open_zipfile_writer = _open_zipfile_writer
