"""The result of a search and the trials table every export reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ..order import Order
from ._encoding import order_of

__all__ = ["SearchResult", "best_trials", "pareto_trials", "trials_table"]

_ATTRS = ("baseline", "repaired", "source", "beam_depth", "differentiable", "failed")


def _rank_key(t: FrozenTrial) -> tuple[float, int, int]:
    order = order_of(t)
    return (-t.values[0], len(order) if order is not None else 0, t.number)


def best_trials(study: optuna.Study, n: int = 1) -> list[FrozenTrial]:
    """The ``n`` best completed trials with distinct orders: highest score, then shallower,
    then earlier."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0])]
    out, seen = [], set()
    for t in sorted(done, key=_rank_key):
        o = order_of(t)
        if o in seen:
            continue
        seen.add(o)
        out.append(t)
        if len(out) == n:
            break
    return out


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials not dominated in (score up, depth down), by score."""
    pts = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        o = order_of(t)
        if t.values and o is not None and math.isfinite(t.values[0]):
            pts.append((t.values[0], len(o), t))
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in pts)]
    uniq: dict[tuple[float, int], FrozenTrial] = {}
    for s, d, t in sorted(front, key=lambda p: (-p[0], p[1], p[2].number)):
        uniq.setdefault((s, d), t)
    return list(uniq.values())


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, order, depth, value, n_images, side metrics
    (``metric_<name>``), searcher attributes and timing."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        o = order_of(t)
        value = t.values[0] if t.values else (t.intermediate_values[t.last_step] if t.last_step is not None else None)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "order": None if o is None else str(o),
            "depth": None if o is None else len(o),
            "value": value,
            "n_images": t.user_attrs.get("n_images"),
        }
        for k, v in sorted((t.user_attrs.get("metrics") or {}).items()):
            row[f"metric_{k}"] = v
        for k in _ATTRS:
            if k in t.user_attrs:
                row[k] = t.user_attrs[k]
        row["datetime_start"] = t.datetime_start
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else None
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class SearchResult:
    """What :func:`ordersearch.search.search` found.

    Attributes:
        best_order: The best order (highest score, then shallower).
        best_score: Its objective value.
        best_metrics: Its side metrics.
        identity_score: The identity order's value (trial 0), None if it failed.
        study: The Optuna study holding every trial.
        trials: The trials table (:func:`trials_table`).
        searcher: Searcher name.
        objective: Objective name.
        engine_stats: The engine's counters for this run.
    """

    best_order: Order
    best_score: float
    best_metrics: dict[str, Any]
    identity_score: float | None
    study: optuna.Study
    trials: pd.DataFrame
    searcher: str
    objective: str
    engine_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def best_trial(self) -> FrozenTrial:
        return best_trials(self.study)[0]

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    def pareto(self) -> list[FrozenTrial]:
        """Trials on the score-depth Pareto front (for ``nsga2``, or any study)."""
        return pareto_trials(self.study)

    def top(self, n: int) -> list[tuple[Order, float]]:
        """The ``n`` best distinct orders and their scores."""
        return [(order_of(t), t.values[0]) for t in best_trials(self.study, n)]  # type: ignore[misc]

    def __repr__(self) -> str:
        ident = "-" if self.identity_score is None else f"{self.identity_score:.4f}"
        return (f"SearchResult(best={self.best_order} score={self.best_score:.4f}, identity={ident}, "
                f"searcher={self.searcher}, trials={self.n_trials})")
