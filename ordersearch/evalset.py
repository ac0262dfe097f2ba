"""EvalSet: the images (and optional labels) an objective scores candidate orders on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._images import gather, open_npy
from .errors import DataError

__all__ = ["EvalSet"]


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Preprocessed images ``x`` (N, C, H, W), optional labels ``y`` (N,), and a seeded
    train/val split used by objectives that fit something (the ridge probe).

    Args:
        x: Images already resized and normalised for the bank.
        y: Integer labels, or None for an unlabelled target domain.
        val_fraction: Share of the images in the val split.
        seed: Seed of the split (stratified by label when labels are present).
        name: Short description (the data spec), kept in reports and specs.
        classes: Class names, if known.

    Example:
        >>> es = EvalSet.from_tensors(torch.randn(10, 1, 8, 8), torch.arange(10) % 2)
        >>> len(es.train_idx) + len(es.val_idx), es.has_labels
        (10, True)
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    val_fraction: float = 0.5
    seed: int = 0
    name: str = ""
    classes: tuple[str, ...] | None = None
    train_idx: torch.Tensor = field(init=False, repr=False)
    val_idx: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.ndim < 2:
            raise DataError("EvalSet needs an image tensor x of shape (N, ...)")
        if len(self.x) < 2:
            raise DataError(f"EvalSet needs at least 2 images, got {len(self.x)}")
        if not torch.is_floating_point(self.x):
            object.__setattr__(self, "x", self.x.float())
        if self.y is not None:
            y = torch.as_tensor(self.y)
            if y.ndim != 1 or len(y) != len(self.x):
                raise DataError(f"labels must have shape ({len(self.x)},), got {tuple(y.shape)}")
            if torch.is_floating_point(y) and not torch.equal(y, y.round()):
                raise DataError("labels must be integers")
            object.__setattr__(self, "y", y.long())
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        train, val = _split(len(self.x), self.y, self.val_fraction, self.seed)
        object.__setattr__(self, "train_idx", train)
        object.__setattr__(self, "val_idx", val)

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> EvalSet:
        """An EvalSet from in-memory tensors (same arguments as the constructor)."""
        return cls(torch.as_tensor(x), None if y is None else torch.as_tensor(y), **kwargs)

    @classmethod
    def from_npy(cls, path: str | Path, y: torch.Tensor | None = None, **kwargs: Any) -> EvalSet:
        """An EvalSet whose images stay on disk: ``path`` is a ``.npy`` file of preprocessed
        float32 images (N, C, H, W), memory-mapped, so only the images a block forward reads
        are in memory (with the engine's shards, memory is set by its cache budget, not by N).
        Write one in chunks with ``numpy.lib.format.open_memmap(path, "w+", np.float32, shape)``,
        or let :func:`ordersearch.data.load` stream an image folder into one. Derived sets
        (:meth:`subset`, :meth:`select`, ...) larger than 1 GiB stay on disk too (a temporary
        file in the cache folder)."""
        path = Path(path)
        return cls(open_npy(path), y, **{"name": path.name, **kwargs})

    @classmethod
    def with_split(
        cls, x: torch.Tensor, y: torch.Tensor | None, train_idx: torch.Tensor, val_idx: torch.Tensor, **kwargs: Any
    ) -> EvalSet:
        """An EvalSet whose train/val parts are given rather than drawn (e.g. a probe fit on
        search images and scored on held-out ones). Derived sets (:meth:`subset`,
        :meth:`halves`, :meth:`select`) draw their own split again."""
        es = cls(x, y, **kwargs)
        train_idx, val_idx = torch.as_tensor(train_idx).long(), torch.as_tensor(val_idx).long()
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise DataError("both parts of an EvalSet's split need images")
        both = torch.cat([train_idx, val_idx])
        if len(torch.unique(both)) != len(both) or int(both.min()) < 0 or int(both.max()) >= len(es):
            raise DataError("an EvalSet's train and val parts must be distinct positions of its images")
        object.__setattr__(es, "train_idx", train_idx)
        object.__setattr__(es, "val_idx", val_idx)
        return es

    # --- facts --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.x)

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        return None if self.y is None else int(self.y.max()) + 1

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.numel()

    # --- derived sets -------------------------------------------------------------------
    def subset(self, n: int, *, seed: int | None = None) -> EvalSet:
        """The first ``n`` images of a seeded permutation: nested for growing ``n`` with the
        same seed (for multi-fidelity scoring)."""
        if not 2 <= n <= len(self):
            raise DataError(f"subset size must be in 2..{len(self)}, got {n}")
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return self.select(idx, name=f"{self.name}[{n}]")

    def halves(self, *, seed: int | None = None) -> tuple[EvalSet, EvalSet]:
        """Two disjoint random halves (for split-half reliability of an objective)."""
        g = torch.Generator().manual_seed((self.seed if seed is None else seed) + 1)
        perm = torch.randperm(len(self), generator=g)
        mid = len(self) // 2
        return (
            self.select(perm[:mid].sort().values, name=f"{self.name}[half 1]"),
            self.select(perm[mid:].sort().values, name=f"{self.name}[half 2]"),
        )

    def select(self, idx: torch.Tensor, *, name: str | None = None) -> EvalSet:
        """The images at ``idx`` as a new EvalSet with its own split."""
        return EvalSet(
            gather([(self.x, idx)]),
            None if self.y is None else self.y[idx],
            val_fraction=self.val_fraction,
            seed=self.seed,
            name=self.name if name is None else name,
            classes=self.classes,
        )

    @property
    def digest(self) -> str:
        """sha256 over the images, labels and split: what a resumed study must score on."""
        h = hashlib.sha256()
        for t in (self.x, self.y, self.train_idx, self.val_idx):
            if t is None:
                h.update(b"none")
                continue
            h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            for start in range(0, max(len(t), 1), 256):  # in chunks: a memory-mapped x stays on disk
                part = t[start : start + 256].detach().to("cpu").contiguous()
                h.update(part.reshape(-1).view(torch.uint8).numpy())  # the buffer: no copy
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for specs and reports."""
        return {
            "name": self.name,
            "n": len(self),
            "shape": list(self.x.shape[1:]),
            "labelled": self.has_labels,
            "num_classes": self.num_classes,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }


def _split(n: int, y: torch.Tensor | None, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if y is None:
        perm = torch.randperm(n, generator=g)
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    train, val = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    tr, va = torch.cat(train).sort().values, torch.cat(val).sort().values
    if len(tr) == 0 or len(va) == 0:
        raise DataError("the train/val split is empty; give more images")
    return tr, va
