"""Multi-task training of a bank with per-task soft orders (the paper's method).

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963): K shared isometric residual blocks are
trained jointly on several tasks; each task has a stem, a head and mixing logits of shape
(L, K[+skip]) whose softmax, annealed with a temperature, is its soft computation order. The
orders are then hardened (argmax), the per-position BatchNorm statistics re-estimated under
the hard orders, optionally fine-tuned for a few epochs, and saved as a bank whose
``source_orders`` are the tasks' hardened orders.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path, write_atomic
from .._threads import torch_threads
from ..adapters.compositional import CompositionalConfig, CompositionalNet, PositionalBatchNorm2d
from ..bank import Bank
from ..errors import OrderSearchError
from ..order import Order
from ._config import TaskSpec, TrainConfig
from ._mixing import entropy, harden, make_mixing, mixing_weights, top_weight

__all__ = ["SoftOrderModel", "TrainResult", "recalibrate", "train_bank"]

log = logging.getLogger("ordersearch")

Progress = Callable[[str, int, int], None]


class SoftOrderModel(nn.Module):
    """A :class:`CompositionalNet` run with soft, fixed or hardened per-task orders.

    Args:
        net: The network (stems, shared blocks, heads, mixing logits).
        mixing: ``outputs`` or ``weights`` (see :mod:`ordersearch.train._mixing`).
        fixed: Per task, a fixed order or None (learned soft order).
    """

    def __init__(self, net: CompositionalNet, *, mixing: str = "outputs",
                 fixed: Sequence[Order | None] | None = None) -> None:
        super().__init__()
        self.net = net
        stats = None
        if mixing == "weights":
            # running statistics of the mixed block (one per slot); never trained by gradients
            stats = PositionalBatchNorm2dHolder(net)
            self.mixed_stats = stats
        self.mixing = make_mixing(mixing, stats)
        self.fixed: list[Order | None] = list(fixed or [None] * net.config.tasks)
        self.hard: list[Order | None] = [None] * net.config.tasks

    def order_of(self, task: int) -> Order | None:
        """The discrete order ``task`` runs now (hardened or fixed), or None if soft."""
        return self.hard[task] if self.hard[task] is not None else self.fixed[task]

    def weights(self, task: int, temperature: float, *, gumbel: bool = False, prune: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Mixing weights (L, choices) of ``task``."""
        return mixing_weights(self.net.logits[task], temperature, gumbel=gumbel, prune=prune, generator=generator)

    def forward(self, x: torch.Tensor, task: int, temperature: float = 1.0, *, gumbel: bool = False,
                prune: float = 0.0, generator: torch.Generator | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        order = self.order_of(task)
        if order is not None and weights is None:
            return self.net.run_order(x, order, task)
        if weights is None:
            weights = self.weights(task, temperature, gumbel=gumbel and self.training, prune=prune, generator=generator)
        h = self.net.stem_for(task)(x)  # (B, C, H, W)
        for pos in range(weights.shape[0]):
            h = self.mixing(self.net.blocks, h, weights[pos], self.net.slot(task, pos))
        return self.net.head_for(task)(h)


class PositionalBatchNorm2dHolder(nn.Module):
    """Buffers shaped like one block's, holding the mixed block's statistics (weight mixing)."""

    def __init__(self, net: CompositionalNet) -> None:
        super().__init__()
        block = net.blocks[0]
        for name, module in block.named_children():
            if isinstance(module, PositionalBatchNorm2d):
                holder = nn.Module()
                for buf, value in module.named_buffers():
                    holder.register_buffer(buf, value.detach().clone())
                self.add_module(name, holder)


@dataclass
class TrainResult:
    """What :func:`train_bank` produced.

    Attributes:
        config: The resolved settings.
        out: The run folder.
        bank: The trained bank, reloaded from ``out/bank.safetensors`` (task 0's view).
        orders: Task name -> hardened order.
        metrics: Task name -> accuracies of the soft and hardened orders and top weights.
        history: Per-epoch metrics.
        files: Name -> path of every output.
        seconds: Wall time.
    """

    config: TrainConfig
    out: Path
    bank: Bank
    orders: dict[str, Order]
    metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def train_bank(
    tasks: TrainConfig | Sequence[str | TaskSpec] | str,
    *,
    out: str | Path = "runs/train",
    progress: Progress | None = None,
    resume: bool = True,
    **settings: Any,
) -> TrainResult:
    """Train K shared blocks on several tasks with per-task soft orders, harden, save a bank.

    Args:
        tasks: A :class:`TrainConfig`, or the tasks (data specs, ``name=spec``, or
            :class:`TaskSpec`) with the other settings as keywords.
        out: Run folder: ``bank.safetensors`` (+ ``.json`` header), ``orders/<task>.json``,
            ``mixing.npz``, ``mixing_final.png``, ``mixing_strip.png``, ``report.md``,
            ``history.json``, ``config.json`` and ``checkpoint.pt``.
        progress: Called with ``(stage, done, total)`` after every epoch.
        resume: Continue from ``out/checkpoint.pt`` when it was written with the same settings.
        **settings: :class:`TrainConfig` fields (``arch``, ``n_blocks``, ``depth``, ...),
            overriding those of a given config.

    Example:
        >>> result = train_bank(["digits:n=200", "digits:invert,n=200"], arch="isoresnet:width=8",
        ...                     n_blocks=3, depth=4, epochs=1, out=tempfile.mkdtemp())  # doctest: +SKIP
        >>> sorted(result.orders)  # doctest: +SKIP
        ['digits_invert_n_200', 'digits_n_200']
    """
    if isinstance(tasks, TrainConfig):
        config = tasks.with_overrides(settings) if settings else tasks
    else:
        config = TrainConfig.from_dict({"tasks": [tasks] if isinstance(tasks, str) else list(tasks), **settings})
    if not config.tasks:
        raise OrderSearchError("train_bank needs at least one task")
    if config.warm_start:
        from ._finetune import finetune_from_config

        return finetune_from_config(config, out=out, progress=progress)
    return _Run(config, Path(out), progress).run(resume)


class _Run:
    """One training run: data, model, optimiser, the epoch loop and the final outputs."""

    def __init__(self, config: TrainConfig, out: Path, progress: Progress | None) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if config.device == "auto" else config.device))

    # --- setup --------------------------------------------------------------------------
    def _setup(self) -> None:
        from ..data import load

        c = self.config
        self.data = [load(t.data, c.block_arch.data_config, seed=c.seed) for t in c.tasks]
        classes = [d.num_classes for d in self.data]
        if any(n is None for n in classes):
            raise OrderSearchError("every task needs labelled data")
        if c.head == "shared" and len(set(classes)) > 1:
            raise OrderSearchError(f"a shared head needs tasks with one class count; got {classes}")
        n_tasks = len(c.tasks)
        self.arch = CompositionalConfig(
            blocks=c.n_blocks, depth=c.resolved_depth, tasks=n_tasks,
            classes=tuple(classes[:1] if c.head == "shared" else classes),
            stems=1 if c.stem == "shared" else n_tasks, norm=c.resolved_norm, affine=c.affine,
            skip=c.skip, **asdict(c.block_arch),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            net = CompositionalNet(self.arch)
        fixed = list(c.fixed_orders().values())
        with torch.no_grad():
            for t, order in enumerate(fixed):
                if order is not None:  # logits that state the fixed order (they are not trained)
                    net.logits[t].fill_(-10.0)
                    net.logits[t, torch.arange(len(order)), torch.tensor(order.to_list())] = 10.0
        self.model = SoftOrderModel(net, mixing=c.mixing, fixed=fixed).to(self.device)
        self.train_xy = [(d.train[0].to(self.device), d.train[1].to(self.device)) for d in self.data]
        self.steps_per_epoch = max(math.ceil(len(x) / c.batch_size) for x, _ in self.train_xy)
        total_steps = max(1, (c.epochs + c.harden_epochs) * self.steps_per_epoch)
        logits = [net.logits] if c.soft else []
        others = [p for n, p in net.named_parameters() if n != "logits"]
        self.opt = torch.optim.AdamW(
            [{"params": others, "lr": c.lr, "weight_decay": c.weight_decay},
             {"params": logits, "lr": c.order_lr, "weight_decay": 0.0}]
        )
        warmup = c.warmup_epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, [partial(_lr_factor, total=total_steps, warmup=warmup), partial(_lr_factor, total=total_steps)]
        )
        self.gen = torch.Generator().manual_seed(c.seed + 1)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.snapshots: list[torch.Tensor] = [self._snapshot(self.temperature(0))]
        self.temps: list[float] = [self.temperature(0)]
        self.transition: dict[str, Any] | None = None

    def temperature(self, step: int) -> float:
        """Softmax temperature at global step ``step`` (the end value once the soft phase is over)."""
        soft_steps = max(1, self.config.epochs * self.steps_per_epoch)
        return self.config.temperature(step / soft_steps)

    def _snapshot(self, temperature: float) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([
                self.model.weights(t, temperature, prune=self.config.prune).detach().cpu()
                for t in range(len(self.config.tasks))
            ])  # (T, L, choices)

    # --- checkpoints --------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save_checkpoint(self) -> None:
        state = {
            "config": self.config.resolved(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "history": self.history,
            "snapshots": torch.stack(self.snapshots),
            "temps": self.temps,
            "transition": self.transition,
            "hard": [None if o is None else o.to_list() for o in self.model.hard],
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state.get("config") != self.config.resolved():
            raise OrderSearchError(
                f"{self.checkpoint_path} was written with other settings; use another out folder, "
                "or start over with --restart (Python: resume=False)"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.snapshots = list(state["snapshots"].cpu().unbind(0))
        self.temps = list(state["temps"])
        self.transition = state["transition"]
        self.model.hard = [None if o is None else Order(o) for o in state["hard"]]
        log.info("resuming %s at epoch %d", self.checkpoint_path, self.epoch)
        return True

    # --- the loop -----------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        with torch_threads(self.config.resolved()["resolved"]["threads"]):
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        start = time.perf_counter()
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "config.json", json.dumps(c.resolved(), indent=2) + "\n")
        self._setup()
        if not (resume and self._load_checkpoint()) and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
        total = c.epochs + c.harden_epochs
        while self.epoch < total or self.transition is None:
            if self.epoch >= c.epochs and self.transition is None:
                self._harden()
                if c.checkpoint_every:
                    self._save_checkpoint()
                continue
            metrics = self._train_epoch()
            self.epoch += 1
            self.history.append(metrics)
            self.snapshots.append(self._snapshot(metrics["temperature"]))
            self.temps.append(metrics["temperature"])
            log.info("epoch %d/%d: %s", self.epoch, total, _brief(metrics))
            if c.checkpoint_every and (self.epoch % c.checkpoint_every == 0 or self.epoch == total):
                self._save_checkpoint()
            if self.progress is not None:
                acc = sum(metrics["val_accuracy"].values()) / len(metrics["val_accuracy"])
                self.progress(f"train (loss {metrics['loss']:.3f}, val acc {acc:.3f})", self.epoch, total)
        from ._outputs import write_outputs

        result = write_outputs(self)
        result.seconds = time.perf_counter() - start
        return result

    def _batches(self, task: int) -> list[torch.Tensor]:
        """This epoch's index batches of ``task``: every task makes ``steps_per_epoch`` steps."""
        n, b = len(self.train_xy[task][0]), self.config.batch_size
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch * 1009 + task)
        need = self.steps_per_epoch * min(b, n)
        idx = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])
        step = min(b, n)
        return [idx[i * step:(i + 1) * step] for i in range(self.steps_per_epoch)]

    def _train_epoch(self) -> dict[str, Any]:
        c, model = self.config, self.model
        hard_phase = self.epoch >= c.epochs
        model.train()
        batches = [self._batches(t) for t in range(len(c.tasks))]
        loss_sum, ent_sum = 0.0, 0.0
        temperature = self.temperature(self.epoch * self.steps_per_epoch)
        for i in range(self.steps_per_epoch):
            step = self.epoch * self.steps_per_epoch + i
            temperature = self.temperature(step)
            losses, ents = [], []
            for t, (x, y) in enumerate(self.train_xy):
                idx = batches[t][i].to(self.device)
                if model.order_of(t) is None and not hard_phase:
                    w = model.weights(t, temperature, gumbel=c.gumbel, prune=c.prune, generator=self.gen)
                    ents.append(entropy(w))
                    logits = model(x[idx], t, weights=w)
                else:
                    logits = model(x[idx], t)
                losses.append(self.loss_fn(logits, y[idx]))
            loss = torch.stack(losses).mean()
            if ents and c.entropy:
                loss = loss + c.entropy * torch.stack(ents).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum += loss.item()
            ent_sum += torch.stack(ents).mean().item() if ents else 0.0
        val = {t.name: self.accuracy(i, "val", temperature) for i, t in enumerate(c.tasks)}
        top = {t.name: top_weight(self.model.weights(i, temperature, prune=c.prune).detach())
               for i, t in enumerate(c.tasks)}
        return {"epoch": self.epoch + 1, "phase": "harden" if hard_phase else "soft",
                "loss": loss_sum / self.steps_per_epoch, "entropy": ent_sum / self.steps_per_epoch,
                "temperature": temperature, "val_accuracy": val, "top_weight": top}

    @torch.no_grad()
    def accuracy(self, task: int, split: str, temperature: float, *, soft: bool | None = None) -> float:
        """Accuracy of ``task`` on ``split``: its current order, or (``soft=True``) its soft order."""
        x, y = self.data[task].split(split)
        model = self.model
        was = model.training
        model.eval()
        weights = None
        if soft or (soft is None and model.order_of(task) is None):
            weights = model.weights(task, temperature, prune=self.config.prune)
        correct = 0
        for i in range(0, len(x), 512):
            xb = x[i:i + 512].to(self.device)
            correct += int((model(xb, task, weights=weights).argmax(1).cpu() == y[i:i + 512]).sum())
        model.train(was)
        return correct / max(1, len(x))

    # --- hardening ----------------------------------------------------------------------
    def _harden(self) -> None:
        """Score the soft orders, harden them, re-estimate statistics, score the hard orders."""
        c, model = self.config, self.model
        t_end = c.temperature(1.0)
        soft: dict[str, Any] = {}
        for i, task in enumerate(c.tasks):
            if model.fixed[i] is not None:
                soft[task.name] = None
                continue
            w = model.weights(i, t_end, prune=c.prune).detach()
            soft[task.name] = {
                "val_accuracy": self.accuracy(i, "val", t_end, soft=True),
                "test_accuracy": self.accuracy(i, "test", t_end, soft=True),
                "top_weight": top_weight(w),
                "min_top_weight": float(w.max(-1).values.min()),
            }
            model.hard[i] = harden(w.cpu(), c.n_blocks)
        if c.recalibrate:
            recalibrate(model.net, [model.order_of(i) for i in range(len(c.tasks))], self.train_xy,
                        batch_size=max(c.batch_size, 256))
        hard = {task.name: {"order": model.order_of(i).to_list(),
                            "val_accuracy": self.accuracy(i, "val", t_end),
                            "test_accuracy": self.accuracy(i, "test", t_end)}
                for i, task in enumerate(c.tasks)}
        self.transition = {"soft": soft, "hardened": hard}
        log.info("hardened orders: %s", {k: "-".join(map(str, v["order"])) for k, v in hard.items()})


@torch.no_grad()
def recalibrate(net: CompositionalNet, orders: Sequence[Order], train: Sequence[tuple[torch.Tensor, torch.Tensor]],
                *, batch_size: int = 256) -> None:
    """Re-estimate the BatchNorm statistics that ``orders`` use (block slots and heads) on the
    training images of each task, as a cumulative average (no gradient steps).

    After hardening, a block at a position sees the hard order's activations instead of the
    soft mixture's; its slot statistics are re-estimated so that the bank runs the hard order
    with statistics that match it.
    """
    norms: list[tuple[nn.Module, int | None]] = []
    for t, order in enumerate(orders):
        for pos, k in enumerate(order):
            slot = net.slot(t, pos)
            norms += [(m, slot) for m in net.blocks[k].modules() if isinstance(m, PositionalBatchNorm2d)]
        norms += [(m, None) for m in net.head_for(t).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # LayerNorm (vit blocks): no statistics to re-estimate
        return
    saved = {}
    for module, slot in norms:
        if slot is None:
            module.reset_running_stats()
        else:
            module.reset_slot(slot)
        saved[id(module)] = (module, module.momentum)
        module.momentum = None
    was = net.training
    net.train()
    try:
        for t, order in enumerate(orders):
            x = train[t][0]
            for i in range(0, len(x), batch_size):
                net.run_order(x[i:i + batch_size], order, t)
    finally:
        for module, momentum in saved.values():
            module.momentum = momentum
        net.train(was)


def _lr_factor(step: int, *, total: int, warmup: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine decay
    to zero at ``total`` (the order logits decay without warm-up)."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return cosine * min(1.0, (step + 1) / warmup) if warmup > 0 else cosine


def _brief(metrics: dict[str, Any]) -> str:
    acc = ", ".join(f"{k} {v:.3f}" for k, v in metrics["val_accuracy"].items())
    return f"loss {metrics['loss']:.4f}, T {metrics['temperature']:.3g}, val {acc}"

