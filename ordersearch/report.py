"""Exports of a search: the best order spec(s), the trials table, ``report.md`` and plots.

Everything is read back from the Optuna study (its trials and user attributes), so
``ordersearch export`` writes the same files for any existing study as the search did.
Plots are PNGs drawn with matplotlib's Agg backend: score over trials, the best order as a
block strip, the score-depth Pareto front (``nsga2``) and the learned mixing weights
(``differentiable``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from .order import Order
from .search._encoding import order_of
from .search._result import best_trials, pareto_trials, trials_table
from .search._study import STUDY_META
from .spec import OrderSpec, save_order

__all__ = ["held_out_scores", "split_half_reliability", "write_outputs"]

log = logging.getLogger("ordersearch")


# --- measurements the report shows -------------------------------------------------------


def split_half_reliability(
    bank: Any, evalset: Any, objective: Any, orders: Sequence[Order], **engine_kwargs: Any
) -> dict[str, Any]:
    """Spearman correlation of the objective over ``orders`` between two disjoint halves of
    ``evalset``: how far the ranking of orders is signal rather than noise of the data."""
    from .engine import Engine

    orders = list(dict.fromkeys(orders))
    halves = evalset.halves()
    values = []
    for half in halves:
        engine = Engine(bank, half, objective, **engine_kwargs)
        values.append([s.value if s.ok else math.nan for s in engine.evaluate(orders)])
    frame = pd.DataFrame({"a": values[0], "b": values[1]}).dropna()
    with warnings.catch_warnings():  # constant scores (e.g. all orders perfect): rho is undefined
        warnings.simplefilter("ignore")
        rho = float(frame["a"].corr(frame["b"], method="spearman")) if len(frame) >= 3 else math.nan
    return {"spearman": None if math.isnan(rho) else rho, "n_orders": len(frame), "half_size": len(halves[0])}


def held_out_scores(bank: Any, evalset: Any, objective: Any, orders: Sequence[Order], **engine_kwargs: Any) -> dict[str, Any]:
    """The objective and side metrics of ``orders`` on held-out data (e.g. a test split)."""
    from .engine import Engine

    engine = Engine(bank, evalset, objective, **engine_kwargs)
    out: dict[str, Any] = {"data": getattr(evalset, "name", ""), "n": len(evalset), "orders": {}}
    for s in engine.evaluate(list(dict.fromkeys(orders))):
        out["orders"][str(s.order)] = {"value": s.value if s.ok else None, "metrics": dict(s.metrics)}
    return out


# --- writing -----------------------------------------------------------------------------


def write_outputs(study: optuna.Study, out: str | Path, *, bank: Any = None, top: int = 1,
                  plots: bool = True) -> dict[str, Path]:
    """Write ``best_order.json`` (and ``orders/rank<i>.json`` for ``top`` > 1), ``trials.csv``,
    ``report.md`` and the PNG plots of ``study`` to ``out``; returns the paths by name.

    Args:
        study: A study made by :func:`ordersearch.search.search`.
        out: Output folder (created).
        bank: The bank, when at hand: specs are then written by :func:`ordersearch.save_order`
            from the bank itself; otherwise from the bank description kept in the study.
        top: How many best orders to export.
        plots: Draw the PNG plots.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = study.user_attrs.get(STUDY_META) or {}
    best = best_trials(study, max(1, top))
    if not best:
        from .search._base import SearchError

        raise SearchError(f"study {study.study_name!r} has no completed trial to export")
    files: dict[str, Path] = {}
    files["spec"] = _spec(out / "best_order.json", study, best[0], bank, meta, rank=1)
    if top > 1:
        for i, t in enumerate(best, 1):
            files[f"rank{i}"] = _spec(out / "orders" / f"rank{i}.json", study, t, bank, meta, rank=i)
    table = trials_table(study)
    files["trials"] = out / "trials.csv"
    table.to_csv(files["trials"], index=False)
    if plots:
        files.update(_plots(study, table, best[0], out, meta))
    files["report"] = out / "report.md"
    files["report"].write_text(_report(study, table, best, meta, files))
    return files


def _spec(path: Path, study: optuna.Study, trial: Any, bank: Any, meta: dict[str, Any], *, rank: int) -> Path:
    order = order_of(trial)
    info = dict(
        objective=meta.get("objective"), score=trial.values[0], metrics=trial.user_attrs.get("metrics") or {},
        searcher=meta.get("searcher"), study=study.study_name, data=(meta.get("data") or {}).get("name"),
        trial=trial.number, rank=rank, depth_objective=len(order) if len(study.directions) > 1 else None,
    )
    if bank is not None:
        return save_order(path, bank, order, **info)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    known = {k: info.pop(k) for k in ("objective", "score", "metrics", "searcher", "study", "data")}
    spec = OrderSpec(order=order, bank=dict(meta.get("bank") or {}), created=created, metadata=info, **known)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return path


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _report(study: optuna.Study, table: pd.DataFrame, best: list[Any], meta: dict[str, Any],
            files: dict[str, Path]) -> str:
    attrs = study.user_attrs
    ident = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)
    rows = [("identity", ident), ("best", best[0])]
    metric_names = sorted({k for _, t in rows if t is not None for k in (t.user_attrs.get("metrics") or {})})
    held = attrs.get("held_out") or {}
    lines = [f"# Order search: {meta.get('searcher')} on {(meta.get('data') or {}).get('name') or 'the EvalSet'}", ""]
    lines += [f"Study `{study.study_name}`, objective `{meta.get('objective')}`, bank "
              f"`{(meta.get('bank') or {}).get('source') or (meta.get('bank') or {}).get('adapter')}` "
              f"(fingerprint `{str(meta.get('fingerprint', ''))[:12]}`), order space `{json.dumps(meta.get('space'))}`.", ""]
    head = ["", "order", "depth", "score", *metric_names]
    held_metrics = sorted({k for v in (held.get("orders") or {}).values() for k in (v.get("metrics") or {})})
    if held:
        head.append(f"held-out score ({held.get('data')}, n={held.get('n')})")
        head += [f"held-out {k}" for k in held_metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t in rows:
        if t is None:
            continue
        o = order_of(t)
        m = t.user_attrs.get("metrics") or {}
        cells = [label, f"`{o}`", str(len(o)), _fmt(t.values[0] if t.values else None), *[_fmt(m.get(k)) for k in metric_names]]
        if held:
            h = held.get("orders", {}).get(str(o)) or {}
            cells.append(_fmt(h.get("value")))
            cells += [_fmt((h.get("metrics") or {}).get(k)) for k in held_metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if ident is not None and ident.values:
        lines += ["", f"Best minus identity: {best[0].values[0] - ident.values[0]:+.4f}."]
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    lines += ["", f"Trials: {len(table)} ({', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))})."]
    st = attrs.get("engine_stats") or {}
    if st.get("block_evals"):
        lines.append(f"Block forwards: {st['block_evals']:.0f} run, {st['naive_block_evals']:.0f} without the "
                     f"prefix cache ({st['naive_block_evals'] / st['block_evals']:.1f}x saved), "
                     f"{st['min_block_evals']:.0f} with an unlimited cache.")
    rel = attrs.get("reliability")
    if rel:
        rho = rel.get("spearman")
        verdict = ("differences between orders are mostly noise of the data: trust only large gaps"
                   if rho is None or rho < 0.5 else "the ranking of orders is largely reproducible")
        lines.append(f"Split-half reliability of the objective: Spearman {_fmt(rho)} over {rel.get('n_orders')} "
                     f"orders scored on two disjoint halves of {rel.get('half_size')} images ({verdict}).")
    lines += ["", "## Best orders", "", "| rank | trial | order | depth | score |", "|---|---|---|---|---|"]
    for i, t in enumerate(best_trials(study, 10), 1):
        o = order_of(t)
        lines.append(f"| {i} | {t.number} | `{o}` | {len(o)} | {t.values[0]:.4f} |")
    if len(study.directions) > 1:
        lines += ["", "## Pareto front (score up, depth down)", "", "| order | depth | score |", "|---|---|---|"]
        for t in pareto_trials(study):
            o = order_of(t)
            lines.append(f"| `{o}` | {len(o)} | {t.values[0]:.4f} |")
    pngs = [p for k, p in files.items() if p.suffix == ".png"]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(study: optuna.Study, table: pd.DataFrame, best: Any, out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    files = {"plot_scores": _plot_scores(table, out / "score_over_trials.png"),
             "plot_best": _plot_strip(order_of(best), int((meta.get("bank") or {}).get("n_blocks") or 0),
                                      out / "best_order.png")}
    if len(study.directions) > 1:
        files["plot_pareto"] = _plot_pareto(study, table, out / "pareto_front.png")
    diff = study.user_attrs.get("differentiable")
    if diff:
        files["plot_mixing"] = _plot_mixing(diff, out / "mixing_weights.png")
    return files


def _plot_scores(table: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    done = table[table["state"] == "COMPLETE"]
    pruned = table[table["state"] == "PRUNED"]
    ax.scatter(done["number"], done["value"], s=10, label="trial")
    if len(pruned):
        ax.scatter(pruned["number"], pruned["value"], s=10, c="lightgrey", label="pruned (low fidelity)")
    if len(done):
        ax.step(done["number"], done["value"].cummax(), where="post", c="C1", label="best so far")
        base = done[done["baseline"].eq(True)] if "baseline" in done else done.iloc[:0]
        if len(base):
            ax.axhline(float(base["value"].iloc[0]), ls="--", c="grey", lw=1, label="identity")
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_strip(order: Order, n_blocks: int, path: Path) -> Path:
    plt = _plt()
    n_blocks = max(n_blocks, max(order, default=0) + 1)
    cmap = plt.get_cmap("tab20" if n_blocks > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(max(2.5, 0.55 * len(order) + 1), 1.1))
    for pos, b in enumerate(order):
        ax.add_patch(plt.Rectangle((pos, 0), 0.92, 0.92, color=cmap(b % cmap.N)))
        ax.text(pos + 0.46, 0.46, str(b), ha="center", va="center", fontsize=10, color="white", weight="bold")
    ax.set_xlim(-0.1, max(len(order), 1))
    ax.set_ylim(-0.1, 1.0)
    ax.axis("off")
    ax.set_title(f"best order {order} (depth {len(order)}, blocks 0..{n_blocks - 1})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pareto(study: optuna.Study, table: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    done = table[table["state"] == "COMPLETE"]
    ax.scatter(done["depth"], done["value"], s=10, c="lightgrey", label="trials")
    front = pareto_trials(study)
    xs = [len(order_of(t)) for t in front]
    ys = [t.values[0] for t in front]
    ax.plot(xs, ys, "o-", c="C3", ms=4, label="Pareto front")
    ax.set_xlabel("depth (blocks run)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_mixing(info: dict[str, Any], path: Path) -> Path:
    import numpy as np

    plt = _plt()
    w = np.asarray(info["weights"])  # (L, choices)
    labels = ["skip" if c < 0 else str(c) for c in info["choices"]]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * w.shape[1], 0.8 + 0.4 * w.shape[0]))
    ax.imshow(w, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for p in range(w.shape[0]):
        for k in range(w.shape[1]):
            if w[p, k] >= 0.05:
                ax.text(k, p, f"{w[p, k]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if w[p, k] > 0.6 else "white")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(w.shape[0]))
    ax.set_xlabel("block")
    ax.set_ylabel("free position")
    ax.set_title("learned mixing weights (final temperature)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
