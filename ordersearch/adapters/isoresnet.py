"""Adapter for the project's own isometric ResNet (the paper's architecture)."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from ..isoresnet import IsoResNet, IsoResNetConfig, parse_isoresnet_source
from ._load import register_source
from ._parts import Part
from ._registry import register_adapter


def _stem(model: nn.Module, x):
    return model.stem(x)


def _tail(model: nn.Module, h, *, pre_logits: bool):
    return model.forward_head(h, pre_logits=pre_logits)


def data_config(c: IsoResNetConfig) -> dict[str, Any]:
    """Input size, mean, std and classes of an isometric ResNet (images scaled to [0, 1])."""
    return {
        "input_size": (c.in_chans, c.input_size, c.input_size),
        "mean": (0.5,) * c.in_chans,
        "std": (0.5,) * c.in_chans,
        "interpolation": "bilinear",
        "num_classes": c.classes,
    }


def _build(model: IsoResNet) -> dict[str, Any]:
    return {
        "stem": Part(model, _stem, "stem"),
        "blocks": list(model.blocks),
        "head": Part(model, partial(_tail, pre_logits=False), "head"),
        "features": Part(model, partial(_tail, pre_logits=True), "features"),
        "data_config": data_config(model.config),
    }


register_adapter(
    "isoresnet",
    lambda m: isinstance(m, IsoResNet),
    _build,
    description="ordersearch's isometric ResNet (the paper's architecture)",
)
register_source("isoresnet", lambda s: IsoResNet(parse_isoresnet_source(s)), lambda m: m.config.source(),
                example="isoresnet:width=..,blocks=..,classes=..")
