"""Adapters for timm's isometric families: ViT/DeiT, ConvMixer, ResMLP, MLP-Mixer, EVA,
CaiT and XCiT.

Each follows timm's convention ``forward_features = stem; blocks; norm`` and
``forward_head(x, pre_logits)``; only the stem differs per family. Blocks that their model
calls with more than the activations (EVA's rotary embeddings, XCiT's token grid) are bound
to those arguments (:func:`bind_block_arguments`); class-attention blocks that follow the
self-attention blocks (CaiT, XCiT) are part of the head. Data configuration comes from
``timm.data.resolve_data_config``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn

from ._parts import Part, class_attention_tail, stem_by_capture, timm_tail
from ._registry import register_adapter

log = logging.getLogger("ordersearch")


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config, with the input size the model was actually built for."""
    from timm.data import resolve_data_config

    config = dict(resolve_data_config({}, model=model))
    patch_embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_pad", False):
        size = (config["input_size"][0], *tuple(img_size))
        if size != tuple(config["input_size"]):
            log.info("input size %s from the model, not %s from its pretrained config", size, config["input_size"])
            config["input_size"] = size
    config["num_classes"] = getattr(model, "num_classes", None)
    return config


def _vit_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # patch embedding, class/distillation/register tokens and position embedding
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)  # (B, T, D)


def _module_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.stem(x)


def _timm_parts(model: nn.Module, stem) -> dict[str, Any]:
    return {
        "stem": Part(model, stem, "stem"),
        "blocks": list(model.blocks),
        "head": Part(model, partial(timm_tail, pre_logits=False), "head"),
        "features": Part(model, partial(timm_tail, pre_logits=True), "features"),
        "data_config": timm_data_config(model),
    }


def _is(class_path: str):
    module_name, _, class_name = class_path.rpartition(".")

    def matches(model: nn.Module) -> bool:
        try:
            module = __import__(module_name, fromlist=[class_name])
        except ImportError:
            return False
        return isinstance(model, getattr(module, class_name))

    return matches


def _vit_matches(model: nn.Module) -> bool:
    if not _is("timm.models.vision_transformer.VisionTransformer")(model):
        return False
    # RoPE/relative-position ViTs pass extra arguments to blocks; leave them to "blocks".
    return hasattr(model, "_pos_embed") and isinstance(getattr(model, "blocks", None), nn.Sequential)


register_adapter(
    "convmixer",
    _is("timm.models.convmixer.ConvMixer"),
    lambda m: _timm_parts(m, _module_stem),
    description="timm ConvMixer (patch conv stem, depthwise/pointwise residual blocks)",
)
register_adapter(
    "mixer",
    _is("timm.models.mlp_mixer.MlpMixer"),
    lambda m: _timm_parts(m, _module_stem),
    description="timm MLP-Mixer and ResMLP (MlpMixer class)",
)
register_adapter(
    "vit",
    _vit_matches,
    lambda m: _timm_parts(m, _vit_stem),
    description="timm ViT and DeiT (class, distillation and register tokens, pos embed)",
)


def _generic_build(model: nn.Module, tail=timm_tail) -> dict[str, Any]:
    """Any model with a ``blocks`` sequence: the stem is what runs before the blocks, the
    tail follows timm's ``norm`` + ``forward_head`` convention (checked by the identity test)."""
    parts: dict[str, Any] = {
        "stem": Part(model, stem_by_capture, "stem"),
        "blocks": list(model.blocks),
        "bind_blocks": True,  # bound to their extra arguments once the input size is known
        "data_config": timm_data_config(model) if hasattr(model, "pretrained_cfg") else {},
    }
    if hasattr(model, "forward_head"):
        parts["head"] = Part(model, partial(tail, pre_logits=False), "head")
        parts["features"] = Part(model, partial(tail, pre_logits=True), "features")
    else:
        parts["head"] = None
        parts["features"] = Part(model, _mean_pool, "features")
    return parts


def _mean_pool(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, C); (B, T, D) -> (B, D)
    return h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1) if h.ndim == 3 else h.flatten(1)


register_adapter(
    "eva",
    _is("timm.models.eva.Eva"),
    _generic_build,
    description="timm EVA/EVA-02 and RoPE ViTs (rotary position embeddings bound to each block)",
)
register_adapter(
    "cait",
    _is("timm.models.cait.Cait"),
    partial(_generic_build, tail=class_attention_tail),
    description="timm CaiT (self-attention blocks; class-attention blocks are part of the head)",
)
register_adapter(
    "xcit",
    _is("timm.models.xcit.Xcit"),
    partial(_generic_build, tail=class_attention_tail),
    description="timm XCiT (blocks bound to the token grid size; class-attention blocks in the head)",
)
register_adapter(
    "blocks",
    lambda m: isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList)),
    _generic_build,
    description="any model with a same-shape `blocks` sequence (timm head convention)",
)
