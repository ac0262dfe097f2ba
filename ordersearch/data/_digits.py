"""scikit-learn's bundled handwritten digits (1,797 8x8 images, ten classes): the embedded
default dataset, real data that needs no download."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["WORK_SIZE", "digits_images"]

WORK_SIZE = 32
"""Side of the working image that shifts act on: the 8x8 digits upsampled four times, so that
rotations and blurs have pixels to act on and a domain is the same whatever size a bank wants."""


@lru_cache(maxsize=1)
def _raw() -> tuple[torch.Tensor, torch.Tensor]:
    table = _bundled_table()
    if table is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    else:
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0  # values 0..16
    y = torch.as_tensor(target).long()
    return x, y


def _bundled_table() -> np.ndarray | None:
    """The file that ``sklearn.datasets.load_digits`` reads, read without importing
    scikit-learn (which takes most of a second); None if the layout has changed."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table
    return None


@lru_cache(maxsize=2)
def _working(size: int) -> torch.Tensor:
    x, _ = _raw()
    up = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp_(0.0, 1.0)


def digits_images(size: int = WORK_SIZE) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """All digits as (1797, 1, size, size) floats in [0, 1], their labels and class names.

    The tensors are cached and shared: callers must not modify them in place.

    Example:
        >>> x, y, classes = digits_images()
        >>> tuple(x.shape), classes[:3]
        ((1797, 1, 32, 32), ('0', '1', '2'))
    """
    _, y = _raw()
    return _working(size), y, tuple(str(i) for i in range(10))
