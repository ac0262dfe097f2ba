"""Outputs of a training run: the bank, order specs, mixing arrays and plots, the report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._io import atomic_path, write_atomic
from ..adapters import bank_from_model, load_bank
from ..order import Order
from ..spec import save_order

if TYPE_CHECKING:
    from ._multitask import TrainResult, _Run

__all__ = ["plot_mixing", "plot_mixing_strip", "write_outputs"]

log = logging.getLogger("ordersearch")


def write_outputs(run: _Run) -> TrainResult:
    """Save the bank, order specs, mixing weights (npz + PNG), history and ``report.md``."""
    from ._multitask import TrainResult

    c, out, model = run.config, run.out, run.model
    names = [t.name for t in c.tasks]
    final = {
        name: {"val_accuracy": run.accuracy(i, "val", c.temperature(1.0)),
               "test_accuracy": run.accuracy(i, "test", c.temperature(1.0))}
        for i, name in enumerate(names)
    }
    net = model.net.cpu().eval()
    orders = {name: model.order_of(i) for i, name in enumerate(names)}
    net.source_orders = dict(orders)
    bank = bank_from_model(net, source=net.config.source())
    bank_path = bank.save(out / "bank.safetensors")
    bank = load_bank(bank_path)

    metrics: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {"bank": bank_path}
    for i, task in enumerate(c.tasks):
        soft = run.transition["soft"][task.name]
        hard = run.transition["hardened"][task.name]
        m: dict[str, Any] = {"order": str(orders[task.name]), "data": run.data[i].spec, "fixed": soft is None}
        if soft is not None:
            m.update({"soft_val_accuracy": soft["val_accuracy"], "soft_test_accuracy": soft["test_accuracy"],
                      "top_weight": soft["top_weight"], "min_top_weight": soft["min_top_weight"]})
        m.update({"hardened_val_accuracy": hard["val_accuracy"], "hardened_test_accuracy": hard["test_accuracy"]})
        if soft is not None:
            m["hardening_cost_test"] = soft["test_accuracy"] - hard["test_accuracy"]
        m.update({"final_val_accuracy": final[task.name]["val_accuracy"],
                  "final_test_accuracy": final[task.name]["test_accuracy"]})
        metrics[task.name] = m
        files[f"order:{task.name}"] = save_order(
            out / "orders" / f"{task.name}.json", bank, orders[task.name],
            objective="accuracy", score=m["final_val_accuracy"], searcher="train", data=run.data[i].spec,
            metrics={k: v for k, v in m.items() if isinstance(v, float)}, task=task.name, task_index=i,
        )

    weights = torch.stack(run.snapshots).numpy()  # (E+1, T, L, choices)
    with atomic_path(out / "mixing.npz") as tmp:
        np.savez(tmp, weights=weights, temperatures=np.asarray(run.temps),
                 epochs=np.arange(len(run.snapshots)), tasks=np.asarray(names), n_blocks=c.n_blocks, skip=c.skip)
    files["mixing"] = out / "mixing.npz"
    files["heatmaps"] = plot_mixing(weights[-1], names, c.n_blocks, out / "mixing_final.png",
                                    orders=[orders[n] for n in names])
    files["strip"] = plot_mixing_strip(weights, names, c.n_blocks, out / "mixing_strip.png", temps=run.temps)
    write_atomic(out / "history.json", json.dumps(run.history, indent=2) + "\n")
    files["history"] = out / "history.json"
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    files["metrics"] = out / "metrics.json"
    files["config"] = out / "config.json"
    files["report"] = _write_report(run, bank, metrics, out / "report.md")
    if run.checkpoint_path.exists():
        files["checkpoint"] = run.checkpoint_path
    return TrainResult(config=c, out=out, bank=bank, orders=orders, metrics=metrics,
                       history=run.history, files=files)


def _choice_labels(n_blocks: int, choices: int) -> list[str]:
    return [str(k) for k in range(n_blocks)] + (["skip"] if choices > n_blocks else [])


def plot_mixing(weights: np.ndarray, names: Sequence[str], n_blocks: int, path: Path,
                *, orders: Sequence[Order] | None = None) -> Path:
    """Per-task heatmaps (position x block) of mixing weights ``(T, L, choices)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tasks, depth, choices = weights.shape
    fig, axes = plt.subplots(1, n_tasks, figsize=(1.2 + 0.55 * choices * n_tasks + 0.4 * n_tasks, 0.8 + 0.4 * depth),
                             squeeze=False)
    for t, ax in enumerate(axes[0]):
        ax.imshow(weights[t], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for p in range(depth):
            for k in range(choices):
                v = weights[t, p, k]
                if v >= 0.05:
                    ax.text(k, p, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
        ax.set_xticks(range(choices), _choice_labels(n_blocks, choices))
        ax.set_yticks(range(depth))
        ax.set_xlabel("block")
        if t == 0:
            ax.set_ylabel("position")
        title = names[t] if orders is None else f"{names[t]}\n{orders[t]}"
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def plot_mixing_strip(weights: np.ndarray, names: Sequence[str], n_blocks: int, path: Path,
                      *, temps: Sequence[float] | None = None, columns: int = 8) -> Path:
    """A strip over training: per task (rows), heatmaps at evenly spaced epochs (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_snap, n_tasks, depth, choices = weights.shape
    picks = sorted(set(np.linspace(0, n_snap - 1, min(columns, n_snap)).round().astype(int).tolist()))
    fig, axes = plt.subplots(n_tasks, len(picks), figsize=(0.3 * choices * len(picks) + 1.5, (0.25 * depth + 0.5) * n_tasks + 0.4),
                             squeeze=False)
    for t in range(n_tasks):
        for j, e in enumerate(picks):
            ax = axes[t][j]
            ax.imshow(weights[e, t], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_title(f"ep {e}" + (f"\nT={temps[e]:.2g}" if temps is not None else ""), fontsize=7)
            if j == 0:
                ax.set_ylabel(names[t], fontsize=7)
    fig.suptitle("mixing weights over training (rows: tasks; each cell: position x block)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _write_report(run: _Run, bank: Any, metrics: dict[str, dict[str, Any]], path: Path) -> Path:
    c = run.config
    arch = run.arch
    per_block = bank.block_parameters()
    stat_extra = sum(b.numel() for n, b in bank.blocks[0].named_buffers() if "running" in n)
    lines = [
        "# Bank training report",
        "",
        f"- tasks: {', '.join(f'`{t.name}` ({t.data})' for t in c.tasks)}",
        f"- bank: `{arch.source()}`",
        f"- K = {c.n_blocks} blocks, depth L = {arch.depth}, mixing over {c.mixing}, "
        f"norm statistics per {arch.norm}, affine {arch.affine}, skip {'on' if c.skip else 'off'}",
        f"- stems: {c.stem}, heads: {c.head}; epochs {c.epochs} soft + {c.harden_epochs} hardened; "
        f"temperature {c.temperature.start} → {c.temperature.end} ({c.temperature.shape}); "
        f"gumbel {c.gumbel}, entropy {c.entropy}, prune {c.prune}; seed {c.seed}",
        f"- parameters per block: {per_block:,} (running statistics per block: {stat_extra:,} values "
        f"in {arch.slots} slot(s))",
        f"- fingerprint `{bank.fingerprint[:16]}`",
        "",
        "## Accuracy of soft and hardened orders (%)",
        "",
        "Soft: the mixing weights at the final temperature. Hardened: the argmax order, with "
        "per-position statistics re-estimated" + ("" if c.recalibrate else " (off)") + ". "
        "Final: after the hardened epochs (equal to hardened when there are none). "
        "Cost: soft minus hardened test accuracy. Top weight: mean over positions of the largest "
        "mixing weight at the final temperature (1.0 = fully hard).",
        "",
        "| task | hardened order | soft val | soft test | hardened val | hardened test | cost | final test | top weight | min top weight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        order = m["order"] + (" (fixed)" if m["fixed"] else "")
        cost = m.get("hardening_cost_test")
        lines.append(
            f"| {name} | `{order}` | {_pct(m.get('soft_val_accuracy'))} | {_pct(m.get('soft_test_accuracy'))} | "
            f"{_pct(m['hardened_val_accuracy'])} | {_pct(m['hardened_test_accuracy'])} | "
            f"{'—' if cost is None else f'{100 * cost:+.1f}'} | {_pct(m['final_test_accuracy'])} | "
            f"{_num(m.get('top_weight'))} | {_num(m.get('min_top_weight'))} |"
        )
    lines += ["", "## Block use", "", "| block | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for k in range(c.n_blocks):
        cells = []
        for m in metrics.values():
            pos = [str(p) for p, b in enumerate(Order.parse(m["order"])) if b == k]
            cells.append(",".join(pos) or "·")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Cells list the positions at which a task runs the block.", "",
              "Files: `bank.safetensors`, `orders/<task>.json`, `mixing.npz` (weights over training, "
              "shape epochs+1 × tasks × positions × choices), `mixing_final.png`, `mixing_strip.png`, "
              "`history.json`, `metrics.json`, `config.json`.", ""]
    return write_atomic(path, "\n".join(lines))
