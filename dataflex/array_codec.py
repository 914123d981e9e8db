"""Lossless compact forms of the per-example arrays a checkpoint holds, so a 10M-example state writes fast.

A selection run checkpoints, per example, a score, the step it was taken at, and its selected subsets as
sorted id lists; stored as they are in memory (float64 / int64) that is 28 bytes per example and most of
the write time. Each array is stored in the smallest of these forms that gives it back bit for bit:

* ``id_set``: a strictly increasing array of non-negative integers (a selected subset) as a bitmask over
  ``0 .. max`` — one bit per pool example instead of 64 per selected one, used when that is smaller;
* ``narrowed``: integers in the smallest signed type that holds their range (steps, counts);
* ``raw``: anything else, as it is. (Float64 scores that float32 would hold exactly are not narrowed: the
  check costs more time than writing the other half does.)

:func:`decode` returns the original dtype and shape; ``tests/test_array_codec.py`` round-trips every form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["decode", "encode"]

_NARROW_INTS = (np.int8, np.int16, np.int32)
_CHUNK = 1 << 20


def _as_id_set(a: np.ndarray) -> dict[str, Any] | None:
    if a.ndim != 1 or a.size < 2 or a.dtype.kind not in "iu" or a[0] < 0:
        return None
    bound = int(a[-1]) + 1
    # Strictly increasing from >= 0 needs a[-1] >= size - 1: that rejects most other arrays (steps,
    # counts) without reading them. The order is checked in chunks, to keep the temporary small.
    if bound < a.size or bound // 8 + 1 >= a.nbytes // 2:  # not a set, or not worth it
        return None
    for i in range(0, a.size - 1, _CHUNK):
        j = min(i + _CHUNK, a.size - 1)
        if not (a[i + 1 : j + 1] > a[i:j]).all():
            return None
    mask = np.zeros(bound, dtype=bool)
    mask[a] = True
    return {"form": "id_set", "dtype": a.dtype.str, "bound": bound, "data": torch.from_numpy(np.packbits(mask))}


def _narrowed(a: np.ndarray) -> dict[str, Any] | None:
    if a.size == 0 or a.dtype.kind not in "iu":
        return None
    lo, hi = int(a.min()), int(a.max())
    for small in _NARROW_INTS:
        info = np.iinfo(small)
        if np.dtype(small).itemsize < a.dtype.itemsize and info.min <= lo and hi <= info.max:
            return {"form": "narrowed", "dtype": a.dtype.str, "data": torch.from_numpy(a.astype(small))}
    return None


def encode(a: np.ndarray) -> dict[str, Any]:
    """``a`` in the smallest lossless form above (a dict of plain values and one tensor)."""
    a = np.ascontiguousarray(a)
    return _as_id_set(a) or _narrowed(a) or {"form": "raw", "data": torch.from_numpy(a)}


def decode(stored: Any) -> np.ndarray:
    """The array :func:`encode` was given (a bare tensor, as older checkpoints hold, is returned as is)."""
    if isinstance(stored, torch.Tensor):
        return stored.numpy()
    form, data = stored.get("form"), stored.get("data")
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"a stored array has no tensor data (form {form!r}); the binary state is damaged")
    if form == "raw":
        return data.numpy()
    if form == "narrowed":
        return data.numpy().astype(np.dtype(stored["dtype"]))
    if form == "id_set":
        bound = int(stored["bound"])
        if data.numel() * 8 < bound:
            raise ValueError(f"a stored id set over {bound} ids holds only {data.numel()} bytes; it is damaged")
        return np.flatnonzero(np.unpackbits(data.numpy(), count=bound)).astype(np.dtype(stored["dtype"]))
    raise ValueError(f"a stored array has form {form!r}; known forms are 'raw', 'narrowed', 'id_set'")
