"""Held-out evidence: a paired bootstrap interval of chosen-minus-baseline and its verdict.

A search over a noisy objective on a few hundred images always finds an order that looks
better on the images it searched. Whether it is better on images the search never saw is
measured on held-out images, paired (both orders scored on the same images), with a percentile
bootstrap over images (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993):

- ``improved`` — the whole interval is above zero;
- ``worse`` — the whole interval is below zero;
- ``within noise`` — the interval holds zero (or the chosen order is the baseline itself).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["IMPROVED", "Interval", "WITHIN_NOISE", "WORSE", "paired_bootstrap", "verdict_of"]

IMPROVED, WITHIN_NOISE, WORSE = "improved", "within noise", "worse"


def verdict_of(low: float, high: float) -> str:
    """``improved`` if the interval is above zero, ``worse`` if below, else ``within noise``."""
    if low > 0:
        return IMPROVED
    if high < 0:
        return WORSE
    return WITHIN_NOISE


@dataclass(frozen=True)
class Interval:
    """Chosen minus baseline on one held-out split, with its bootstrap interval.

    Attributes:
        split: ``select`` or ``test``.
        metric: What is compared (an objective name: ``probe``, ``head``, ``infomax``, ...).
        diff: Chosen minus baseline on the whole split.
        low, high: The ``confidence`` percentile interval of the difference.
        n: Images the difference is measured on (resampled with replacement).
        resamples: Bootstrap resamples.
        confidence: Coverage of the interval (0.95).
    """

    split: str
    metric: str
    diff: float
    low: float
    high: float
    n: int
    resamples: int
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        return verdict_of(self.low, self.high)

    def text(self) -> str:
        """``+0.206 (95% CI +0.170..+0.240)``."""
        return f"{self.diff:+.3f} ({100 * self.confidence:.0f}% CI {self.low:+.3f}..{self.high:+.3f})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Interval:
        return cls(**{k: d[k] for k in ("split", "metric", "diff", "low", "high", "n", "resamples", "confidence")})


def paired_bootstrap(
    objective: Any,
    chosen: torch.Tensor,
    baseline: torch.Tensor,
    evalset: Any,
    *,
    split: str,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    state: Any = None,
) -> Interval:
    """Paired percentile bootstrap of ``objective(chosen) - objective(baseline)`` over images.

    Args:
        objective: The :class:`~ordersearch.engine.Objective` compared.
        chosen, baseline: The two orders' outputs on ``evalset`` (what the objective reads).
        evalset: The held-out EvalSet both were computed on.
        split: Name of the split, for the report.
        resamples: Bootstrap resamples (>= 1000 for a 95% interval).
        confidence: Coverage of the interval.
        seed: Seed of the resampling.
        state: ``objective.prepare(evalset)``, if already computed.

    Objectives whose value is a mean over images (accuracy) resample their per-image values;
    the others (``infomax``) are recomputed on each resample of the same image positions.
    """
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and confidence in (0, 1), got {resamples} and {confidence}")
    state = objective.prepare(evalset) if state is None else state
    g = torch.Generator().manual_seed(seed)
    a = objective.image_values(chosen, evalset, state)
    b = objective.image_values(baseline, evalset, state)
    if a is not None and b is not None:
        d = (a - b).double()
        n = len(d)
        diff = float(d.mean())
        boot = d[torch.randint(n, (resamples, n), generator=g)].mean(1)
    else:
        n = len(chosen)
        diff = objective.score(chosen, evalset, state)[0] - objective.score(baseline, evalset, state)[0]
        idx = torch.randint(n, (resamples, n), generator=g)
        boot = (objective.resampled_values(chosen, evalset, state, idx)
                - objective.resampled_values(baseline, evalset, state, idx)).double()
    tail = (1 - confidence) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(split, objective.name, float(diff), float(low), float(high), n, resamples, confidence)
