"""Adapter for the project's own isometric ResNet (the paper's architecture)."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from ..isoresnet import IsoResNet
from ._parts import Part
from ._registry import register_adapter


def _stem(model: nn.Module, x):
    return model.stem(x)


def _tail(model: nn.Module, h, *, pre_logits: bool):
    return model.forward_head(h, pre_logits=pre_logits)


def _build(model: IsoResNet) -> dict[str, Any]:
    c = model.config
    return {
        "stem": Part(model, _stem, "stem"),
        "blocks": list(model.blocks),
        "head": Part(model, partial(_tail, pre_logits=False), "head"),
        "features": Part(model, partial(_tail, pre_logits=True), "features"),
        "data_config": {
            "input_size": (c.in_chans, c.input_size, c.input_size),
            "mean": (0.5,) * c.in_chans,
            "std": (0.5,) * c.in_chans,
            "interpolation": "bilinear",
            "num_classes": c.classes,
        },
    }


register_adapter(
    "isoresnet",
    lambda m: isinstance(m, IsoResNet),
    _build,
    description="ordersearch's isometric ResNet (the paper's architecture)",
)
