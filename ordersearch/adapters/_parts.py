"""Small modules that expose one part of a source model (stem, tail) as its own module.

They hold the source model as a submodule so that ``.to()``, fine-tuning and weight sharing
behave as usual; only the part's forward is run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Part(nn.Module):
    """``fn(model, x)`` as a module."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.model = model
        self._fn = fn
        self._name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.model, x)

    def extra_repr(self) -> str:
        return f"{self._name} of {type(self.model).__name__}"


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _BlocksProbe(nn.Module):
    """Stands in for ``model.blocks`` and stops the forward at the first block's input."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise _Captured(x)

    def __iter__(self):  # models that loop ``for blk in self.blocks``
        yield self

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> nn.Module:
        return self


def stem_by_capture(model: nn.Module, x: torch.Tensor, forward: str = "forward_features") -> torch.Tensor:
    """Run ``model`` until its ``blocks`` are called and return their input."""
    blocks = model._modules["blocks"]
    model._modules["blocks"] = _BlocksProbe()
    try:
        getattr(model, forward if hasattr(model, forward) else "forward")(x)
    except _Captured as c:
        return c.value
    finally:
        model._modules["blocks"] = blocks
    raise RuntimeError(f"{type(model).__name__}.{forward} never called its blocks")


def timm_tail(model: nn.Module, h: torch.Tensor, *, pre_logits: bool) -> torch.Tensor:
    """timm convention: ``forward_features`` ends with ``norm`` after the blocks, then
    ``forward_head``."""
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Module):
        h = norm(h)
    return model.forward_head(h, pre_logits=pre_logits)


def last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
