"""Compositional networks: K shared isometric blocks, per-task orders, per-position statistics.

The trained model of Zhmoginov, Bashkirova and Sandler, "Compositional Models: Multi-Task
Learning and Knowledge Transfer with Modular Networks" (arXiv 2107.10963): a set of
same-shaped residual blocks, one or several stems and heads, and per-task mixing logits over
the blocks at every position. Blocks come from one of two families (``family``):

- ``isoresnet``: the isometric ResNet's :class:`~ordersearch.isoresnet.IsoBlock` (stem: one
  convolution; head: BatchNorm, pool, linear);
- ``vit``: timm's Vision Transformer block (``timm.models.vision_transformer.Block``) over
  patch tokens (stem: patch embedding, class token and position embedding; head: LayerNorm
  of the class token and a linear classifier). LayerNorm keeps no running statistics, so a
  ViT bank has no statistics slots (``norm="shared"``) and nothing for ``norm="target"`` to
  re-estimate: what differs between tasks is their order (and stems and heads, when per task).

A block that runs at several positions sees differently distributed inputs at each, so its
BatchNorm statistics (optionally also its affine parameters) are kept per *slot* -- per
position, or per task and position -- while its convolution weights stay shared. A bank made
from the model (adapter ``compositional``) runs a block at position ``p`` with slot ``p``'s
statistics through :meth:`~ordersearch.Bank.block_at`; positions past the trained depth use the
last position's statistics.

Saved banks rebuild the architecture from the source text
``compositional:width=16,blocks=4,depth=8,tasks=2,classes=10/10,...`` (see
:class:`CompositionalConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BankError
from ..isoresnet import IsoBlock
from ..order import Order
from ._load import build_source_model, register_source
from ._parts import Part
from ._registry import register_adapter

__all__ = [
    "BlockArch",
    "BlockAt",
    "CompositionalConfig",
    "CompositionalNet",
    "FAMILIES",
    "Head",
    "NORM_MODES",
    "PositionalBatchNorm2d",
    "PositionalIsoBlock",
    "TokenHead",
    "TokenStem",
    "VitBlock",
    "parse_block_arch",
    "parse_compositional_source",
    "task_bank",
]

#: ``shared``: one set of statistics per block; ``position``: one per position;
#: ``task``: one per task and position.
NORM_MODES = ("shared", "position", "task")
#: Block families: the isometric ResNet's blocks, or timm's Vision Transformer blocks.
FAMILIES = ("isoresnet", "vit")
#: Fields that only a ``vit`` family uses (left out of an isoresnet's source text).
_VIT_FIELDS = ("heads", "patch", "mlp_ratio")


@dataclass(frozen=True)
class CompositionalConfig:
    """Architecture of a :class:`CompositionalNet`.

    Args:
        width: Channels of every block.
        blocks: K, the number of shared blocks.
        depth: L, the number of positions of the trained (soft) orders.
        tasks: Number of tasks (each has its own mixing logits).
        classes: Classes of each head: one entry (a head shared by all tasks) or one per task.
        stems: 1 (a stem shared by all tasks) or ``tasks`` (one per task).
        norm: Where blocks keep BatchNorm statistics, one of :data:`NORM_MODES`.
        affine: ``shared`` (one set of BatchNorm affine parameters per block) or ``slot``
            (one per statistics slot, about 1% more parameters).
        skip: Whether the mixing logits have an extra "skip this position" choice.
        in_chans: Image channels.
        input_size: Image height and width.
        task: The task whose stem, head and statistics a bank made from this model uses.
        family: ``isoresnet`` or ``vit`` (see the module docstring).
        heads: Attention heads of a ``vit`` block (``width`` must be a multiple).
        patch: Patch size of a ``vit`` stem (``input_size`` must be a multiple).
        mlp_ratio: Hidden width of a ``vit`` block's MLP over ``width``.
    """

    width: int = 16
    blocks: int = 4
    depth: int = 4
    tasks: int = 1
    classes: tuple[int, ...] = (10,)
    stems: int = 1
    norm: str = "position"
    affine: str = "shared"
    skip: bool = False
    in_chans: int = 1
    input_size: int = 16
    task: int = 0
    family: str = "isoresnet"
    heads: int = 3
    patch: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        if self.family not in FAMILIES:
            raise BankError(f"compositional: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        for f in ("width", "blocks", "depth", "tasks", "stems", "in_chans", "input_size", "heads", "patch"):
            if getattr(self, f) < 1:
                raise BankError(f"compositional: {f} must be >= 1, got {getattr(self, f)}")
        if len(self.classes) not in (1, self.tasks) or min(self.classes, default=0) < 1:
            raise BankError(f"compositional: classes needs 1 or {self.tasks} positive entries, got {self.classes}")
        if self.stems not in (1, self.tasks):
            raise BankError(f"compositional: stems must be 1 or tasks={self.tasks}, got {self.stems}")
        if self.norm not in NORM_MODES:
            raise BankError(f"compositional: norm must be one of {', '.join(NORM_MODES)}, got {self.norm!r}")
        if self.affine not in ("shared", "slot"):
            raise BankError(f"compositional: affine must be shared or slot, got {self.affine!r}")
        if not 0 <= self.task < self.tasks:
            raise BankError(f"compositional: task must be in 0..{self.tasks - 1}, got {self.task}")
        if self.family == "vit":
            if self.norm != "shared" or self.affine != "shared":
                raise BankError("compositional: vit blocks normalise with LayerNorm, whose layers keep no running "
                                f"statistics: norm and affine must be shared, got norm={self.norm}, affine={self.affine}")
            if self.width % self.heads:
                raise BankError(f"compositional: width {self.width} is not a multiple of heads {self.heads}")
            if self.input_size % self.patch:
                raise BankError(f"compositional: input_size {self.input_size} is not a multiple of patch {self.patch}")
            if self.mlp_ratio <= 0:
                raise BankError(f"compositional: mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def slots(self) -> int:
        """Number of statistics slots per BatchNorm."""
        return {"shared": 1, "position": self.depth, "task": self.tasks * self.depth}[self.norm]

    @property
    def choices(self) -> int:
        """Mixing choices per position: K blocks, plus skip when enabled."""
        return self.blocks + int(self.skip)

    def source(self) -> str:
        """Text that rebuilds this architecture (``compositional:width=...``)."""
        items = []
        for k, v in asdict(self).items():
            if self.family == "isoresnet" and k in (*_VIT_FIELDS, "family"):
                continue  # the source text of banks saved before families existed
            if isinstance(v, (tuple, list)):
                v = "/".join(str(i) for i in v)
            elif isinstance(v, bool):
                v = int(v)
            items.append(f"{k}={v}")
        return "compositional:" + ",".join(items)


def parse_compositional_source(text: str) -> CompositionalConfig:
    """Parse ``compositional:width=16,blocks=4,depth=8,tasks=2,classes=10/5`` (any subset)."""
    body = text.split(":", 1)[1] if ":" in text else ""
    known = {f.name for f in fields(CompositionalConfig)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in known:
            raise BankError(f"compositional source {text!r}: unknown setting {item!r}; keys: {', '.join(sorted(known))}")
        try:
            if key == "classes":
                kwargs[key] = tuple(int(v) for v in value.split("/"))
            elif key in ("norm", "affine", "family"):
                kwargs[key] = value
            elif key == "mlp_ratio":
                kwargs[key] = float(value)
            elif key == "skip":
                kwargs[key] = value.lower() in ("1", "true", "yes")
            else:
                kwargs[key] = int(value)
        except ValueError:
            raise BankError(f"compositional source {text!r}: bad value for {key}: {value!r}") from None
    return CompositionalConfig(**kwargs)


_VIT_KEYS = {"width": int, "heads": int, "patch": int, "mlp_ratio": float, "in_chans": int, "input_size": int}


@dataclass(frozen=True)
class BlockArch:
    """The blocks a training run builds (what ``TrainConfig.arch`` names): the
    :class:`CompositionalConfig` fields that do not depend on the tasks."""

    family: str = "isoresnet"
    width: int = 16
    in_chans: int = 1
    input_size: int = 16
    heads: int = 3
    patch: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        CompositionalConfig(**asdict(self), norm="shared")  # width, heads, patch and sizes checked now

    @property
    def data_config(self) -> dict[str, Any]:
        """The input size, mean and std the trained bank expects."""
        return {"input_size": (self.in_chans, self.input_size, self.input_size),
                "mean": (0.5,) * self.in_chans, "std": (0.5,) * self.in_chans}


def parse_block_arch(text: str) -> BlockArch:
    """The block architecture of a training run.

    Three forms:

    - ``isoresnet[:width=16,in_chans=1,input_size=16]``: isometric ResNet blocks;
    - ``vit[:width=192,heads=3,patch=4,mlp_ratio=4,in_chans=1,input_size=16]``: timm ViT
      blocks (the defaults are ViT-Tiny's width, heads and MLP ratio, patch 4 at 16 px);
    - ``timm:<name>[,patch=4,input_size=16,in_chans=1,width=..,heads=..]``: the width, heads
      and MLP ratio of a timm Vision Transformer (e.g. ``timm:vit_tiny_patch16_224``), read
      from the model timm builds (random weights, nothing downloaded); ``width`` and ``heads``
      narrow it.

    Example:
        >>> parse_block_arch("vit:width=96").heads, parse_block_arch("isoresnet:width=8").width
        (3, 8)
    """
    from ..isoresnet import parse_isoresnet_source

    text = str(text).strip()
    scheme, _, body = text.partition(":")
    if scheme == "isoresnet":
        a = parse_isoresnet_source(text if ":" in text else text + ":")
        return BlockArch("isoresnet", a.width, a.in_chans, a.input_size)
    if scheme not in ("vit", "timm"):
        raise BankError(f"block architecture {text!r}: expected isoresnet[:...], vit[:...] or timm:<vit model>[,...]")
    items = [s.strip() for s in body.split(",") if s.strip()]
    name = items.pop(0) if scheme == "timm" and items and "=" not in items[0] else None
    if scheme == "timm" and name is None:
        raise BankError(f"block architecture {text!r}: name a timm ViT, e.g. timm:vit_tiny_patch16_224,patch=4")
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = (v.strip() for v in item.partition("="))
        if not sep or key not in _VIT_KEYS:
            raise BankError(f"block architecture {text!r}: unknown setting {item!r}; keys: {', '.join(_VIT_KEYS)}")
        try:
            settings[key] = _VIT_KEYS[key](value)
        except ValueError:
            raise BankError(f"block architecture {text!r}: bad value for {key}: {value!r}") from None
    out = {"family": "vit", "width": 192, "heads": 3, "patch": 4, "mlp_ratio": 4.0, "in_chans": 1, "input_size": 16}
    if name is not None:
        out.update(_timm_vit_shape(name, settings))
    out.update(settings)
    return BlockArch(**out)


def _timm_vit_shape(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Width, heads and MLP ratio of timm's ``name`` (built with random weights, one block)."""
    kwargs = {"num_classes": 0, "depth": 1, "img_size": settings.get("input_size", 16),
              "patch_size": settings.get("patch", 4), "in_chans": settings.get("in_chans", 1)}
    if "width" in settings:
        kwargs["embed_dim"] = settings["width"]
    if "heads" in settings:
        kwargs["num_heads"] = settings["heads"]
    try:
        model = build_source_model(f"timm:{name}", **kwargs)
    except BankError as exc:  # unknown name (with close ones), or settings the model does not take
        raise BankError(f"timm could not build {name!r} as a Vision Transformer (depth, img_size, patch_size, "
                        f"in_chans): {exc}") from None
    block = next(iter(getattr(model, "blocks", [])), None)
    if not hasattr(model, "embed_dim") or block is None or not hasattr(block, "mlp") or not hasattr(block, "attn"):
        raise BankError(f"timm model {name!r} is not a plain Vision Transformer (embed_dim, blocks with attn "
                        "and mlp); use vit:width=..,heads=.. instead")
    width = int(model.embed_dim)
    return {"width": width, "heads": int(block.attn.num_heads), "mlp_ratio": block.mlp.fc1.out_features / width}


class PositionalBatchNorm2d(nn.Module):
    """BatchNorm2d with one set of running statistics (and optionally affine parameters)
    per slot; ``forward(x, slot)`` normalises with slot ``slot``.

    ``momentum=None`` gives a cumulative average, as in ``nn.BatchNorm2d`` (used to
    re-estimate statistics after hardening).
    """

    #: The engine's ``norm="target"`` re-estimates these statistics like nn.BatchNorm's.
    target_norm = True

    def __init__(self, num_features: int, slots: int, *, affine_per_slot: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        shape = (slots, num_features) if affine_per_slot else (num_features,)
        self.affine_per_slot = affine_per_slot
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(slots, num_features))
        self.register_buffer("running_var", torch.ones(slots, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(slots, dtype=torch.long))

    @property
    def slots(self) -> int:
        return self.running_mean.shape[0]

    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s statistics (before re-estimating them)."""
        with torch.no_grad():
            self.running_mean[slot].zero_()
            self.running_var[slot].fill_(1.0)
            self.num_batches_tracked[slot].zero_()

    def forward(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:  # (B, C, H, W)
        w = self.weight[slot] if self.affine_per_slot else self.weight
        b = self.bias[slot] if self.affine_per_slot else self.bias
        factor = 0.0
        if self.training:
            self.num_batches_tracked[slot] += 1
            n = int(self.num_batches_tracked[slot])
            factor = 1.0 / n if self.momentum is None else self.momentum
        # indexing with an int gives views, so training updates the slot's statistics in place
        return F.batch_norm(x, self.running_mean[slot], self.running_var[slot], w, b,
                            self.training, factor, self.eps)

    def extra_repr(self) -> str:
        return f"{self.running_mean.shape[1]}, slots={self.slots}, affine_per_slot={self.affine_per_slot}"


class PositionalIsoBlock(IsoBlock):
    """:class:`~ordersearch.isoresnet.IsoBlock` whose BatchNorms keep per-slot statistics;
    ``forward(x, slot)``. Same parameter names as ``IsoBlock``, so blocks share one shape."""

    def __init__(self, width: int, *, slots: int = 1, affine_per_slot: bool = False) -> None:
        super().__init__(width, bn=True)
        self.norm1 = PositionalBatchNorm2d(width, slots, affine_per_slot=affine_per_slot)
        self.norm2 = PositionalBatchNorm2d(width, slots, affine_per_slot=affine_per_slot)

    def branch(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """The residual branch with slot ``slot``'s statistics."""
        return self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x, slot))), slot)))

    def forward(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:  # (B, C, H, W) -> same
        return x + self.branch(x, slot)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """``forward(x, slot)`` written into ``out`` (the engine's cache buffer: no copy)."""
        return torch.add(x, self.branch(x, slot), out=out)


class BlockAt(nn.Module):
    """A block bound to one statistics slot: what ``bank.block_at(block, position)`` returns."""

    def __init__(self, block: PositionalIsoBlock, slot: int) -> None:
        super().__init__()
        self.block = block
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.slot)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.block.forward_into(x, out, self.slot)

    def extra_repr(self) -> str:
        return f"slot={self.slot}"


class Head(nn.Module):
    """Norm, activation, global average pool and a linear classifier (as in IsoResNet)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.fc = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.act(self.norm(h)).mean(dim=(2, 3))  # (B, C)
        return z if pre_logits else self.fc(z)


class VitBlock(nn.Module):
    """timm's Vision Transformer block (pre-norm attention and MLP, each residual) over
    (B, T, D) tokens; ``forward(x, slot)`` ignores the slot (LayerNorm keeps no statistics).

    The timm block is built once and its modules taken over, so the parameter names are
    timm's (``norm1``, ``attn.qkv``, ``mlp.fc1``, ...) and its weights are initialised as timm
    initialises a ViT (truncated normal, std 0.02, zero biases).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        block = Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for m in block.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.block = block

    def forward(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:  # (B, T, D) -> same
        return self.block(x)


class TokenStem(nn.Module):
    """A ViT stem: patch embedding, a class token and a learned position embedding."""

    def __init__(self, c: CompositionalConfig) -> None:
        super().__init__()
        from timm.layers import PatchEmbed, trunc_normal_

        self.patch_embed = PatchEmbed(c.input_size, c.patch, c.in_chans, c.width)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.width))
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 + N, D)
        h = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1) + self.pos_embed


class TokenHead(nn.Module):
    """A ViT head: LayerNorm, the class token, a linear classifier."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.norm(h)[:, 0]  # (B, D)
        return z if pre_logits else self.fc(z)


class CompositionalNet(nn.Module):
    """Stems, K shared blocks, heads and per-task mixing logits of shape (tasks, depth, choices).

    ``forward(x)`` runs the identity order for ``config.task`` (the bank contract);
    :meth:`run_order` runs any discrete order for any task. Soft (mixed) orders are run by
    :mod:`ordersearch.train`.

    Example:
        >>> net = CompositionalNet(CompositionalConfig(width=8, blocks=3, depth=5, tasks=2))
        >>> net.run_order(torch.randn(2, 1, 16, 16), [0, 1, 1, 2, 0], task=1).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: CompositionalConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        c = self.config = config or CompositionalConfig(**kwargs)
        if c.family == "vit":
            self.stems = nn.ModuleList(TokenStem(c) for _ in range(c.stems))
            self.blocks = nn.ModuleList(VitBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.blocks))
            self.heads = nn.ModuleList(TokenHead(c.width, n) for n in c.classes)
        else:
            self.stems = nn.ModuleList(nn.Conv2d(c.in_chans, c.width, 3, padding=1) for _ in range(c.stems))
            self.blocks = nn.ModuleList(
                PositionalIsoBlock(c.width, slots=c.slots, affine_per_slot=c.affine == "slot")
                for _ in range(c.blocks)
            )
            self.heads = nn.ModuleList(Head(c.width, n) for n in c.classes)
        self.logits = nn.Parameter(torch.zeros(c.tasks, c.depth, c.choices))
        #: Task name -> hardened order; set by training, saved in the bank header.
        self.source_orders: dict[str, Order] = {}

    # --- per-task parts -----------------------------------------------------------------
    def slot(self, task: int, position: int) -> int:
        """Statistics slot of ``position`` in ``task``'s order (clamped to the trained depth)."""
        c = self.config
        p = min(position, c.depth - 1)
        return {"shared": 0, "position": p, "task": task * c.depth + p}[c.norm]

    def stem_for(self, task: int) -> nn.Module:
        return self.stems[task if len(self.stems) > 1 else 0]

    def head_for(self, task: int) -> Head | TokenHead:
        return self.heads[task if len(self.heads) > 1 else 0]

    def task_index(self, task: int | str) -> int:
        """Index of a task given by index or by its name in ``source_orders``."""
        if isinstance(task, str):
            names = list(self.source_orders)
            if task not in names:
                raise BankError(f"no task named {task!r}; tasks: {', '.join(names) or '(unnamed)'}")
            return names.index(task)
        if not 0 <= task < self.config.tasks:
            raise BankError(f"task {task} is out of range 0..{self.config.tasks - 1}")
        return int(task)

    # --- forward ------------------------------------------------------------------------
    def run_order(self, x: torch.Tensor, order: Sequence[int], task: int = 0, *,
                  pre_logits: bool = False) -> torch.Tensor:
        """Logits (or pooled features) of a discrete ``order`` run for ``task``."""
        h = self.stem_for(task)(x)
        for pos, k in enumerate(order):
            h = self.blocks[k](h, self.slot(task, pos))
        return self.head_for(task)(h, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_order(x, range(self.config.blocks), self.config.task)

    def for_task(self, task: int | str) -> CompositionalNet:
        """A view of this model (same modules, no copies) whose bank uses ``task``."""
        t = self.task_index(task)
        view = CompositionalNet.__new__(CompositionalNet)
        nn.Module.__init__(view)
        view.config = replace(self.config, task=t)
        view.stems, view.blocks, view.heads, view.logits = self.stems, self.blocks, self.heads, self.logits
        view.source_orders = self.source_orders
        return view


# --- adapter and source scheme ------------------------------------------------------------
def _stem(model: CompositionalNet, x: torch.Tensor) -> torch.Tensor:
    return model.stem_for(model.config.task)(x)


def _tail(model: CompositionalNet, h: torch.Tensor, *, pre_logits: bool) -> torch.Tensor:
    return model.head_for(model.config.task)(h, pre_logits=pre_logits)


def _build(model: CompositionalNet) -> dict[str, Any]:
    c = model.config
    task = c.task

    def block_at(block: int, position: int) -> nn.Module:
        return BlockAt(model.blocks[block], model.slot(task, position))

    return {
        "stem": Part(model, _stem, f"stem of task {task}"),
        "blocks": list(model.blocks),
        # a vit bank's blocks have no statistics slots: the same module at every position
        "head": Part(model, partial(_tail, pre_logits=False), f"head of task {task}"),
        "features": Part(model, partial(_tail, pre_logits=True), f"features of task {task}"),
        "block_at": block_at if c.family == "isoresnet" else None,
        "source_orders": dict(model.source_orders) or None,
        "data_config": {
            "input_size": (c.in_chans, c.input_size, c.input_size),
            "mean": (0.5,) * c.in_chans,
            "std": (0.5,) * c.in_chans,
            "interpolation": "bilinear",
            "num_classes": model.head_for(task).fc.out_features,
        },
    }


register_adapter(
    "compositional",
    lambda m: isinstance(m, CompositionalNet),
    _build,
    description="multi-task compositional network trained by ordersearch.train (per-position statistics)",
)
register_source("compositional", lambda s: CompositionalNet(parse_compositional_source(s)),
                lambda m: m.config.source(), example="compositional:width=16,blocks=4")


def task_bank(bank: Any, task: int | str) -> Any:
    """The bank of a compositional model for another of its tasks (stem, head, statistics).

    Args:
        bank: A bank made by the ``compositional`` adapter (e.g. a saved trained bank).
        task: Task index or name (a key of ``bank.source_orders``).
    """
    from ._registry import bank_from_model

    model = bank.model
    if not isinstance(model, CompositionalNet):
        raise BankError(f"task_bank needs a compositional bank, got adapter {bank.adapter!r}")
    model.source_orders = dict(bank.source_orders)
    view = model.for_task(task)
    out = bank_from_model(view, adapter="compositional", source=view.config.source(),
                          data_config={k: v for k, v in bank.data_config.items() if k != "num_classes"},
                          source_orders=dict(bank.source_orders), verify=False)
    out.path = bank.path
    return out
