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
from ._probe import _left_singular, checked_chunk, chunk_rows
from .objectives import _GROUP_BYTES, Objective, candidate_groups, single_threaded

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
            (b, n, _), k = x.shape, min(self.k, x.shape[1] - 1)
            y = state.y.to(x.device)
            right = torch.empty(b, n, dtype=torch.bool, device=x.device)
            for rows in similarity_rows(b, n):  # (B, m, N) similarities at a time, not (B, N, N)
                sim = x[:, rows] @ x.mT  # (B, m, N)
                own = torch.arange(rows.start, rows.stop, device=x.device)
                sim[:, own - rows.start, own] = -math.inf  # not itself
                top, idx = sim.topk(k, dim=2)  # (B, m, k), most similar first
                if self.temperature > 0:
                    w = ((top - top[..., :1]) / self.temperature).exp()
                else:
                    w = torch.ones_like(top)
                votes = torch.zeros(*top.shape[:2], state.n_classes, dtype=w.dtype, device=x.device)
                votes.scatter_add_(2, y[idx], w)
                right[:, rows] = votes.max(2).indices == y[rows]
            return right


def similarity_rows(b: int, n: int) -> list[slice]:
    """Ranges of image rows whose (B, rows, N) float64 similarities to all ``n`` images take
    at most :data:`_SIM_BYTES` (one range when the whole (B, N, N) matrices do), so a large
    set's similarity matrix is never held whole."""
    step = max(1, _SIM_BYTES // (8 * b * n))
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


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
    used raw (float64), as in the paper. The evidence needs only the D x D Gram matrix and the
    features-labels products, so a set of more images than one 16 MiB float64 copy holds is
    read in chunks of images.

    Args:
        iterations: Fixed-point updates per class.
        chunk: Images per chunk, to read every set of more images than features in chunks of
            this many (default: only sets too large for one float64 copy).

    Side metrics: ``alpha_over_beta`` (mean over classes of the fitted ridge strength).
    """

    name = "logme"
    output = "features"
    needs_labels = True
    truth = "probe"

    def __init__(self, iterations: int = 30, *, chunk: int | None = None) -> None:
        if int(iterations) < 1:
            raise ObjectiveError(f"logme iterations must be >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.chunk = checked_chunk("logme", chunk)

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
        n, d = len(outputs[0]), outputs[0][0].numel()
        out = []
        rows = chunk_rows(self.chunk, n, n, d, d)
        if rows is not None:  # many images
            for o in outputs:
                evidence, ratio = self._evidence(*_gram_spectrum(o.detach().flatten(1), state.onehot, rows), n, d)
                out.append((float(evidence[0]), {"alpha_over_beta": float(ratio[0])}))
            return out
        for group in candidate_groups(outputs, 8 * outputs[0].numel()):
            x = torch.stack(group).detach().to("cpu", torch.float64).flatten(2)
            evidence, ratio = self._evidence(*_spectrum(x, state.onehot.expand(len(group), -1, -1)), n, d)
            out += [(e, {"alpha_over_beta": r}) for e, r in zip(evidence.tolist(), ratio.tolist())]
        return out

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: _LogMEState, idx: torch.Tensor) -> torch.Tensor:
        """LogME of every resample, computed as a batch (a resample is a candidate of its own)."""
        x = outputs.detach().to("cpu", torch.float64).flatten(1)
        step = max(1, _GROUP_BYTES // max(8 * idx.shape[1] * x.shape[1], 1))
        return torch.cat([self._evidence(*_spectrum(x[rows], state.onehot[rows]), idx.shape[1], x.shape[1])[0]
                          for rows in idx.split(step)])

    def _evidence(self, sigma: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor, n: int,
                  d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image evidence averaged over classes (B,), and mean alpha / beta (B,), of ``n``
        images with ``d`` features, from the features' squared singular values ``sigma``
        (B, r), the labels' energy along each singular direction ``x2`` (B, r, C) and in all
        ``y2`` (B, C)."""
        with single_threaded():
            res_x2 = (y2 - x2.sum(1)).clamp_min(0)  # (B, C): outside the features' span
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


def _spectrum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :meth:`LogME._evidence` reads of features ``x`` (B, N, D) and labels ``y``
    (B, N, C), from one eigendecomposition of the smaller Gram matrix."""
    with single_threaded():
        sigma, ut = _left_singular(x.mT.contiguous())  # (B, r), (B, r, N)
        return sigma, (ut @ y).square(), y.square().sum(1)


def _gram_spectrum(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_spectrum` of one candidate's features ``x`` (N, D), N > D, maybe memory-mapped,
    read ``rows`` images at a time: from the D x D Gram matrix ``x^T x = v diag(sigma) v^T``
    and ``x^T y``, since the labels' energy along the left singular vector ``x v_i / sqrt(sigma_i)``
    is ``(v_i^T x^T y)^2 / sigma_i``."""
    with single_threaded():
        d = x.shape[1]
        gram = torch.zeros(d, d, dtype=torch.float64)
        xy = torch.zeros(d, y.shape[1], dtype=torch.float64)
        for a in range(0, len(x), rows):
            xc = x[a : a + rows].to("cpu", torch.float64)
            gram += xc.T @ xc
            xy += xc.T @ y[a : a + rows]
        lam, v = torch.linalg.eigh(gram)
        lam = lam.clamp_min(0)
        keep = lam > 1e-12 * lam[-1:]
        x2 = (v.T @ xy).square() * torch.where(keep, lam, 1.0).reciprocal().mul(keep)[:, None]
        return torch.where(keep, lam, 0.0)[None], x2[None], y.square().sum(0)[None]
