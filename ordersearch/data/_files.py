"""Image folders (torchvision's ImageFolder) and tensor files (.npz, .pt) at the bank's input
size. Tensor files are read whole; a folder is listed first and its images decoded on demand
(:attr:`Source.read`), all at once or, for a folder too large for memory, a chunk at a time
(``_stream.py``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, one_line
from ._prep import Config, resize, to_channels

__all__ = ["Source", "load_folder", "load_tensor_file", "SPLITS"]

log = logging.getLogger("ordersearch")

SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """Images of one source before shifts, subsets and normalisation.

    Attributes:
        x: (N, C, H, W) floats in [0, 1] (or already normalised, for ``norm=none`` files), or
            None for an image folder, whose images are decoded by ``read``.
        y: (N,) labels, or None.
        classes: Class names; empty when unlabelled.
        parts: Indices of train/val/test when the source comes split, else None.
        info: What to report about the source.
        read: For a folder, ``read(idx)`` decodes the images at positions ``idx``.
        files: For a folder, its image files in source order.
    """

    x: torch.Tensor | None
    y: torch.Tensor | None
    classes: tuple[str, ...]
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    read: Callable[[torch.Tensor], torch.Tensor] | None = None
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.files)

    def images(self) -> torch.Tensor:
        """Every image, in memory."""
        if self.x is None:
            assert self.read is not None
            self.x = self.read(torch.arange(len(self)))
        return self.x


def _concat(pieces: dict[str, tuple[torch.Tensor, torch.Tensor | None]], like: torch.Tensor) -> tuple[
    torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]:
    """Join per-split (x, y) pieces; splits that are absent become empty."""
    xs, ys, parts, start = [], [], [], 0
    for name in SPLITS:
        x, y = pieces.get(name, (like[:0], None))
        xs.append(x)
        ys.append(y if y is not None else torch.zeros(0, dtype=torch.long))
        parts.append(torch.arange(start, start + len(x)))
        start += len(x)
    labelled = any(p[1] is not None for p in pieces.values())
    return torch.cat(xs), torch.cat(ys) if labelled else None, tuple(parts)  # type: ignore[return-value]


# --- image folders --------------------------------------------------------------------------
def folder_transform(cfg: Config) -> Any:
    """PIL image -> (3, H, W) float tensor in [0, 1], as timm's eval transform: resize (to
    ``size / crop_pct`` and centre crop, when the config has a crop_pct), no normalisation
    (that comes after the shifts)."""
    from torchvision.transforms import InterpolationMode, v2

    interp = InterpolationMode(cfg.interpolation)
    steps: list[Any] = []
    if cfg.crop_pct is None:
        steps.append(v2.Resize(list(cfg.size), interpolation=interp, antialias=True))
    else:
        scale = [math.floor(s / cfg.crop_pct) for s in cfg.size]
        # timm resizes the shorter side for square crops (keeping the aspect ratio)
        square = cfg.crop_mode != "squash" and scale[0] == scale[1]
        steps.append(v2.Resize(scale[0] if square else scale, interpolation=interp, antialias=True))
        steps.append(v2.CenterCrop(list(cfg.size)))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def load_folder(path: Path, cfg: Config) -> Source:
    """A folder of class subfolders; with ``train/`` and ``val/`` or ``test/`` inside, those
    are the splits (a missing one is empty). Lists the images; they are decoded when read."""
    if not path.is_dir():
        raise DataError(f"no such folder: {path}")
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir()}
    presplit = "train" in split_dirs and len(split_dirs) > 1
    info: dict[str, Any] = {"source": "imagefolder", "path": str(path.resolve()), "presplit": presplit}
    if not presplit:
        files, y, classes = _list_image_folder(path)
        return Source(None, y, tuple(classes), None, info, _Decoder(files, cfg, path), tuple(files))
    listed = {s: _list_image_folder(d) for s, d in split_dirs.items()}
    classes = tuple(sorted({c for _, _, names in listed.values() for c in names}))
    index = {c: i for i, c in enumerate(classes)}
    files, ys, parts, start = [], [], [], 0
    for s in SPLITS:
        f, y, names = listed.get(s, ([], torch.zeros(0, dtype=torch.long), []))
        remap = torch.tensor([index[c] for c in names], dtype=torch.long)
        files += f
        ys.append(remap[y] if len(y) else y)
        parts.append(torch.arange(start, start + len(f)))
        start += len(f)
    info["splits"] = sorted(split_dirs)
    return Source(None, torch.cat(ys), classes, tuple(parts), info, _Decoder(files, cfg, path),  # type: ignore[arg-type]
                  tuple(files))


def _list_image_folder(root: Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """The image files of a folder of class subfolders, their labels and the class names."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {root}: {one_line(e)} (expected {root}/<class>/<image>.png)") from None
    log.debug("listed %d images in %d classes in %s", len(ds.samples), len(ds.classes), root)
    return [f for f, _ in ds.samples], torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)


class _Decoder:
    """Decodes a folder's images at given positions: PIL -> timm's eval resize and crop ->
    (N, C, H, W) floats in [0, 1] with the config's channels."""

    def __init__(self, files: list[str], cfg: Config, root: Path) -> None:
        from torchvision.datasets.folder import default_loader

        self.files, self.cfg, self.root = files, cfg, root
        self.transform = folder_transform(cfg)
        self.loader = default_loader

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        images = []
        for i in idx.tolist():
            file = self.files[i]
            try:
                img = self.transform(self.loader(file))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
                raise DataError(f"cannot read image {file}: {one_line(e)}") from None
            images.append(to_channels(img.unsqueeze(0), self.cfg.channels, what=f"images in {self.root}"))
        if not images:
            c, (h, w) = self.cfg.channels, self.cfg.size
            return torch.zeros((0, c, h, w))
        return torch.cat(images)


# --- tensor files ---------------------------------------------------------------------------
def load_tensor_file(path: Path, cfg: Config, *, norm: bool = True) -> Source:
    """A .npz or .pt file with ``x`` and optional ``y`` (or ``x_train``/``y_train``,
    ``x_val``, ``x_test``, ...) and optional ``classes`` (names)."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    arrays = _read_arrays(path)
    split_keys = [k for k in arrays if k.startswith("x_")]
    unknown = sorted(set(arrays) - {"x", "y", "classes"} - {f"{v}_{s}" for v in "xy" for s in SPLITS})
    if unknown:
        log.info("ignoring keys %s of %s", unknown, path)
    if "x" in arrays and split_keys:
        raise DataError(f"{path} has both x and {', '.join(split_keys)}; give either x (and y) or x_train, x_val, ...")
    if "x" not in arrays and "x_train" not in arrays:
        raise DataError(f"{path} has no images: expected key x (N, C, H, W) or x_train; keys: {', '.join(arrays)}")
    names = _class_names(arrays.get("classes"), path)
    if "x" in arrays:
        x = _images(arrays["x"], cfg, norm, f"{path}[x]")
        y = _labels(arrays.get("y"), len(x), f"{path}[y]")
        parts = None
    else:
        pieces = {}
        for s in SPLITS:
            if f"x_{s}" in arrays:
                xs = _images(arrays[f"x_{s}"], cfg, norm, f"{path}[x_{s}]")
                pieces[s] = (xs, _labels(arrays.get(f"y_{s}"), len(xs), f"{path}[y_{s}]"))
        if len({p[1] is None for p in pieces.values()}) > 1:
            raise DataError(f"{path}: give labels y_<split> for every split or for none")
        x, y, parts = _concat(pieces, pieces["train"][0])
    if y is not None and len(y):
        k = int(y.max()) + 1
        if names and k > len(names):
            raise DataError(f"{path}: label {k - 1} has no name among the {len(names)} classes")
        names = names or tuple(str(i) for i in range(k))
    info = {"source": "tensors", "path": str(path.resolve()), "presplit": parts is not None}
    return Source(x, y, names if y is not None else (), parts, info)


def _read_arrays(path: Path) -> dict[str, Any]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy and torch raise many kinds for a bad or foreign file
        raise DataError(f"cannot read {path}: {one_line(e)}") from None
    if isinstance(obj, torch.Tensor):
        return {"x": obj}
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected a dict with x (and y) or a tensor")
    return {str(k): v for k, v in obj.items()}


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {arr.dtype}; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _images(value: Any, cfg: Config, norm: bool, what: str) -> torch.Tensor:
    x = _tensor(value, what)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C), as numpy and PIL write images
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f"{what} has shape {tuple(x.shape)}; expected (N, C, H, W) or (N, H, W) with N > 0")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == torch.bool:
        x = x.float()
    elif not torch.is_floating_point(x):
        raise DataError(f"{what} has dtype {x.dtype}; give uint8 (0..255) or float (0..1) images")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{what} has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if norm and (lo < 0 or hi > 1):
        raise DataError(
            f"{what} has values in [{lo:.3g}, {hi:.3g}]; float images must be in [0, 1] "
            "(save uint8 0..255, or add :norm=none if x is already normalised for the bank)"
        )
    x = resize(x, cfg.size, cfg.interpolation, clamp=norm)
    return to_channels(x, cfg.channels, what=what)


def _labels(value: Any, n: int, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    y = _tensor(value, what)
    if torch.is_floating_point(y):
        if not torch.equal(y, y.round()):
            raise DataError(f"{what} has non-integer labels")
        y = y.long()
    y = y.long().flatten() if y.ndim == 2 and 1 in y.shape else y.long()
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} has shape {tuple(y.shape)}; expected ({n},) to match the images")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{what} has negative labels")
    return y


def _class_names(value: Any, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    try:
        names = tuple(str(v) for v in (value.tolist() if hasattr(value, "tolist") else value))
    except TypeError:
        raise DataError(f"{path}[classes] must be a list of names") from None
    if len(set(names)) != len(names):
        raise DataError(f"{path}[classes] has repeated names")
    return names

