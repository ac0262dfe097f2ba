"""Transfer warm start: fine-tune an order (hardened or searched) from a spec on new data.

Knowledge transfer in Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) keeps the
pretrained modules and learns a new computation order for the new task. Here the order found
before (an order spec, or a bank's source order) initialises soft mixing logits, which are
trained together with a new linear head, the blocks frozen (``train="order"``) or trained as
well (``train="all"``), and hardened at the end. Works on any bank (timm or compositional):
the soft order mixes block outputs through ``bank.block_at``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_path, write_atomic
from ..adapters import bank_from_model
from ..bank import Bank
from ..build import OrderedModel, build_model
from ..errors import OrderSearchError
from ..order import Order
from ..spec import OrderSpec, load_order, save_order
from ._mixing import TemperatureSchedule, harden, mixing_weights, top_weight

if TYPE_CHECKING:
    from ._config import TrainConfig
    from ._multitask import TrainResult

__all__ = ["FinetuneResult", "finetune_order"]

log = logging.getLogger("ordersearch")

#: Fine-tuning starts near a hard order, so it needs less annealing than training from scratch.
_FINETUNE_TEMPERATURE = TemperatureSchedule(1.0, 0.05, "exponential")


@dataclass
class FinetuneResult:
    """A fine-tuned order.

    Attributes:
        start: The order fine-tuning started from.
        order: The hardened order at the end.
        model: ``build_model(bank, order, head)`` with the trained head.
        bank: The bank the model runs on (a trained copy when ``train="all"``).
        metrics: Accuracies of the soft and hardened orders, top weight.
        weights: Mixing weights after every epoch, (epochs+1, L, choices).
        history: Per-epoch metrics.
    """

    start: Order
    order: Order
    model: OrderedModel
    bank: Bank
    metrics: dict[str, Any]
    weights: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)


class _SoftOrder(nn.Module):
    def __init__(self, bank: Bank, start: Order, n_classes: int, *, skip: bool, strength: float) -> None:
        super().__init__()
        self.bank = bank
        k, depth = bank.n_blocks, len(start)
        self.at = [[bank.block_at(b, p) for b in range(k)] for p in range(depth)]
        logits = torch.zeros(depth, k + int(skip))
        logits[torch.arange(depth), torch.tensor(start.to_list(), dtype=torch.long)] = strength
        self.logits = nn.Parameter(logits)
        with torch.no_grad():
            dim = bank.features(bank.stem(torch.zeros(1, *bank.data_config["input_size"]))).shape[-1]
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.bank.stem(x)
        k = self.bank.n_blocks
        for pos in range(w.shape[0]):
            out = h * w[pos, k] if w.shape[1] > k else torch.zeros_like(h)
            for b in (w[pos, :k] > 0).nonzero().flatten().tolist():
                out = out + w[pos, b] * self.at[pos][b](h)
            h = out
        return self.fc(self.bank.features(h))


def finetune_order(
    start: Order | str | OrderSpec | Path,
    data: Any,
    *,
    bank: Bank | None = None,
    train: str = "order",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-2,
    order_lr: float = 0.05,
    weight_decay: float = 1e-4,
    temperature: TemperatureSchedule = _FINETUNE_TEMPERATURE,
    skip: bool = False,
    strength: float = 3.0,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a soft order that starts at ``start`` (and a new head) on ``data``.

    Args:
        start: An order spec (path or loaded) or an order; an order needs ``bank``.
        data: A data spec or a loaded ``ordersearch.data.Data``.
        bank: The bank (default: the one the spec names).
        train: ``order``: blocks frozen, only the mixing logits and head train; ``all``:
            the blocks, stem and features train too (on a copy of the bank).
        epochs, batch_size, lr, order_lr, weight_decay: AdamW with cosine decay.
        temperature: Softmax temperature schedule over the epochs.
        skip: Allow the order to drop positions.
        strength: Initial logit of the start order's block at each position (others 0).
        seed: Seed of the head initialisation and batch order.
        progress: Called with ``(stage, done, total)`` after every epoch.
    """
    from ..data import Data, load

    if isinstance(start, (str, Path)) and Path(str(start)).suffix == ".json":
        start = load_order(start, bank) if bank is not None else load_order(start)
    if isinstance(start, OrderSpec):
        bank = bank if bank is not None else start.load_bank()
        start = start.order
    if bank is None:
        raise OrderSearchError("finetune_order needs a bank (or a spec that names one)")
    start = Order.parse(start).validate(bank.n_blocks)
    if train not in ("order", "all"):
        raise OrderSearchError(f"train must be 'order' or 'all', got {train!r}")
    if train == "all":  # train a copy; the caller's bank stays as it was
        bank = bank_from_model(copy.deepcopy(bank.model), adapter=bank.adapter, source=bank.source,
                               model_kwargs=bank.model_kwargs, data_config=dict(bank.data_config),
                               source_orders=dict(bank.source_orders), verify=False)
    ds = data if isinstance(data, Data) else load(str(data), bank.data_config, seed=seed)
    if ds.num_classes is None:
        raise OrderSearchError("fine-tuning an order needs labelled data")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _SoftOrder(bank, start, ds.num_classes, skip=skip, strength=strength)
    body = [p for p in bank.model.parameters()] if train == "all" else []
    for p in body:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(net.fc.parameters()) + body, "lr": lr, "weight_decay": weight_decay},
                             {"params": [net.logits], "lr": order_lr, "weight_decay": 0.0}])
    x, y = ds.train
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    snaps = [mixing_weights(net.logits.detach(), temperature(0.0)).numpy()]
    history = []
    for epoch in range(epochs):
        bank.train(train == "all")
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            w = mixing_weights(net.logits, temperature((epoch * steps_per_epoch + i) / total))
            loss = loss_fn(net(x[idx], w), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        t_now = temperature((epoch + 1) / max(1, epochs))
        w = mixing_weights(net.logits.detach(), t_now)
        snaps.append(w.numpy())
        val = _accuracy(net, bank, w, *ds.val)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "temperature": t_now, "val_accuracy": val,
                        "top_weight": top_weight(w), "order": str(harden(w, bank.n_blocks))})
        if progress is not None:
            progress(f"fine-tune order (val acc {val:.3f})", epoch + 1, epochs)
    bank.freeze()
    w = mixing_weights(net.logits.detach(), temperature(1.0))
    order = harden(w, bank.n_blocks)
    head = nn.Sequential(bank.features, net.fc).eval()
    for p in net.fc.parameters():
        p.requires_grad_(False)
    model = build_model(bank, order, head=head)
    from ._supervised import accuracy

    metrics = {
        "start_order": str(start), "order": str(order), "train": train, "top_weight": top_weight(w),
        "soft_val_accuracy": _accuracy(net, bank, w, *ds.val),
        "soft_test_accuracy": _accuracy(net, bank, w, *ds.test),
        "hardened_val_accuracy": accuracy(model, *ds.val),
        "hardened_test_accuracy": accuracy(model, *ds.test),
    }
    log.info("fine-tuned order %s -> %s: %s", start, order, metrics)
    return FinetuneResult(start=start, order=order, model=model, bank=bank, metrics=metrics,
                          weights=np.stack(snaps), history=history)


@torch.no_grad()
def _accuracy(net: _SoftOrder, bank: Bank, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    was = bank.training
    bank.eval()
    correct = sum(int((net(x[i:i + 512], w).argmax(1) == y[i:i + 512]).sum()) for i in range(0, len(x), 512))
    bank.train(was)
    return correct / max(1, len(x))


def finetune_from_config(config: TrainConfig, *, out: str | Path, progress: Any = None) -> TrainResult:
    """``train_bank`` with ``warm_start``: fine-tune the spec's order on every task."""
    from ._multitask import TrainResult
    from ._outputs import plot_mixing, plot_mixing_strip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(config.resolved(), indent=2) + "\n")
    spec = load_order(config.warm_start)
    bank = spec.load_bank()
    orders, metrics, files, snaps = {}, {}, {}, []
    for task in config.tasks:
        r = finetune_order(spec, task.data, bank=bank, train=config.finetune, epochs=config.epochs,
                           batch_size=config.batch_size, lr=config.lr, order_lr=config.order_lr,
                           weight_decay=config.weight_decay, temperature=config.temperature,
                           skip=config.skip, seed=config.seed, progress=progress)
        orders[task.name], metrics[task.name] = r.order, dict(r.metrics, data=task.data)
        snaps.append(r.weights)
        target = r.bank
        if config.finetune == "all" and target.source is not None:
            files[f"bank:{task.name}"] = target.save(out / f"bank_{task.name}.safetensors")
        files[f"order:{task.name}"] = save_order(
            out / "orders" / f"{task.name}.json", target, r.order, objective="accuracy",
            score=r.metrics["hardened_val_accuracy"], searcher="finetune", data=task.data,
            metrics={k: v for k, v in r.metrics.items() if isinstance(v, float)}, task=task.name,
            start_order=str(r.start), warm_start=str(config.warm_start),
        )
    names = list(orders)
    if len({s.shape for s in snaps}) == 1:
        weights = np.stack(snaps, axis=1)  # (E+1, T, L, choices)
        with atomic_path(out / "mixing.npz") as tmp:
            np.savez(tmp, weights=weights, tasks=np.asarray(names), n_blocks=bank.n_blocks)
        files["heatmaps"] = plot_mixing(weights[-1], names, bank.n_blocks, out / "mixing_final.png",
                                        orders=[orders[n] for n in names])
        files["strip"] = plot_mixing_strip(weights, names, bank.n_blocks, out / "mixing_strip.png")
    lines = ["# Fine-tuning report", "", f"- warm start: `{config.warm_start}` (order `{spec.order}`)",
             f"- bank: `{bank.describe_source()}`; trained: {config.finetune}; epochs {config.epochs}", "",
             "| task | start | order | soft test | hardened test | top weight |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | `{m['start_order']}` | `{m['order']}` | {100 * m['soft_test_accuracy']:.1f} | "
                     f"{100 * m['hardened_test_accuracy']:.1f} | {m['top_weight']:.3f} |")
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    files.update(report=out / "report.md", metrics=out / "metrics.json", config=out / "config.json")
    return TrainResult(config=config, out=out, bank=bank, orders=orders, metrics=metrics, history=[], files=files)
