"""Objectives: one float per candidate order (higher is better) plus side metrics.

An objective reads either the pooled features (``bank.features``) or the source head's logits
of a candidate order on the whole EvalSet:

- ``probe`` — closed-form ridge linear probe: fit on the EvalSet's train split with the ridge
  strength chosen by exact leave-one-out error, accuracy on its val split. The score for a
  new labelled dataset (transfer by reordering, Zhmoginov et al., arXiv 2107.10963).
- ``head`` — accuracy of the source head: same classes, new domain, labelled.
- ``infomax`` — entropy of the mean prediction minus the mean prediction entropy (confident
  *and* diverse predictions): for an unlabelled target domain. Labels, where present, are
  only reported as ``accuracy``.
- ``entropy`` — minus the mean prediction entropy. Available for comparison but not a good
  target on its own: a search maximising confidence alone drifts to orders that predict one
  class for everything (seen in a prototype), which ``infomax``'s diversity term prevents.

Example:
    >>> obj = get_objective("infomax")
    >>> obj.output, obj.needs_labels
    ('logits', False)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .._registry import Registry
from ..evalset import EvalSet

__all__ = [
    "Entropy",
    "Head",
    "Infomax",
    "Objective",
    "Probe",
    "get_objective",
    "list_objectives",
    "register_objective",
]


class Objective(ABC):
    """Maps a candidate's outputs on an EvalSet to a score (higher is better).

    Subclasses set :attr:`name`, :attr:`output` (``"features"`` for the pooled (N, D)
    representation, ``"logits"`` for the source head's (N, C) logits) and
    :attr:`needs_labels`, and implement :meth:`score`. :meth:`prepare` runs once per EvalSet
    and may precompute anything that does not depend on the candidate.
    """

    name: ClassVar[str] = ""
    output: ClassVar[Literal["features", "logits"]] = "features"
    needs_labels: ClassVar[bool] = False

    def prepare(self, evalset: EvalSet) -> Any:
        """Candidate-independent state for ``evalset`` (passed back to :meth:`score`)."""
        return None

    @abstractmethod
    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        """The value and side metrics for one candidate's ``outputs`` (N, D) or (N, C)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@contextmanager
def single_threaded() -> Iterator[None]:
    """Small dense solves on one thread: with two OpenMP threads a prototype's 2-3 ms ridge
    solve sometimes took 184 ms. Setting torch's thread count is cheap (~0.2 µs)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --- labelled -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProbeState:
    train: torch.Tensor
    val: torch.Tensor
    y_train: torch.Tensor
    y_val: torch.Tensor
    onehot: torch.Tensor  # (n_train, C), centred
    y_mean: torch.Tensor  # (C,)
    alphas: torch.Tensor  # (A,)


class Probe(Objective):
    """Ridge linear probe on standardised pooled features, scored by val accuracy.

    The ridge strength is picked from ``alphas`` (multiples of the number of training images)
    by the exact leave-one-out squared error, which one SVD of the train features gives for
    every alpha at once (all alphas in one batch of tensor operations: each operation on
    these small matrices costs more in dispatch than in arithmetic). Solved in float64 on one
    thread.

    Args:
        alphas: Candidate ridge strengths relative to the train-split size.

    Side metrics: ``alpha`` (chosen, relative), ``loo_accuracy`` (leave-one-out accuracy on
    the train split at that alpha), ``train_accuracy``.
    """

    name = "probe"
    output = "features"
    needs_labels = True

    def __init__(self, alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> None:
        if not alphas or min(alphas) <= 0:
            raise ValueError("probe alphas must be positive")
        self.alphas = tuple(float(a) for a in alphas)

    def prepare(self, evalset: EvalSet) -> _ProbeState:
        assert evalset.y is not None
        y = evalset.y
        n_classes = int(y.max()) + 1
        y_train = y[evalset.train_idx]
        onehot = torch.nn.functional.one_hot(y_train, n_classes).double()
        y_mean = onehot.mean(0)
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        return _ProbeState(evalset.train_idx, evalset.val_idx, y_train, y[evalset.val_idx], onehot - y_mean, y_mean,
                           alphas)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: _ProbeState) -> tuple[float, dict[str, float]]:
        with single_threaded():
            x = outputs.detach().to("cpu", torch.float64).flatten(1)
            xtr, xva = x[state.train], x[state.val]
            sd, mu = torch.std_mean(xtr, 0, correction=0)
            sd = torch.where(sd > 1e-12 * max(float(sd.max()), 1e-300), sd, 1.0)
            z = (xtr - mu) / sd  # (n, D)
            n = len(z)
            u, s, vt = torch.linalg.svd(z, full_matrices=False)  # (n, r), (r,), (r, D)
            uty = u.T @ state.onehot  # (r, C)
            s2 = s.square()
            f = s2 / (s2 + state.alphas[:, None] * n)  # (A, r): shrinkage per direction
            fit = (u * f[:, None, :]) @ uty  # (A, n, C)
            lev = (u.square() @ f.T + 1.0 / n).clamp(max=1 - 1e-9)  # (n, A): hat diagonal, with intercept
            loo = (state.onehot - fit) / (1 - lev.T)[:, :, None]  # (A, n, C)
            errs = loo.square().sum((1, 2)).tolist()
            best = 0
            for i in range(1, len(errs)):  # the first alpha within rounding of the least error
                if errs[i] < errs[best] * (1 - 1e-12):
                    best = i
            a = self.alphas[best]
            w = vt.T @ ((s / (s2 + a * n))[:, None] * uty)  # (D, C)
            pred_val = (((xva - mu) / sd) @ w + state.y_mean).argmax(1)
            loo_pred = (state.onehot - loo[best] + state.y_mean).argmax(1)
            return float((pred_val == state.y_val).double().mean()), {
                "alpha": a,
                "loo_accuracy": float((loo_pred == state.y_train).double().mean()),
                "train_accuracy": float(((fit[best] + state.y_mean).argmax(1) == state.y_train).double().mean()),
            }


class Head(Objective):
    """Accuracy of the source head on the whole EvalSet (same classes, new domain).

    Side metric: ``nll`` (mean cross-entropy).
    """

    name = "head"
    output = "logits"
    needs_labels = True

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        assert evalset.y is not None
        logits = outputs.detach().to("cpu", torch.float64)
        y = evalset.y
        if int(y.max()) >= logits.shape[1]:
            raise ValueError(f"labels go up to {int(y.max())} but the head has {logits.shape[1]} classes")
        acc = float((logits.argmax(1) == y).double().mean())
        nll = float(torch.nn.functional.cross_entropy(logits, y))
        return acc, {"nll": nll}


def _predictions(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(outputs.detach().to("cpu", torch.float64), dim=1)  # (N, C)
    return logp, logp.exp()


def _accuracy(p: torch.Tensor, evalset: EvalSet) -> dict[str, float]:
    if evalset.y is None or int(evalset.y.max()) >= p.shape[1]:
        return {}
    return {"accuracy": float((p.argmax(1) == evalset.y).double().mean())}


class Entropy(Objective):
    """Minus the mean prediction entropy (in nats) of the source head.

    Not a good target by itself: orders that predict one class for every image maximise it
    (a collapse seen in a prototype). Use ``infomax`` for unlabelled domains. Side metrics:
    ``accuracy`` (if labelled, never used), ``marginal_entropy``.
    """

    name = "entropy"
    output = "logits"

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        logp, p = _predictions(outputs)
        cond = float(-(p * logp).sum(1).mean())
        pm = p.mean(0)
        marg = float(-(pm * pm.clamp_min(1e-300).log()).sum())
        return -cond, {"marginal_entropy": marg, **_accuracy(p, evalset)}


class Infomax(Objective):
    """``H(mean prediction) - weight * mean H(prediction)`` of the source head (nats).

    High when predictions are confident per image yet spread over the classes, the
    information-maximisation objective of unsupervised domain adaptation (e.g. SHOT).
    Labels, if present, are reported as ``accuracy`` and never used for the value.

    Args:
        weight: Weight of the confidence term.

    Side metrics: ``marginal_entropy``, ``conditional_entropy``, ``accuracy`` (if labelled).
    """

    name = "infomax"
    output = "logits"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        logp, p = _predictions(outputs)
        cond = float(-(p * logp).sum(1).mean())
        pm = p.mean(0)
        marg = float(-(pm * pm.clamp_min(1e-300).log()).sum())
        value = marg - self.weight * cond
        return value, {"marginal_entropy": marg, "conditional_entropy": cond, **_accuracy(p, evalset)}


# --- registry -------------------------------------------------------------------------

_OBJECTIVES: Registry[Objective] = Registry("objective", Objective, ValueError, options="keyword arguments")


def register_objective(name: str, factory: Callable[..., Objective]) -> None:
    """Make ``get_objective(name, **kwargs)`` return ``factory(**kwargs)``."""
    _OBJECTIVES.register(name, factory)


def list_objectives() -> list[str]:
    """Names of the registered objectives."""
    return _OBJECTIVES.names()


def get_objective(objective: str | Objective, **kwargs: Any) -> Objective:
    """An objective by name (``probe``, ``head``, ``infomax``, ``entropy``) or as given."""
    return _OBJECTIVES.get_or_make(objective, **kwargs)


for _cls in (Probe, Head, Infomax, Entropy):
    register_objective(_cls.name, _cls)


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
