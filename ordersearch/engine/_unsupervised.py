"""Unsupervised validators on the source head's predictions: ``snd`` and ``bnm``.

Both score an unlabelled target domain from the softmax predictions of a candidate order;
labels, where the EvalSet has them, are reported as the side metric ``accuracy`` only.

- ``snd`` — soft neighbourhood density (Saito et al., "Tune it the Right Way: Unsupervised
  Validation of Domain Adaptation via Soft Neighborhood Density", ICCV 2021): the mean
  entropy of each image's softmax distribution over its similarity to every other image's
  (L2-normalised) prediction. High when predictions form dense clusters.
- ``bnm`` — batch nuclear-norm maximisation (Cui et al., "Towards Discriminability and
  Diversity: Batch Nuclear-norm Maximization under Label Insufficient Situations", CVPR
  2020): the nuclear norm of the (N, C) prediction matrix over N. High when predictions are
  both confident and diverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ObjectiveError
from ..evalset import EvalSet
from ._transfer import _SIM_BYTES, similarity_rows, work_dtype
from .objectives import _GROUP_BYTES, Objective, _accuracy, candidate_groups, single_threaded

__all__ = ["BNM", "SND"]


def _probabilities(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Softmax predictions (B, N, C) of a group of candidates' logits, in the work dtype."""
    x = torch.stack(list(outputs)).detach()
    return torch.softmax(x.to(work_dtype(x.device)), dim=2)


class SND(Objective):
    """Soft neighbourhood density of the target predictions (Saito et al. 2021).

    With ``p`` the L2-normalised softmax predictions, each image's neighbourhood is the
    softmax of ``p_i . p_j / temperature`` over the other images j; the value is the mean of
    those distributions' entropies (nats). Higher means denser clusters of predictions.

    Args:
        temperature: Similarity temperature (the paper's 0.05).

    Side metrics: ``accuracy`` (if labelled, never used).
    """

    name = "snd"
    output = "logits"
    truth = "head"

    def __init__(self, temperature: float = 0.05) -> None:
        if float(temperature) <= 0:
            raise ObjectiveError(f"snd temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: Any
    ) -> list[tuple[float, dict[str, float]]]:
        if not outputs:
            return []
        n = outputs[0].shape[0]
        out = []
        for group in candidate_groups(outputs, 8 * n * n, _SIM_BYTES):
            p = _probabilities(group)
            for ent, pi in zip(self._entropies(p), p):
                out.append((float(ent.mean()), _accuracy(pi.cpu(), evalset)))
        return out

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> torch.Tensor:
        """Each image's neighbourhood entropy (their mean is the value). A bootstrap that
        resamples these keeps each image's neighbourhood in the full set: an approximation
        that ignores how neighbourhoods change when images are dropped."""
        return self._entropies(_probabilities([outputs]))[0].double().cpu()

    def _entropies(self, p: torch.Tensor) -> torch.Tensor:
        """(B, N) neighbourhood entropies of predictions ``p`` (B, N, C)."""
        if p.shape[1] < 2:
            raise ObjectiveError("snd needs at least 2 images")
        with single_threaded(p.device):
            q = torch.nn.functional.normalize(p, dim=2)
            (b, n, _) = q.shape
            out = torch.empty(b, n, dtype=q.dtype, device=q.device)
            for rows in similarity_rows(b, n):  # (B, m, N) similarities at a time, not (B, N, N)
                sim = (q[:, rows] @ q.mT) / self.temperature
                diag = torch.arange(rows.start, rows.stop, device=q.device)[:, None] == torch.arange(n, device=q.device)
                logq = torch.log_softmax(sim.masked_fill(diag, float("-inf")), dim=2).masked_fill(diag, 0.0)
                out[:, rows] = -(logq.exp() * logq).sum(2)
            return out


class BNM(Objective):
    """Nuclear norm of the (N, C) softmax prediction matrix, over N (Cui et al. 2020).

    Bounded by ``sqrt(min(N, C) / N)``; high for confident predictions spread over many
    classes, low for uncertain ones or for a collapse onto one class.

    Side metrics: ``accuracy`` (if labelled, never used).
    """

    name = "bnm"
    output = "logits"
    truth = "head"

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: Any
    ) -> list[tuple[float, dict[str, float]]]:
        if not outputs:
            return []
        out = []
        for group in candidate_groups(outputs, 8 * outputs[0].numel()):
            p = _probabilities(group)
            values = self._norms(p).tolist()
            out += [(v, _accuracy(pi.cpu(), evalset)) for v, pi in zip(values, p)]
        return out

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any, idx: torch.Tensor) -> torch.Tensor:
        """The value on every resample, as one batch of singular-value computations."""
        p = _probabilities([outputs])[0]
        idx = idx.to(p.device)
        step = max(1, _GROUP_BYTES // max(8 * idx.shape[1] * p.shape[1], 1))
        return torch.cat([self._norms(p[rows]) for rows in idx.split(step)]).double().cpu()

    @staticmethod
    def _norms(p: torch.Tensor) -> torch.Tensor:
        with single_threaded(p.device):
            return torch.linalg.svdvals(p).sum(1) / p.shape[1]
