"""Image tensors larger than memory: memory-mapped ``.npy`` files.

A folder of tens of thousands of 224 px images does not fit in memory as float32 tensors
(ViT-S/16: 0.6 MB per image). Such images live in ``.npy`` files that are memory-mapped, so
only the pages a block forward reads are resident; sets derived from them (a held-out part
joined to the fit part, a subset, halves) are written to an unlinked temporary file in the
cache folder when they are large, so they stay on disk too and vanish with the process.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["IN_MEMORY_BYTES", "cache_root", "empty", "gather", "open_npy"]

#: A derived image set larger than this is written to a temporary file rather than copied
#: into memory.
IN_MEMORY_BYTES = 1 << 30
_ROWS = 256  # images copied at a time


def cache_root() -> Path:
    """Where streamed datasets and large temporary image sets go: ``$ORDERSEARCH_CACHE``, else
    ``$XDG_CACHE_HOME/ordersearch``, else ``~/.cache/ordersearch``."""
    if os.environ.get("ORDERSEARCH_CACHE"):
        return Path(os.environ["ORDERSEARCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ordersearch"


def open_npy(path: str | Path) -> torch.Tensor:
    """A ``.npy`` file of float32 images (N, ...) as a tensor over its memory map
    (copy-on-write: writable, never written back)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        array = np.load(path, mmap_mode="c")
    except ValueError as exc:
        raise DataError(f"{path} is not a .npy array file ({exc})") from None
    if array.dtype != np.float32 or array.ndim < 2:
        raise DataError(f"{path}: expected float32 images (N, C, H, W), got {array.dtype} {array.shape}")
    return torch.from_numpy(array)


def empty(shape: Sequence[int], dtype: torch.dtype, in_memory_bytes: int | None = None) -> torch.Tensor:
    """An uninitialised CPU tensor: in memory when it takes at most ``in_memory_bytes``
    (default :data:`IN_MEMORY_BYTES`), else
    over a memory-mapped temporary file in the cache folder (unlinked at once: it is freed when
    the last view of it goes, and only the pages being read or written are resident)."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= (IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes):
        return torch.empty(shape, dtype=dtype)
    folder = cache_root() / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as f:  # the map keeps the unlinked file alive
        f.truncate(nbytes)
        return torch.from_numpy(np.memmap(f, dtype=np.dtype(str(dtype).removeprefix("torch.")), mode="r+", shape=shape))


def gather(pieces: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """The rows ``idx`` of each ``(x, idx)`` piece (every row for None), concatenated: in memory
    when they take at most :data:`IN_MEMORY_BYTES`, else in a memory-mapped temporary file
    (:func:`empty`), copied a few images at a time so that memory never holds the whole set."""
    rows = [(x, torch.arange(len(x)) if idx is None else torch.as_tensor(idx).long()) for x, idx in pieces]
    first = rows[0][0]
    out = empty((sum(len(idx) for _, idx in rows), *first.shape[1:]), first.dtype)
    at = 0
    for x, idx in rows:  # a few images at a time: no whole-set temporary
        for a in range(0, len(idx), _ROWS):
            part = idx[a : a + _ROWS]
            out[at : at + len(part)] = x[part]
            at += len(part)
    return out
