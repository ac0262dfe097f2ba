"""``load``: from a data spec to train/val/test tensors for a bank.

The pipeline is the same for every source: images in [0, 1] at the working resolution ->
shifts (on every image, so an image's noise does not depend on the subset kept) -> fixed
seeded splits -> class subset -> ``n`` subset -> resize to the bank's size -> channels ->
``(x - mean) / std``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ._data import Data
from ._digits import WORK_SIZE, digits_images
from ._files import SPLITS, Source, load_folder, load_tensor_file
from ._prep import (
    Config,
    allocate,
    normalise,
    resize,
    resolve_config,
    stratified_split,
    take_stratified,
    to_channels,
)
from ._shifts import apply_shifts
from ._spec import DEFAULT_SPLIT, DataSpec, parse_spec
from ._stream import STREAM_BYTES, Progress, stream_splits

__all__ = ["load"]

log = logging.getLogger("ordersearch")

_RANGE = re.compile(r"(\d+)-(\d+)\Z")


def load(
    spec: str | os.PathLike[str] | DataSpec,
    data_config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    stream: bool | None = None,
    progress: Progress | None = None,
) -> Data:
    """Load the data a spec names, split and preprocessed for a bank.

    Args:
        spec: A data spec such as ``digits``, ``digits:rotate=25,noise=0.3``,
            ``digits:classes=5-9``, a folder of class subfolders, or a ``.npz``/``.pt`` file
            (see :func:`ordersearch.data.parse_spec` for the grammar).
        data_config: The bank's data config: ``input_size`` (C, H, W), ``mean``, ``std``,
            optional ``interpolation`` and ``crop_pct``. None means 1x16x16, mean and std 0.5.
        seed: Seed of the train/val/test split and of the ``n`` subset, and the default
            seed of random shifts (a ``seed=`` in the spec overrides it for the shifts). The
            split depends on the labels and this seed only, so every shift of a dataset
            keeps each image in the same split.
        stream: For an image folder: decode its images a chunk at a time into memory-mapped
            ``.npy`` files in the cache folder (``$ORDERSEARCH_CACHE``, else
            ``~/.cache/ordersearch``), reused by later runs and resumed after a kill, so memory
            never holds the dataset. None: when the kept images take more than 2 GiB as
            float32 tensors. Same images as in memory; random shifts (``noise``) are drawn over
            the whole set at once and are not streamed.
        progress: Called with ``(stage, done, total)`` while a folder is streamed.

    Returns:
        The splits as float tensors (N, C, H, W) with labels ``0..len(classes)-1``.

    Raises:
        DataError: A malformed spec, a missing path, an unreadable file, an empty subset.

    Example:
        >>> data = load("digits:rotate=25,noise=0.3", {"input_size": (3, 32, 32), "mean": 0.5, "std": 0.25})
        >>> data.spec, tuple(data.train[0].shape)
        ('digits:rotate=25,noise=0.3,seed=0', (1078, 3, 32, 32))
    """
    start = time.perf_counter()
    parsed = parse_spec(spec)
    parsed = parsed.with_seed(seed) if parsed.is_random else replace(parsed, seed=None)
    cfg = resolve_config(data_config)
    src = _read(parsed, cfg)

    if src.parts is not None:
        if parsed.split is not None:
            raise DataError(f"{parsed.source} comes split into {', '.join(SPLITS)}; drop split= from the spec")
        parts = src.parts
    else:
        parts = stratified_split(src.y, len(src), parsed.split or DEFAULT_SPLIT, seed)

    y = src.y
    classes, tokens = src.classes, parsed.classes
    if parsed.classes is not None:
        keep = _resolve_classes(parsed.classes, src, str(parsed))
        lut = torch.full((len(src.classes),), -1, dtype=torch.long)
        lut[torch.tensor(keep)] = torch.arange(len(keep))
        y = lut[src.y]  # type: ignore[index]
        parts = tuple(p[y[p] >= 0] for p in parts)  # type: ignore[assignment]
        classes = tuple(src.classes[k] for k in keep)
        tokens = _canonical_classes(keep, src.classes)
    if parsed.n is not None:
        total = sum(len(p) for p in parts)
        if parsed.n > total:
            raise DataError(f"n={parsed.n} but {parsed.source} has only {total} images with these classes")
        parts = _subset(parts, y, parsed.n, seed)

    canonical = str(replace(parsed, classes=tokens))
    shift_seed = parsed.seed if parsed.seed is not None else seed

    def shift(xs: torch.Tensor) -> torch.Tensor:
        return apply_shifts(xs, parsed.shifts, seed=shift_seed) if parsed.shifts else xs

    def finish(xs: torch.Tensor) -> torch.Tensor:  # to the bank's size, channels and statistics
        if parsed.norm:
            xs = normalise(to_channels(resize(xs, cfg.size, cfg.interpolation), cfg.channels), cfg)
        return xs.contiguous()

    streamed = _streams(stream, parsed, src, parts, cfg)
    if streamed:
        images = stream_splits(src, dict(zip(SPLITS, parts)), lambda xs: finish(shift(xs)),
                                         {"spec": canonical, "seed": seed, "data_config": cfg.describe()}, progress)
        out = {name: (images[name], None if y is None else y[idx]) for name, idx in zip(SPLITS, parts)}
    else:
        x = shift(src.images())  # every image: its random draws do not depend on the subset kept
        out = {name: (finish(x[idx]), None if y is None else y[idx]) for name, idx in zip(SPLITS, parts)}
    description = _describe(canonical, parsed, src, cfg, seed, {k: len(v[0]) for k, v in out.items()}, classes)
    if streamed:
        description["streamed"] = True
    log.info("loaded %s: %s images in %.2fs", canonical, description["sizes"], time.perf_counter() - start)
    index = dict(zip(SPLITS, parts))
    return Data(out["train"], out["val"], out["test"], classes if y is not None else (), canonical, description, index)


def _streams(stream: bool | None, spec: DataSpec, src: Source, parts: Sequence[torch.Tensor], cfg: Config) -> bool:
    """Whether to stream the kept images to disk (see :func:`load`'s ``stream``)."""
    if stream is False:
        return False
    if src.x is not None:
        if stream:
            raise DataError(f"{spec.source}: stream=True streams image folders; this source is read whole")
        return False
    nbytes = sum(len(p) for p in parts) * cfg.channels * cfg.height * cfg.width * 4
    if stream is None and nbytes <= STREAM_BYTES:
        return False
    if spec.is_random:
        raise DataError(
            f"{spec}: random shifts are drawn over the whole set at once, and these "
            f"{nbytes / 2**30:.1f} GiB of images are streamed from disk; drop the random shift, "
            "or keep fewer images (n=)")
    return True


def _read(spec: DataSpec, cfg: Config) -> Source:
    if spec.kind == "digits":
        x, y, classes = digits_images(WORK_SIZE)
        return Source(x, y, classes, None, {"source": "digits", "working_size": [WORK_SIZE, WORK_SIZE]})
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise DataError(
            f"no such file or folder: {spec.source} (a data spec is digits[:shifts], a folder of "
            "class subfolders, or a .npz/.pt file)"
        )
    if spec.kind == "tensors":
        return load_tensor_file(path, cfg, norm=spec.norm)
    if path.is_file():
        raise DataError(f"{spec.source} is a file but not .npz/.pt/.pth; give a folder or a tensor file")
    return load_folder(path, cfg)


def _resolve_classes(tokens: Sequence[str], src: Source, text: str) -> list[int]:
    """Class indices named by tokens: a class name, an index, or an index range ``a-b``."""
    if src.y is None:
        raise DataError(f"{text}: classes= needs labels, and {src.info.get('path', 'the source')} has none")
    names = list(src.classes)
    k = len(names)
    keep: set[int] = set()
    for t in tokens:
        m = _RANGE.match(t)
        if t in names:
            keep.add(names.index(t))
        elif t.isdigit() and int(t) < k:
            keep.add(int(t))
        elif m and int(m.group(1)) <= int(m.group(2)) < k:
            keep.update(range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            shown = ", ".join(names[:20]) + (", ..." if k > 20 else "")
            raise DataError(f"{text}: unknown class {t!r}; classes are {shown} (names, or indices 0-{k - 1})")
    return sorted(keep)


def _canonical_classes(keep: list[int], names: tuple[str, ...]) -> tuple[str, ...]:
    """Names, or runs ``a-b`` of indices where the names are the indices (digits)."""
    if any(names[i] != str(i) for i in keep):
        # a name that the grammar would split is written as its index
        return tuple(str(i) if ("," in names[i] or "=" in names[i]) else names[i] for i in keep)
    runs: list[str] = []
    start = prev = keep[0]
    for i in [*keep[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return tuple(runs)


def _subset(parts: Sequence[torch.Tensor], y: torch.Tensor | None, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Exactly ``n`` images, each split shrunk in proportion and stratified by class."""
    g = torch.Generator().manual_seed(seed + 1)  # not the split's stream
    counts = allocate(n, [len(p) for p in parts])
    return tuple(take_stratified(p, y, k, g) for p, k in zip(parts, counts))


def _describe(
    canonical: str, spec: DataSpec, src: Source, cfg: Config, seed: int, sizes: dict[str, int],
    classes: tuple[str, ...],
) -> dict[str, Any]:
    presplit = src.parts is not None
    return {
        "spec": canonical,
        **src.info,
        "shifts": [[name, value] for name, value in spec.shifts],
        "shift_seed": spec.seed,
        "split_seed": None if presplit else seed,
        "split": "given" if presplit else list(spec.split or DEFAULT_SPLIT),
        "sizes": sizes,
        "labelled": src.y is not None,
        "classes": list(classes) if src.y is not None else [],
        "num_classes": len(classes) if src.y is not None else None,
        "normalised": spec.norm,
        "data_config": cfg.describe(),
    }
