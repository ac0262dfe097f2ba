"""The isometric ResNet of the paper: a stem, K same-shaped residual blocks, a head.

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) build compositional models from
residual blocks that keep one activation shape, so that any block can run at any position.
Blocks are pre-activation ``x + conv(act(norm(conv(act(norm(x))))))``; the stem is one
convolution and the head is norm, activation, global average pool and a linear classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .errors import BankError

__all__ = ["IsoResNet", "IsoResNetConfig", "IsoBlock", "parse_isoresnet_source"]


@dataclass(frozen=True)
class IsoResNetConfig:
    """Architecture of an :class:`IsoResNet`.

    Args:
        width: Channels of every block.
        blocks: K, the number of blocks.
        classes: Classes of the head.
        in_chans: Image channels.
        input_size: Image height and width the bank expects.
        bn: BatchNorm in blocks and head (False: no normalisation).
    """

    width: int = 32
    blocks: int = 6
    classes: int = 10
    in_chans: int = 1
    input_size: int = 16
    bn: bool = True

    def __post_init__(self) -> None:
        for f in ("width", "blocks", "classes", "in_chans", "input_size"):
            if getattr(self, f) < 1:
                raise BankError(f"isoresnet: {f} must be >= 1, got {getattr(self, f)}")

    def source(self) -> str:
        """Text that rebuilds this architecture, e.g. ``isoresnet:width=32,blocks=6,...``."""
        return "isoresnet:" + ",".join(f"{k}={_fmt(v)}" for k, v in asdict(self).items())


def _fmt(v: object) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def parse_isoresnet_source(text: str) -> IsoResNetConfig:
    """Parse ``isoresnet:width=32,blocks=6,classes=10`` (any subset of the fields)."""
    body = text.split(":", 1)[1] if ":" in text else ""
    known = {f.name: f.type for f in fields(IsoResNetConfig)}
    kwargs: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise BankError(
                f"isoresnet source {text!r}: unknown setting {item!r}; "
                f"expected key=value with keys {', '.join(known)}"
            )
        try:
            kwargs[key] = value.strip().lower() in ("1", "true", "yes") if key == "bn" else int(value)
        except ValueError:
            raise BankError(f"isoresnet source {text!r}: {key} must be an integer, got {value!r}") from None
    return IsoResNetConfig(**kwargs)  # type: ignore[arg-type]


def _norm(width: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(width) if bn else nn.Identity()


class IsoBlock(nn.Module):
    """Pre-activation residual block that keeps the (B, C, H, W) shape."""

    def __init__(self, width: int, *, bn: bool = True) -> None:
        super().__init__()
        self.norm1 = _norm(width, bn)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=not bn)
        self.norm2 = _norm(width, bn)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=not bn)
        self.act = nn.ReLU()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch: norm, act, conv, twice."""
        return self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x + self.branch(x)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` written into ``out`` (the engine's cache buffer: no copy)."""
        return torch.add(x, self.branch(x), out=out)


class IsoResNet(nn.Module):
    """Isometric ResNet: ``head(blocks[K-1](...blocks[0](stem(x))))``.

    Example:
        >>> net = IsoResNet(IsoResNetConfig(width=8, blocks=3, classes=10))
        >>> net(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: IsoResNetConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        self.config = config or IsoResNetConfig(**kwargs)  # type: ignore[arg-type]
        c = self.config
        self.stem = nn.Conv2d(c.in_chans, c.width, 3, padding=1)
        self.blocks = nn.Sequential(*(IsoBlock(c.width, bn=c.bn) for _ in range(c.blocks)))
        self.norm = _norm(c.width, c.bn)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c.width, c.classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.act(self.norm(h)).mean(dim=(2, 3))  # (B, C)
        return z if pre_logits else self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
