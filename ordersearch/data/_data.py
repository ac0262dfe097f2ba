"""Data: the loaded train/val/test splits of one data spec, ready for a bank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .._images import gather
from ..errors import DataError
from ..evalset import EvalSet
from ._files import SPLITS

__all__ = ["Data", "Split"]

Split = tuple[torch.Tensor, torch.Tensor | None]
"""``(x, y)``: images (N, C, H, W) normalised for the bank, labels (N,) or None."""


@dataclass(frozen=True, eq=False)
class Data:
    """Train, val and test splits of one dataset or domain, preprocessed for a bank.

    Made by :func:`ordersearch.data.load`. Labels run ``0..len(classes)-1``; ``classes``
    holds their names (``('5', ..., '9')`` for ``digits:classes=5-9``).

    Attributes:
        train: ``(x, y)`` of the train split.
        val: ``(x, y)`` of the val split.
        test: ``(x, y)`` of the test split.
        classes: Class names; empty when the data is unlabelled.
        spec: Canonical data spec, which reloads the same data (with the same ``seed``).
        description: JSON-friendly facts for reports and order specs.
        index: Per split, the positions of its images in the source (for digits, in
            scikit-learn's order): the same for every shift of a dataset, so images can be
            paired across domains.

    Example:
        >>> from ordersearch.data import load
        >>> data = load("digits:rotate=30")
        >>> x, y = data.train
        >>> tuple(x.shape[1:]), data.num_classes
        ((1, 16, 16), 10)
        >>> data.evalset("val").has_labels
        True
    """

    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    spec: str
    description: dict[str, Any] = field(default_factory=dict)
    index: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def has_labels(self) -> bool:
        return self.train[1] is not None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.has_labels else None

    @property
    def input_size(self) -> tuple[int, ...]:
        """(C, H, W) of the images."""
        return tuple(self.train[0].shape[1:])

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {s: len(self.split(s)[0]) for s in SPLITS}

    def split(self, name: str) -> Split:
        """``(x, y)`` of ``train``, ``val``, ``test``, or several joined with ``+``
        (``"train+val"``) or ``all``."""
        names = SPLITS if name == "all" else tuple(n.strip() for n in name.split("+"))
        for n in names:
            if n not in SPLITS:
                raise DataError(f"unknown split {n!r}; splits: {', '.join(SPLITS)} (join with +, or all)")
        parts = [getattr(self, n) for n in names]
        if len(parts) == 1:
            return parts[0]
        x = gather([(p[0], None) for p in parts])
        y = None if parts[0][1] is None else torch.cat([p[1] for p in parts])  # type: ignore[misc]
        return x, y

    def evalset(
        self, split: str = "val", *, labelled: bool = True, val_fraction: float = 0.5, seed: int = 0
    ) -> EvalSet:
        """The images of a split as an EvalSet (which makes its own train/val split for
        objectives that fit something, such as the ridge probe).

        Args:
            split: ``train``, ``val``, ``test``, ``train+val``, ... or ``all``.
            labelled: False drops the labels, for unsupervised objectives; True keeps them
                when the data has them.
            val_fraction: Share of the EvalSet's own val part.
            seed: Seed of the EvalSet's own split.
        """
        x, y = self.split(split)
        if len(x) < 2:
            raise DataError(
                f"split {split!r} of {self.spec} has {len(x)} images; an EvalSet needs 2 or more "
                f"(sizes: {self.sizes()})"
            )
        return EvalSet(
            x,
            y if labelled else None,
            val_fraction=val_fraction,
            seed=seed,
            name=f"{self.spec}[{split}]",
            classes=self.classes or None,
        )

    def loader(
        self,
        split: str = "train",
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        *,
        drop_last: bool = False,
    ) -> DataLoader:
        """A DataLoader over a split for training: batches ``(x, y)``, or ``(x,)`` when
        unlabelled; the shuffle order is seeded."""
        x, y = self.split(split)
        if len(x) == 0:
            raise DataError(f"split {split!r} of {self.spec} is empty (sizes: {self.sizes()})")
        ds = TensorDataset(x) if y is None else TensorDataset(x, y)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)

    def __repr__(self) -> str:
        return f"Data({self.spec!r}, sizes={self.sizes()}, input_size={self.input_size}, classes={len(self.classes)})"
