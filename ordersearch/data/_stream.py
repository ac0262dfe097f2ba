"""Image folders too large for memory, streamed to disk once.

A folder's kept images are decoded a chunk at a time, preprocessed exactly as in memory, and
written to one ``.npy`` file per split in the cache folder (``$ORDERSEARCH_CACHE``, else
``~/.cache/ordersearch``), which the splits then memory-map: memory holds one chunk, not the
dataset. The files are keyed by everything that decides their contents (the canonical spec and
seed, the bank's data config, each file's path, size and modification time), so a second run
reuses them; a run killed while writing resumes from its last chunk, and workers that load the
same folder at once take turns (a file lock) rather than write over each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .._images import cache_root, open_npy
from .._io import write_atomic
from ..errors import DataError
from ._files import Source

__all__ = ["STREAM_BYTES", "stream_splits"]

log = logging.getLogger("ordersearch")

#: A folder whose kept images take more than this as float32 tensors is streamed to disk.
STREAM_BYTES = 2 * 2**30
_CHUNK = 64  # images decoded and written at a time (the workspace: ~5 chunks of floats)
_VERSION = 1  # of the files' layout and preprocessing: a change makes new files

Progress = Callable[[str, int, int], None]


def stream_splits(
    src: Source,
    parts: Mapping[str, torch.Tensor],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    key: Mapping[str, Any],
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Each split's images ``prepare(src.read(idx))``, in memory-mapped ``.npy`` files (made
    now, resumed, or found from an earlier run).

    Args:
        src: A folder source (its images are decoded by ``src.read``).
        parts: Per split, the source positions of its images.
        prepare: Shifts and normalisation of a chunk of decoded images.
        key: What else decides the files' contents (spec, seed, data config).
        progress: Called with ``("streaming images", done, total)`` after each chunk.
    """
    assert src.read is not None
    if not any(len(idx) for idx in parts.values()):
        raise DataError("no images to stream")
    folder = cache_root() / "images" / _digest(src, parts, key)
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(len(idx) for idx in parts.values())
    with _locked(folder / ".lock"):
        state_path = folder / "progress.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if not state.get("complete"):
            write_atomic(folder / "key.json", json.dumps(dict(key), indent=1, default=str))
            _write(src, parts, prepare, folder, state, state_path, total, progress)
        shape = tuple(state["shape"])
        out = {name: open_npy(folder / f"{name}.npy") if len(idx) else torch.zeros((0, *shape))
               for name, idx in parts.items()}
    log.info("%d images streamed to %s", total, folder)
    return out


def _write(src: Source, parts: Mapping[str, torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor],
           folder: Path, state: dict[str, Any], state_path: Path, total: int, progress: Progress | None) -> None:
    """Write every split's file from where ``state`` says the last run stopped."""
    assert src.read is not None
    first = next(idx for idx in parts.values() if len(idx))
    shape = tuple(prepare(src.read(first[:1])).shape[1:])
    state["shape"] = list(shape)
    done_all = sum(min(int(state.get(n, 0)), len(idx)) for n, idx in parts.items())
    if done_all:
        log.info("resuming a streamed dataset in %s at %d of %d images", folder, done_all, total)
    else:  # gigabytes in the user's cache folder: say where
        log.warning("streaming %d images (%.1f GiB) to %s, reused by later runs: delete the folder to free the space",
                    total, total * 4 * int(np.prod(shape)) / 2**30, folder)
    for name, idx in parts.items():
        if len(idx) == 0:
            continue
        out, done = _open(folder / f"{name}.npy", (len(idx), *shape), int(state.get(name, 0)))
        for a in range(done, len(idx), _CHUNK):
            rows = idx[a : a + _CHUNK]
            out[a : a + len(rows)] = prepare(src.read(rows)).numpy()
            out.flush()  # on disk before the progress file says so
            state[name] = a + len(rows)
            write_atomic(state_path, json.dumps(state))
            done_all += len(rows)
            if progress is not None:
                progress("streaming images", done_all, total)
        del out
    state["complete"] = True
    write_atomic(state_path, json.dumps(state))


def _open(path: Path, shape: tuple[int, ...], done: int) -> tuple[np.memmap, int]:
    """The file to write, and how many of its images are written already: the ``done`` of a
    file of this shape, else 0 and a new file."""
    if done > 0:
        try:
            out = open_memmap(path, mode="r+")
            if out.shape == shape:
                return out, min(done, len(out))
        except (ValueError, OSError):  # missing, or cut short by a full disk or a crash
            pass
    return open_memmap(path, mode="w+", dtype=np.float32, shape=shape), 0


def _digest(src: Source, parts: Mapping[str, torch.Tensor], key: Mapping[str, Any]) -> str:
    """The files' name: a hash of everything their contents depend on."""
    h = hashlib.sha256(json.dumps({"version": _VERSION, **key}, sort_keys=True, default=str).encode())
    for file in src.files:
        try:
            st = os.stat(file)
        except OSError as e:
            raise DataError(f"cannot read image {file}: {e.strerror}") from None
        h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for name, idx in parts.items():
        h.update(name.encode())
        h.update(idx.numpy().tobytes())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (another process loading the same folder waits)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
