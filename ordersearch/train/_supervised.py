"""Plain supervised training of a source model (the bank's blocks in their identity order).

The paper's multi-task soft-order training lives beside this; this is the single-task
baseline the demo uses to get a bank on the source domain in seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._threads import torch_threads

__all__ = ["FitConfig", "fit_classifier", "accuracy"]

log = logging.getLogger("ordersearch")


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit_classifier`.

    Args:
        epochs: Passes over the training set.
        batch_size: Images per step.
        lr: Peak learning rate of AdamW (cosine decay to zero).
        weight_decay: AdamW weight decay.
        label_smoothing: Cross-entropy label smoothing.
        seed: Seed of initial shuffling and of any stochastic layer.
        threads: torch threads while training (None: as they are). The weights a seed gives
            depend on it: a convolution's weight gradient is summed in per-thread parts.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: FitConfig = FitConfig(),
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``(x, y)`` with AdamW and a cosine schedule.

    Args:
        model: Any classifier; trained in place and left in eval mode.
        x: Images (N, C, H, W), preprocessed.
        y: Labels (N,).
        config: Optimiser settings.
        val: Optional held-out ``(x, y)`` scored after every epoch.
        on_epoch: Called with ``(epoch, metrics)`` after every epoch (progress bars).

    Returns:
        Per-epoch metrics: ``loss``, ``train_accuracy`` and, with ``val``, ``val_accuracy``.
    """
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True, generator=g)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, config.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history = []
    with torch_threads(config.threads):
        for epoch in range(config.epochs):
            history.append(_epoch(model, loader, opt, sched, loss_fn, val))
            log.debug("epoch %d: %s", epoch, history[-1])
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    model.eval()
    return history


def _epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, sched: Any, loss_fn: nn.Module,
           val: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for xb, yb in loader:
        logits = model(xb)
        loss = loss_fn(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
        total += len(yb)
    metrics = {"loss": loss_sum / total, "train_accuracy": correct / total}
    if val is not None:
        metrics["val_accuracy"] = accuracy(model, *val)
    return metrics


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / max(1, len(x))
