"""Soft orders: per-position mixing weights over K shared blocks (and skip).

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) let every task learn a soft
computation order: at each of L positions a softmax over the blocks, annealed with a
temperature until it is (nearly) one-hot, then hardened into a discrete order. Two relaxations
are offered, as objects of one small interface:

- :class:`OutputMixing`: ``h <- sum_k w_k * block_k(h)`` (soft layer ordering);
- :class:`WeightMixing`: ``h <- block(h; sum_k w_k * theta_k)``, one forward with mixed
  parameters (possible because all blocks share parameter shapes), via
  ``torch.func.functional_call``.

A skip choice, when present, adds ``w_skip * h``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..errors import OrderSearchError
from ..order import SKIP, Order

__all__ = [
    "Mixing",
    "OutputMixing",
    "TemperatureSchedule",
    "WeightMixing",
    "entropy",
    "harden",
    "mixing_weights",
    "top_weight",
]

SCHEDULE_SHAPES = ("linear", "cosine", "exponential", "constant")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Softmax temperature over training, from ``start`` to ``end``.

    Args:
        start: Temperature at the first step.
        end: Temperature at the last soft step; low enough (about 0.01) to reach hard orders.
        shape: ``linear``, ``cosine``, ``exponential`` (geometric) or ``constant``.

    Example:
        >>> s = TemperatureSchedule(1.0, 0.01, "exponential")
        >>> round(s(0.0), 3), round(s(0.5), 3), round(s(1.0), 3)
        (1.0, 0.1, 0.01)
    """

    start: float = 1.0
    end: float = 0.01
    shape: str = "exponential"

    def __post_init__(self) -> None:
        if self.shape not in SCHEDULE_SHAPES:
            raise OrderSearchError(f"temperature shape must be one of {', '.join(SCHEDULE_SHAPES)}, got {self.shape!r}")
        if self.start <= 0 or self.end <= 0:
            raise OrderSearchError(f"temperatures must be positive, got start={self.start}, end={self.end}")

    def __call__(self, progress: float) -> float:
        """Temperature at ``progress`` in [0, 1] of the soft phase."""
        s = min(max(progress, 0.0), 1.0)
        if self.shape == "constant":
            return self.start
        if self.shape == "linear":
            return self.start + (self.end - self.start) * s
        if self.shape == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * s))
        return self.start * (self.end / self.start) ** s


def mixing_weights(
    logits: torch.Tensor,
    temperature: float,
    *,
    gumbel: bool = False,
    prune: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Softmax of ``logits`` (..., choices) at ``temperature``.

    Args:
        logits: Mixing logits, e.g. (L, K[+1]).
        temperature: Softmax temperature.
        gumbel: Add Gumbel(0, 1) noise to the logits first (Gumbel-softmax).
        prune: Weights below this value are set to zero and the rest renormalised, so
            negligible blocks stop costing compute and stop blurring the order.
        generator: Random source of the Gumbel noise.
    """
    z = logits
    if gumbel:
        u = torch.rand(logits.shape, generator=generator).to(logits.device)  # CPU generator: reproducible
        z = z - torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))  # + Gumbel(0, 1)
    w = torch.softmax(z / temperature, dim=-1)
    if prune > 0:
        keep = (w >= prune) | (w == w.max(dim=-1, keepdim=True).values)
        w = w * keep
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-position distributions in ``weights`` (..., choices)."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(-1).mean()


def top_weight(weights: torch.Tensor) -> float:
    """Mean over positions of the largest weight: 1.0 means fully hard."""
    return float(weights.max(dim=-1).values.mean())


def harden(weights: torch.Tensor, n_blocks: int) -> Order:
    """The discrete order of (L, choices) ``weights``: argmax per position, skips dropped."""
    ids = weights.argmax(dim=-1).tolist()
    return Order(SKIP if i >= n_blocks else i for i in ids)


class Mixing:
    """How one position combines K blocks given weights ``w`` (choices,)."""

    name = ""

    def __call__(self, blocks: nn.ModuleList, h: torch.Tensor, w: torch.Tensor, slot: int) -> torch.Tensor:
        raise NotImplementedError


class OutputMixing(Mixing):
    """``sum_k w_k * block_k(h, slot) + w_skip * h``; blocks with zero weight are not run."""

    name = "outputs"

    def __call__(self, blocks: nn.ModuleList, h: torch.Tensor, w: torch.Tensor, slot: int) -> torch.Tensor:
        k_blocks = len(blocks)
        out = h * w[k_blocks] if len(w) > k_blocks else torch.zeros_like(h)
        active = (w[:k_blocks] > 0).nonzero().flatten().tolist()
        for k in active:
            out = out + w[k] * blocks[k](h, slot)
        return out


class WeightMixing(Mixing):
    """``block(h, slot; sum_k w_k theta_k / sum_k w_k)``, then ``(1 - w_skip)`` of it plus
    ``w_skip * h``.

    Args:
        stats: A block whose buffers hold the mixed block's running statistics (the K
            blocks' own per-slot statistics belong to the blocks run as themselves, and are
            re-estimated when an order is hardened).
    """

    name = "weights"

    def __init__(self, stats: nn.Module) -> None:
        self.stats = stats

    def __call__(self, blocks: nn.ModuleList, h: torch.Tensor, w: torch.Tensor, slot: int) -> torch.Tensor:
        k_blocks = len(blocks)
        wb = w[:k_blocks]
        mass = wb.sum()
        if mass.item() == 0.0:  # every block pruned: pure skip
            return h
        state = mixed_parameters(blocks, wb / mass)
        state.update(dict(self.stats.named_buffers()))
        out = functional_call(blocks[0], state, (h,), {"slot": slot})
        if len(w) > k_blocks:
            out = mass * out + w[k_blocks] * h
        return out


def mixed_parameters(blocks: nn.ModuleList, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: sum_k w_k * blocks[k].name}`` over every parameter (all blocks share shapes)."""
    named = [dict(b.named_parameters()) for b in blocks]
    used = [k for k, v in enumerate(w.detach().tolist()) if v != 0.0]  # pruned blocks cost nothing
    return {name: sum(w[k] * named[k][name] for k in used) for name in named[0]}


def make_mixing(name: str, stats: nn.Module | None = None) -> Mixing:
    """``outputs`` or ``weights`` (which needs the mixed block's statistics module)."""
    if name == "outputs":
        return OutputMixing()
    if name == "weights":
        if stats is None:
            raise OrderSearchError("weight mixing needs a statistics module")
        return WeightMixing(stats)
    raise OrderSearchError(f"mixing must be 'outputs' or 'weights', got {name!r}")
