"""The files of a search run, rendered from its :class:`~ordersearch.search.JobResult`.

``write_outputs`` writes the chosen order's spec (and ``orders/rank<i>.json`` for more), the
trials table, ``report.md`` (the verdict line first, then every finalist's search, select and
test scores, the winner's-curse gap, reliability and cost) and PNG plots: score over trials,
the chosen order as a block strip, the score-depth Pareto front (``nsga2``) and the learned
mixing weights (``differentiable``). It builds no engine and scores nothing: ``ordersearch
export`` renders the same files from the result a finished job left in its study.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ._io import atomic_path, write_atomic
from .order import Order
from .search import JobResult, best_trials, order_of, pareto_trials, trials_table
from .spec import save_order

__all__ = ["report_text", "write_outputs"]


def write_outputs(result: JobResult, out: str | Path, *, bank: Any = None, top: int = 1,
                  plots: bool = True) -> dict[str, Path]:
    """Write ``best_order.json`` (the chosen order; with ``top`` > 1 also the next finalists as
    ``orders/rank<i>.json``), ``trials.csv``, ``report.md`` and the PNG plots to ``out``.

    Args:
        result: A finished job's result (with its study for the trials table and plots).
        out: Output folder (created).
        bank: The bank, when at hand (else the description the result keeps is recorded).
        top: How many orders to export, best on *select* first.
        plots: Draw the PNG plots.

    Returns:
        The paths written, by name (``spec``, ``trials``, ``report``, ``plot_*``, ``rank<i>``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    ranked = _ranked(result)
    files["spec"] = _spec(out / "best_order.json", result, ranked[0], bank, rank=1)
    if top > 1:
        for i, order in enumerate(ranked[:top], 1):
            files[f"rank{i}"] = _spec(out / "orders" / f"rank{i}.json", result, order, bank, rank=i)
    table = trials_table(result.study) if result.study is not None else pd.DataFrame()
    files["trials"] = out / "trials.csv"
    write_atomic(files["trials"], table.to_csv(index=False))
    if plots and result.study is not None:
        files.update(_plots(result, table, out))
    files["report"] = out / "report.md"
    write_atomic(files["report"], report_text(result, files))
    return files


def _ranked(result: JobResult) -> list[Order]:
    """Finalists best on select first (the chosen order leads), then the study's other orders
    by search score."""
    orders = [result.chosen.order] + [f.order for f in result.finalists if f.order != result.chosen.order]
    if result.study is not None:
        orders += [o for o in (order_of(t) for t in best_trials(result.study, 50)) if o is not None and o not in orders]
    return orders


def _spec(path: Path, result: JobResult, order: Order, bank: Any, *, rank: int) -> Path:
    f = next((f for f in result.finalists if f.order == order), None)
    metrics: dict[str, Any] = {}
    if f is not None:
        metrics = {"search_score": f.search, "select_score": f.select}
        if result.truth is not None:
            metrics[f"test_{result.truth}"] = f.test
    elif result.study is not None:
        trial = next(t for t in best_trials(result.study, 50) if order_of(t) == order)
        metrics = {"search_score": trial.values[0], **(trial.user_attrs.get("metrics") or {})}
    evidence = {
        "verdict": result.verdict if order == result.chosen.order else None,
        "summary": result.summary() if order == result.chosen.order else None,
        "baseline": str(result.baseline.order), "baseline_name": result.baseline_name,
        "select_interval": result.select_interval.to_dict() if order == result.chosen.order else None,
        "test_interval": (result.test_interval.to_dict()
                          if result.test_interval is not None and order == result.chosen.order else None),
        "winners_curse": result.winners_curse if order == result.chosen.order else None,
        "sizes": result.sizes, "finalists": [x.to_dict() for x in result.finalists],
    }
    return save_order(
        path, bank if bank is not None else result.bank, order,
        objective=result.objective, score=None if f is None else f.select, score_split="select",
        metrics=metrics, searcher=result.settings.get("searcher"), study=result.settings.get("study"),
        data=result.settings.get("data"), rank=rank, evidence=evidence,
        depth_objective=len(order) if result.study is not None and len(result.study.directions) > 1 else None,
    )


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report_text(result: JobResult, files: dict[str, Path] | None = None) -> str:
    """``report.md``: the verdict line first, then the evidence behind it."""
    s, bank = result.settings, result.bank
    sizes = result.sizes
    truth = result.truth or "—"
    lines = [f"# Order search: {s.get('searcher')} on `{s.get('data')}`", "", f"**{result.summary()}**", ""]
    lines += [
        f"Study `{s.get('study')}`, objective `{result.objective}`, bank `{bank.get('source') or bank.get('adapter')}` "
        f"(fingerprint `{str(bank.get('fingerprint', ''))[:12]}`), order space `{json.dumps(s.get('space'))}`, "
        f"engine `{json.dumps(s.get('engine'))}`, seed {s.get('seed')}.",
        "",
        f"Images: {sizes.get('search', 0)} *search* (the only ones the searcher saw), {sizes.get('select', 0)} "
        f"*select* (the finalists are re-scored there and the best is returned), "
        + (f"{sizes['test']} labelled *test* (judged, never used to choose)." if sizes.get("test")
           else "no labelled *test* images (the verdict is read on *select*)."),
    ]
    lines += [f"- {n}" for n in result.notes]
    lines += ["", "## Finalists", "",
              f"The best {len(result.finalists) - 1} distinct orders by search score and the {result.baseline_name}, "
              f"re-scored on *select*; best on *select* first.", "",
              f"| | order | depth | search ({result.objective}) | select ({result.objective}) | test ({truth}) |",
              "|---|---|---:|---:|---:|---:|"]
    for f in result.finalists:
        mark = "chosen" if f.order == result.chosen.order else ""
        if f.baseline:
            mark = (mark + ", " if mark else "") + result.baseline_name
        lines.append(f"| {mark} | `{f.order}` | {len(f.order)} | {_fmt(f.search)} | {_fmt(f.select)} | {_fmt(f.test)} |")
    if result.reference is not None:
        lines += ["", f"The unmodified source model (identity with the bank's own statistics) scores "
                      f"{result.reference:.3f} {truth} on *test*."]
    lines += ["", "## Evidence", ""]
    gap = result.winners_curse
    if gap is not None:
        lines.append(f"- Winner's curse: the chosen order scored {_fmt(result.chosen.search)} on *search* and "
                     f"{_fmt(result.chosen.select)} on *select* ({gap:+.3f}: how much the search score overstates it).")
    for iv in (result.select_interval, result.test_interval):
        if iv is not None:
            lines.append(f"- {iv.split}: chosen minus {result.baseline_name}, {iv.metric}: {iv.text()} over {iv.n} "
                         f"images, paired bootstrap ({iv.resamples} resamples): {iv.verdict}.")
    rel = result.reliability
    if rel:
        rho = rel.get("spearman")
        meaning = ("differences between orders are mostly noise of the data: trust only large gaps"
                   if rho is None or rho < 0.5 else "the ranking of orders is largely reproducible")
        lines.append(f"- Split-half reliability of the objective: Spearman {_fmt(rho, 2)} over {rel.get('n_orders')} "
                     f"orders scored on two disjoint halves of {rel.get('half_size')} *search* images ({meaning}).")
    st = result.engine_stats
    if st.get("block_evals"):
        lines.append(f"- Block forwards: {st['block_evals']:.0f} run, {st['naive_block_evals']:.0f} without the "
                     f"prefix cache ({st['naive_block_evals'] / st['block_evals']:.1f}x saved), "
                     f"{st['min_block_evals']:.0f} with an unlimited cache (this run's search).")
    study = result.study
    if study is not None:
        table = trials_table(study)
        counts = table["state"].value_counts().to_dict() if len(table) else {}
        lines.append(f"- Trials: {len(table)} ({', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))}); "
                     f"run time {result.seconds:.0f} s.")
        lines += ["", "## Best orders by search score", "", "| rank | trial | order | depth | search score |",
                  "|---|---|---|---|---|"]
        for i, t in enumerate(best_trials(study, 10), 1):
            o = order_of(t)
            lines.append(f"| {i} | {t.number} | `{o}` | {len(o) if o is not None else '—'} | {t.values[0]:.4f} |")
        if len(study.directions) > 1:
            lines += ["", "## Pareto front (search score up, depth down)", "", "| order | depth | score |", "|---|---|---|"]
            for t in pareto_trials(study):
                o = order_of(t)
                lines.append(f"| `{o}` | {len(o) if o is not None else '—'} | {t.values[0]:.4f} |")
    pngs = [p for p in (files or {}).values() if p.suffix == ".png"]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(result: JobResult, table: pd.DataFrame, out: Path) -> dict[str, Path]:
    study = result.study
    assert study is not None
    files = {"plot_scores": _plot_scores(result, table, out / "score_over_trials.png"),
             "plot_best": _plot_strip(result.chosen.order, int(result.bank.get("n_blocks") or 0),
                                      out / "best_order.png")}
    if len(study.directions) > 1:
        files["plot_pareto"] = _plot_pareto(result, table, out / "pareto_front.png")
    diff = study.user_attrs.get("differentiable")
    if diff:
        files["plot_mixing"] = _plot_mixing(diff, out / "mixing_weights.png")
    return files


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_scores(result: JobResult, table: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    done = table[table["state"] == "COMPLETE"] if len(table) else table
    if len(done):
        ax.scatter(done["number"], done["value"], s=10, label="trial")
        pruned = table[table["state"] == "PRUNED"]
        if len(pruned):
            ax.scatter(pruned["number"], pruned["value"], s=10, c="lightgrey", label="pruned (low fidelity)")
        ax.step(done["number"], done["value"].cummax(), where="post", c="C1", label="best so far")
        if result.baseline.search is not None:
            ax.axhline(result.baseline.search, ls="--", c="grey", lw=1, label=result.baseline_name)
        if result.chosen.trial is not None and result.chosen.search is not None:
            ax.scatter([result.chosen.trial], [result.chosen.search], s=60, marker="*", c="C3", zorder=3,
                       label="chosen (best on select)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{result.objective} on the search split")
    ax.set_title(f"{result.settings.get('searcher')} on {result.settings.get('data')}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, plt, path)


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
    ax.set_title(f"chosen order {order} (depth {len(order)}, blocks 0..{n_blocks - 1})", fontsize=8)
    return _save(fig, plt, path)


def _plot_pareto(result: JobResult, table: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    study = result.study
    fig, ax = plt.subplots(figsize=(6, 3.4))
    done = table[table["state"] == "COMPLETE"]
    ax.scatter(done["depth"], done["value"], s=10, c="lightgrey", label="trials")
    front = pareto_trials(study)
    ax.plot([len(order_of(t)) for t in front], [t.values[0] for t in front], "o-", c="C3", ms=4, label="Pareto front")
    ax.set_xlabel("depth (blocks run)")
    ax.set_ylabel(f"{result.objective} on the search split")
    ax.set_title("search score against depth", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, plt, path)


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
    return _save(fig, plt, path)
