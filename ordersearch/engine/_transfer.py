"""Labelled transferability scores that fit nothing on a split: ``knn`` and ``logme``.

Both read a candidate's pooled features on every image of the EvalSet (they ignore its
train/val split) and stand in for the accuracy of a classifier trained on the user's data,
so their :attr:`~ordersearch.engine.Objective.truth` is ``probe``.

- ``knn`` — leave-one-out k-nearest-neighbour accuracy with cosine similarity on centred
  features and temperature-weighted votes (the k-NN evaluation of self-supervised learning,
  Wu et al. 2018; Caron et al. 2021). A benchmark of 23 transferability metrics on 16
  datasets found k-NN accuracy on frozen features the most reliable (Sorkhei et al. 2025).
- ``logme`` — the log marginal evidence of a Bayesian linear model from the features to the
  one-hot labels, per image and averaged over classes (You et al., "LogME: Practical
  Assessment of Pre-trained Models for Transfer Learning", ICML 2021), by its fixed-point
  updates of the prior and noise precisions, closed form given one eigendecomposition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ObjectiveError
from ..evalset import EvalSet
from .objectives import _GROUP_BYTES, Objective, _left_singular, candidate_groups, single_threaded

__all__ = ["Knn", "LogME"]

# (B, N, N) similarity matrices are built for at most this many bytes of candidates at once
_SIM_BYTES = 64 * 2**20


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (so a batch of candidates gives bit-identical values to one-by-one
    scoring and no near-tie flips), float32 on an accelerator."""
    return torch.float64 if device.type == "cpu" else torch.float32


@dataclass(frozen=True)
class _KnnState:
    y: torch.Tensor  # (N,) labels
    n_classes: int


class Knn(Objective):
    """Leave-one-out k-NN accuracy on pooled features (cosine on centred features).

    Each image is classified by its ``k`` most similar other images, each voting for its
    label with weight ``exp(similarity / temperature)``; the value is the fraction classified
    correctly. One (N, N) similarity matrix per candidate, on the device of the features.

    Args:
        k: Neighbours per image (at most N - 1 are used).
        temperature: Vote temperature (``0`` gives equal votes).
        center: Subtract the mean feature before normalising (pooled post-ReLU features all
            point into one orthant; centring spreads them out).

    Side metrics: ``k`` (the neighbours used).
    """

    name = "knn"
    output = "features"
    needs_labels = True
    truth = "probe"
    on_device = True

    def __init__(self, k: int = 10, temperature: float = 0.07, center: bool = True) -> None:
        if int(k) < 1:
            raise ObjectiveError(f"knn k must be >= 1, got {k}")
        if float(temperature) < 0:
            raise ObjectiveError(f"knn temperature must be >= 0, got {temperature}")
        self.k, self.temperature, self.center = int(k), float(temperature), bool(center)

    def prepare(self, evalset: EvalSet) -> _KnnState:
        assert evalset.y is not None
        if len(evalset) < 2:
            raise ObjectiveError("knn needs at least 2 images")
        return _KnnState(evalset.y, int(evalset.y.max()) + 1)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: _KnnState) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: _KnnState) -> torch.Tensor:
        """1.0 for each image its neighbours classify correctly (leave-one-out), else 0.0."""
        return self._correct([outputs], state)[0].double().cpu()

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: _KnnState
    ) -> list[tuple[float, dict[str, float]]]:
        if not outputs:
            return []
        n = outputs[0].shape[0]
        k = min(self.k, n - 1)
        out = []
        for group in candidate_groups(outputs, 8 * n * n, _SIM_BYTES):
            right = self._correct(group, state).sum(1).tolist()  # one wait per group
            out += [(r / n, {"k": float(k)}) for r in right]
        return out

    def _correct(self, outputs: Sequence[torch.Tensor], state: _KnnState) -> torch.Tensor:
        """(B, N) bool: each image's leave-one-out prediction is right."""
        x = torch.stack(list(outputs)).detach().flatten(2)
        x = x.to(work_dtype(x.device))
        with single_threaded(x.device):
            if self.center:
                x = x - x.mean(1, keepdim=True)
            x = torch.nn.functional.normalize(x, dim=2)
            sim = x @ x.mT  # (B, N, N)
            sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
            k = min(self.k, sim.shape[1] - 1)
            top, idx = sim.topk(k, dim=2)  # (B, N, k), most similar first
            if self.temperature > 0:
                w = ((top - top[..., :1]) / self.temperature).exp()
            else:
                w = torch.ones_like(top)
            y = state.y.to(x.device)
            votes = torch.zeros(*top.shape[:2], state.n_classes, dtype=w.dtype, device=x.device)
            votes.scatter_add_(2, y[idx], w)
            return votes.max(2).indices == y


@dataclass(frozen=True)
class _LogMEState:
    onehot: torch.Tensor  # (N, C)


class LogME(Objective):
    """LogME: the per-image log evidence of Bayesian linear regression from the pooled
    features to each one-hot label column, averaged over classes (You et al. 2021).

    For each class the prior precision ``alpha`` and noise precision ``beta`` are found by the
    paper's fixed-point updates (a fixed number of iterations, so a batch of candidates is
    computed exactly like one), from the eigendecomposition of the features' smaller Gram
    matrix. Higher evidence means the labels are easier to explain linearly. Features are
    used raw (float64), as in the paper.

    Args:
        iterations: Fixed-point updates per class.

    Side metrics: ``alpha_over_beta`` (mean over classes of the fitted ridge strength).
    """

    name = "logme"
    output = "features"
    needs_labels = True
    truth = "probe"

    def __init__(self, iterations: int = 30) -> None:
        if int(iterations) < 1:
            raise ObjectiveError(f"logme iterations must be >= 1, got {iterations}")
        self.iterations = int(iterations)

    def prepare(self, evalset: EvalSet) -> _LogMEState:
        assert evalset.y is not None
        y = evalset.y
        return _LogMEState(torch.nn.functional.one_hot(y, int(y.max()) + 1).double())

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: _LogMEState) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: _LogMEState
    ) -> list[tuple[float, dict[str, float]]]:
        if not outputs:
            return []
        out = []
        for group in candidate_groups(outputs, 8 * outputs[0].numel()):
            x = torch.stack(group).detach().to("cpu", torch.float64).flatten(2)
            evidence, ratio = self._evidence(x, state.onehot.expand(len(group), -1, -1))
            out += [(e, {"alpha_over_beta": r}) for e, r in zip(evidence.tolist(), ratio.tolist())]
        return out

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: _LogMEState, idx: torch.Tensor) -> torch.Tensor:
        """LogME of every resample, computed as a batch (a resample is a candidate of its own)."""
        x = outputs.detach().to("cpu", torch.float64).flatten(1)
        step = max(1, _GROUP_BYTES // max(8 * idx.shape[1] * x.shape[1], 1))
        return torch.cat([self._evidence(x[rows], state.onehot[rows])[0] for rows in idx.split(step)])

    def _evidence(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image evidence averaged over classes (B,), and mean alpha / beta (B,), for
        features ``x`` (B, N, D) and one-hot labels ``y`` (B, N, C)."""
        with single_threaded():
            n, d = x.shape[1:]
            sigma, ut = _left_singular(x.mT.contiguous())  # (B, r), (B, r, N)
            x2 = (ut @ y).square()  # (B, r, C): labels' energy along each direction
            res_x2 = (y.square().sum(1) - x2.sum(1)).clamp_min(0)  # (B, C): outside the features' span
            s = sigma[:, :, None]  # (B, r, 1)
            alpha = torch.ones_like(res_x2)
            beta = torch.ones_like(res_x2)
            eps = 1e-5

            def moments(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
                t = (alpha / beta)[:, None, :]  # (B, 1, C)
                gamma = (s / (s + t)).sum(1)
                m2 = (s * x2 / (t + s).square()).sum(1)
                res2 = (x2 * (t / (s + t)).square()).sum(1) + res_x2
                return gamma, m2, res2

            for _ in range(self.iterations):
                gamma, m2, res2 = moments(alpha, beta)
                alpha = gamma / (m2 + eps)
                beta = (n - gamma) / (res2 + eps)
            _, m2, res2 = moments(alpha, beta)
            # log|alpha I + beta X^T X| over all D directions: the r computed ones plus D - r with
            # no variance (sigma = 0)
            logdet = (alpha[:, None, :] + beta[:, None, :] * s).log().sum(1) + (d - s.shape[1]) * alpha.log()
            evidence = (
                d / 2 * alpha.log() + n / 2 * beta.log() - logdet / 2 - beta / 2 * res2 - alpha / 2 * m2
                - n / 2 * math.log(2 * math.pi)
            ) / n
            return evidence.mean(1), (alpha / beta).mean(1)
