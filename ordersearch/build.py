"""Rebuilt models: a plain ``nn.Module`` running a bank's blocks in a given order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .bank import Bank
from .errors import BankError
from .order import Order

__all__ = ["OrderedModel", "build_model"]


class OrderedModel(nn.Module):
    """``head(blocks[o_L](...blocks[o_1](stem(x))))`` for an order ``o``.

    The blocks are the bank's own modules, shared rather than copied: a block used twice is
    one module listed twice, so fine-tuning updates it once for both positions.

    Example:
        >>> import ordersearch
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> net = ordersearch.build_model(bank, "0-2-2")
        >>> net(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, bank: Bank, order: Order, head: nn.Module | None) -> None:
        super().__init__()
        self.order = order
        self.stem = bank.stem
        self.blocks = nn.ModuleList(bank.block_at(i, pos) for pos, i in enumerate(order))
        self.head = head
        self.pool = bank.features
        self.data_config = dict(bank.data_config)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (B, D) features."""
        return self.pool(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise BankError("this model has no head; call .features(x) or pass head= to build_model")
        return self.head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"order={self.order}"


def build_model(
    bank: Bank,
    order: Order | str | Sequence[int] | None = None,
    head: nn.Module | None = None,
    *,
    trainable: bool = False,
) -> OrderedModel:
    """A model running ``order`` through ``bank``'s blocks.

    Args:
        bank: The bank whose stem and blocks are used (shared, not copied).
        order: The order (default: identity).
        head: Module taking the last block's output to logits; defaults to the bank's
            source head. Pass a new head (e.g. ``nn.Sequential(bank.features, nn.Linear(D, C))``)
            for a new label set.
        trainable: Re-enable gradients for the shared weights (they are frozen in a bank).
    """
    order = bank.identity if order is None else Order.parse(order).validate(bank.n_blocks, min_len=0)
    model = OrderedModel(bank, order, head if head is not None else bank.head)
    if trainable:
        for p in model.parameters():
            p.requires_grad_(True)
    return model
