"""Small modules that expose one part of a source model (stem, tail) as its own module.

They hold the source model as a submodule so that ``.to()``, fine-tuning and weight sharing
behave as usual; only the part's forward is run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import BankError


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


class BoundBlock(nn.Module):
    """A block its model calls with arguments besides the activations that do not depend on
    the images (EVA's rotary position embeddings, XCiT's token grid size): the arguments
    recorded when the bank was built are passed on every call, so the block maps
    activations to activations like any other. Tensors among them follow ``.to()``."""

    def __init__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.block = block
        self._args, self._kwargs = args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, *self._args, **self._kwargs)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half() move the arguments too
        super()._apply(fn, recurse)
        self._args = tuple(fn(a) if isinstance(a, torch.Tensor) else a for a in self._args)
        self._kwargs = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self._kwargs.items()}
        return self

    def extra_repr(self) -> str:
        names = [f"arg{i}" for i in range(len(self._args))] + list(self._kwargs)
        return "with " + ", ".join(names)


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        super().__init__()
        self.block, self.calls = block, calls

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.block(x, *args, **kwargs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def bind_block_arguments(model: nn.Module, x: torch.Tensor, forward: str = "forward_features") -> list[nn.Module]:
    """``model.blocks``, each bound to the extra arguments the model passes it (none: the
    blocks themselves).

    Runs ``model`` once on ``x`` with every block recording its call. Refuses, with
    :class:`BankError`, blocks called with different extra arguments at different depths
    (e.g. per-depth rotary embeddings): such a block computes something else at each position,
    so reordering it has no meaning.
    """
    blocks = model._modules["blocks"]
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in blocks]
    for i, block in enumerate(list(blocks)):
        blocks[i] = _Recorder(block, calls[i])
    try:
        with torch.inference_mode():
            getattr(model, forward if hasattr(model, forward) else "forward")(x)
    finally:
        for i, rec in enumerate(list(blocks)):
            blocks[i] = rec.block
    name = type(model).__name__
    if any(len(c) != 1 for c in calls):
        raise BankError(f"{name}: its forward does not call each of its blocks once, so no adapter fits")
    (args0, kwargs0), = calls[0]
    if not args0 and not kwargs0:
        if any(a or k for (a, k), in calls):
            raise BankError(f"{name}: some blocks take extra arguments and some do not, so no adapter fits")
        return list(blocks)
    for i, ((args, kwargs),) in enumerate(calls):
        if not _same((args, kwargs), (args0, kwargs0)):
            differ = [k for k in kwargs if k not in kwargs0 or not _same(kwargs[k], kwargs0[k])] or ["positional"]
            raise BankError(
                f"{name}: block {i} gets other arguments than block 0 ({', '.join(differ)}): its computation "
                "depends on its depth, so its blocks cannot be reordered and no adapter fits")
    return [BoundBlock(b, args, kwargs) for b, ((args, kwargs),) in zip(blocks, calls)]


def class_attention_tail(model: nn.Module, h: torch.Tensor, *, pre_logits: bool) -> torch.Tensor:
    """CaiT/XCiT: the class-attention blocks (``forward_cls``) belong to the head, then
    timm's ``norm`` and ``forward_head``."""
    return timm_tail(model, model.forward_cls(h), pre_logits=pre_logits)


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
