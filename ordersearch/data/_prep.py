"""What every source shares: the bank's data config, resizing, channels, normalisation and
seeded stratified splits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError

__all__ = ["Config", "DEFAULT_DATA_CONFIG", "resolve_config"]

DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (1, 16, 16),
    "mean": (0.5,),
    "std": (0.5,),
    "interpolation": "bilinear",
}
"""Used when ``load`` gets no data config: the project's small isometric ResNet's input."""

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# torch resizes tensors with these modes only; PIL-only filters fall back to bicubic there
_TENSOR_MODES = {"nearest": InterpolationMode.NEAREST_EXACT, "bilinear": InterpolationMode.BILINEAR}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" conversion


@dataclass(frozen=True)
class Config:
    """A validated data config (a timm ``resolve_data_config`` dict, or a subset of it)."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    crop_mode: str = "center"

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input_size": [self.channels, self.height, self.width],
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        if self.crop_pct is not None:
            out["crop_pct"] = self.crop_pct
        return out


def resolve_config(data_config: Mapping[str, Any] | None) -> Config:
    """Check a data config and fill in what it leaves out.

    ``input_size`` is required; ``mean``/``std`` default to 0.5 (a single value is used for
    every channel); ``interpolation`` defaults to bilinear (timm's ``random`` means bilinear
    at evaluation); ``crop_pct`` is honoured for image folders, as timm's eval transform does.
    """
    cfg = dict(DEFAULT_DATA_CONFIG if data_config is None else data_config)
    size = cfg.get("input_size")
    try:
        c, h, w = (int(v) for v in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DataError(f"data_config input_size must be (C, H, W), got {size!r}") from None
    if min(c, h, w) < 1:
        raise DataError(f"data_config input_size must be positive, got {size!r}")
    mean = _per_channel("mean", cfg.get("mean", 0.5), c)
    std = _per_channel("std", cfg.get("std", 0.5), c)
    if any(not s > 0 for s in std):
        raise DataError(f"data_config std must be positive, got {list(std)}")
    interp = str(cfg.get("interpolation") or "bilinear").lower()
    interp = "bilinear" if interp == "random" else interp
    if interp not in _INTERPOLATIONS:
        raise DataError(f"data_config interpolation {interp!r} is not one of {', '.join(_INTERPOLATIONS)}")
    crop_pct = cfg.get("crop_pct")
    if crop_pct is not None and not 0 < float(crop_pct) <= 1:
        raise DataError(f"data_config crop_pct must be in (0, 1], got {crop_pct}")
    return Config(
        c, h, w, mean, std, interp,
        None if crop_pct is None else float(crop_pct),
        str(cfg.get("crop_mode") or "center"),
    )


def _per_channel(name: str, value: Any, c: int) -> tuple[float, ...]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == 1:
        values = values * c
    if len(values) != c:
        raise DataError(f"data_config {name} has {len(values)} values for {c} channels")
    return tuple(values)


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str, *, clamp: bool = True) -> torch.Tensor:
    """Resize images (N, C, h, w) to ``size``, antialiased; ``clamp`` keeps [0, 1] images in
    [0, 1] (bicubic overshoots), off for images that are already normalised."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = _TENSOR_MODES.get(interpolation, InterpolationMode.BICUBIC)
    out = TF.resize(x, list(size), interpolation=mode, antialias=True)
    return out.clamp_(0.0, 1.0) if clamp else out


def to_channels(x: torch.Tensor, c: int, *, what: str = "images") -> torch.Tensor:
    """Images (N, C0, H, W) with ``c`` channels: grey is replicated, RGB becomes luma when
    one channel is wanted, an alpha channel is dropped."""
    c0 = x.shape[1]
    if c0 == c:
        return x
    if c0 == 4:
        x, c0 = x[:, :3], 3
        if c == 3:
            return x
    if c0 == 1:
        return x.expand(-1, c, -1, -1).contiguous()
    if c0 == 3 and c == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(f"{what} have {c0} channels and the data config wants {c}")


def normalise(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


# --- splits ---------------------------------------------------------------------------------
def stratified_split(
    y: torch.Tensor | None, n: int, fractions: Sequence[float], seed: int
) -> tuple[torch.Tensor, ...]:
    """Seeded split of ``range(n)`` into parts of the given fractions, stratified by ``y``.

    Each class is shuffled and cut at the rounded cumulative fractions, so every split holds
    about its share of every class. The result depends on ``y``, ``fractions`` and ``seed``
    only, never on the images: a domain shift leaves each image in its split.
    """
    g = torch.Generator().manual_seed(seed)
    groups = [torch.arange(n)] if y is None else [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    cum = [0.0]
    for f in fractions:
        cum.append(cum[-1] + f)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=g)]
        cuts = [round(c * len(idx)) for c in cum]
        for i in range(len(fractions)):
            parts[i].append(idx[cuts[i]:cuts[i + 1]])
    return tuple(torch.cat(p).sort().values for p in parts)


def allocate(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over bins in proportion to ``sizes`` (largest remainder), never more
    than a bin holds."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    total = min(total, whole)
    share = [total * s / whole for s in sizes]
    out = [math.floor(v) for v in share]
    order = sorted(range(len(sizes)), key=lambda i: (out[i] - share[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return [min(o, s) for o, s in zip(out, sizes)]


def take_stratified(idx: torch.Tensor, y: torch.Tensor | None, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` of the indices ``idx``, drawn per class in proportion to the class sizes."""
    if y is None:
        return idx[torch.randperm(len(idx), generator=g)[:k]].sort().values
    labels = y[idx]
    classes = torch.unique(labels)
    groups = [idx[labels == c] for c in classes]
    counts = allocate(k, [len(gr) for gr in groups])
    picked = [gr[torch.randperm(len(gr), generator=g)[:m]] for gr, m in zip(groups, counts)]
    return torch.cat(picked).sort().values if picked else idx[:0]
