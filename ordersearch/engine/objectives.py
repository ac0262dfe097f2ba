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
- ``knn`` / ``logme`` — leave-one-out k-NN accuracy and LogME evidence on the pooled
  features: labelled transferability scores that fit nothing on a split (``_transfer.py``).
- ``snd`` / ``bnm`` — soft neighbourhood density and batch nuclear norm of the predictions:
  unlabelled validators (``_unsupervised.py``).
- ``ensemble:a+b`` — components standardised on a reference population of orders and
  averaged (``_ensemble.py``).
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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from .._registry import Registry, parse_options
from .._threads import torch_threads
from ..errors import ObjectiveError
from ..evalset import EvalSet

__all__ = [
    "DEFAULT_LABELLED",
    "DEFAULT_UNLABELLED",
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
    #: True when the objective fits something on the EvalSet's train part and scores its val
    #: part (``probe``): held-out scoring then keeps the fit part and swaps the scored images.
    fits: ClassVar[bool] = False
    #: The labelled objective that measures what this one stands in for, on labelled held-out
    #: data (``head`` accuracy for the unsupervised objectives, the objective itself otherwise).
    truth: ClassVar[str] = ""
    #: True when :meth:`score_many` takes the outputs on the engine's device (an accelerator)
    #: and waits for it at most once per call; the others are handed them on the CPU.
    on_device: ClassVar[bool] = False

    def prepare(self, evalset: EvalSet) -> Any:
        """Candidate-independent state for ``evalset`` (passed back to :meth:`score`)."""
        return None

    def calibrate(self, engine: Any) -> None:
        """Called by an :class:`~ordersearch.engine.Engine` before it scores its first candidate.
        Objectives whose value is relative to a reference population of orders (``ensemble``)
        score that population here, through ``engine.outputs``; the others do nothing."""
        return None

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> torch.Tensor | None:
        """Per scored image, a value whose mean is :meth:`score`'s value (e.g. 1.0 for a correct
        prediction), or None when the score is not a mean over images (``infomax``). Paired
        bootstrap intervals resample these."""
        return None

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any, idx: torch.Tensor) -> torch.Tensor:
        """The value on each resample of the scored images: ``idx`` (R, n) holds image
        positions drawn with replacement; returns (R,). The default scores each resample as
        an EvalSet of its own; objectives override it with one batched computation."""
        values = self.image_values(outputs, evalset, state)
        if values is not None:
            return values[idx].mean(1)
        out = []
        like = evalset.x[:1].expand(idx.shape[1], *evalset.x.shape[1:])  # objectives read labels, not images
        for row in idx:
            sub = EvalSet(like, None if evalset.y is None else evalset.y[row], seed=evalset.seed)
            out.append(self.score(outputs[row], sub, self.prepare(sub))[0])
        return torch.tensor(out, dtype=torch.float64)

    @abstractmethod
    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        """The value and side metrics for one candidate's ``outputs`` (N, D) or (N, C)."""

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: Any
    ) -> list[tuple[float, dict[str, float]]]:
        """:meth:`score` of each of several candidates' outputs (all of one shape). The engine
        scores a batch's candidates together once their block forwards are done; objectives
        whose per-candidate work is many small tensor operations (``probe``) override this to
        do them for all candidates at once, with the same values as :meth:`score`."""
        return [self.score(o, evalset, state) for o in outputs]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@contextmanager
def single_threaded(device: torch.device | None = None) -> Iterator[None]:
    """Small dense solves on one thread: with two OpenMP threads a prototype's 2-3 ms ridge
    solve sometimes took 184 ms. Setting torch's thread count is cheap (~0.2 µs). A no-op
    for work on an accelerator ``device``."""
    if device is not None and device.type != "cpu":
        yield
        return
    with torch_threads(1):
        yield


#: Candidates' outputs are scored in groups of at most this many bytes of work (larger
#: batches run out of the CPU caches).
_GROUP_BYTES = 2 * 2**20


def candidate_groups(outputs: Sequence[torch.Tensor], bytes_each: int,
                     budget: int = _GROUP_BYTES) -> list[list[torch.Tensor]]:
    """``outputs`` cut into consecutive groups of at most ``budget`` bytes of work each (one
    candidate at least)."""
    step = max(1, budget // max(bytes_each, 1))
    return [list(outputs[i : i + step]) for i in range(0, len(outputs), step)]


# --- labelled -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProbeState:
    train: torch.Tensor
    val: torch.Tensor
    y_train: torch.Tensor
    y_val: torch.Tensor
    onehot: torch.Tensor  # (n_train, C), centred
    onehot_t: torch.Tensor  # (C, n_train), the same, contiguous
    y_mean: torch.Tensor  # (C,)
    alphas: torch.Tensor  # (A,)
    #: the tensors above on a scoring device and dtype, made once each
    moved: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> _ProbeState:
        """This state with its tensors on ``device`` (floating ones in ``dtype``)."""
        if device.type == "cpu" and dtype == torch.float64:
            return self
        key = (str(device), dtype)
        if key not in self.moved:
            self.moved[key] = _ProbeState(*(
                t.to(device, dtype if t.is_floating_point() else None) for t in (
                    self.train, self.val, self.y_train, self.y_val, self.onehot, self.onehot_t, self.y_mean,
                    self.alphas)))
        return self.moved[key]


class Probe(Objective):
    """Ridge linear probe on standardised pooled features, scored by val accuracy.

    The ridge strength is picked from ``alphas`` (multiples of the number of training images)
    by the exact leave-one-out squared error, which one eigendecomposition of the train
    features' smaller Gram matrix (D x D or n x n) gives for every alpha at once. All alphas,
    and in :meth:`score_many` all candidates, go through one batch of tensor operations: each
    operation on these small matrices costs more in dispatch than in arithmetic. Solved in
    float64 where the features are (on the CPU on one thread), with one host synchronisation
    per group of candidates and none per candidate: on an accelerator the blocks of the next
    candidates are queued while the probe of the last ones runs.

    Args:
        alphas: Candidate ridge strengths relative to the train-split size.
        dtype: Precision of the solve: float64 (default), or float32 for an accelerator with
            slow float64 arithmetic (consumer cards; ``probe:dtype=float32`` as an objective
            name): standardised features then still pick the same ridge strength, but a
            near-tied val image can flip.

    Side metrics: ``alpha`` (chosen, relative), ``loo_accuracy`` (leave-one-out accuracy on
    the train split at that alpha), ``train_accuracy``.
    """

    name = "probe"
    output = "features"
    needs_labels = True
    fits = True
    truth = "probe"
    on_device = True

    def __init__(self, alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), *,
                 dtype: torch.dtype | str = torch.float64) -> None:
        if not alphas or min(alphas) <= 0:
            raise ObjectiveError("probe alphas must be positive")
        if isinstance(dtype, str):  # "probe:dtype=float32" on the command line
            dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)  # type: ignore[arg-type]
        if dtype not in (torch.float32, torch.float64):
            raise ObjectiveError(f"probe dtype must be float32 or float64, got {dtype}")
        self.alphas = tuple(float(a) for a in alphas)
        self.dtype = dtype

    def prepare(self, evalset: EvalSet) -> _ProbeState:
        assert evalset.y is not None
        y = evalset.y
        n_classes = int(y.max()) + 1
        y_train = y[evalset.train_idx]
        onehot = torch.nn.functional.one_hot(y_train, n_classes).double()
        y_mean = onehot.mean(0)
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        onehot = onehot - y_mean
        return _ProbeState(evalset.train_idx, evalset.val_idx, y_train, y[evalset.val_idx], onehot,
                           onehot.T.contiguous(), y_mean, alphas)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: _ProbeState) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: _ProbeState) -> torch.Tensor:
        """1.0 for each val image the probe classifies correctly, else 0.0 (in ``val_idx`` order)."""
        _, pred_val = self._group([outputs], state)
        return (pred_val[0].cpu() == state.y_val).double()

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: _ProbeState
    ) -> list[tuple[float, dict[str, float]]]:
        """Every candidate's probe in one batch of tensor operations (B candidates, A alphas),
        in groups of at most 2 MiB of features on the CPU (larger batches run out of its
        caches) and of 256 MiB of work on an accelerator; one candidate is a batch of one, so
        the values do not depend on the batching."""
        if not outputs:
            return []
        if outputs[0].device.type == "cpu":
            groups = candidate_groups(outputs, 8 * outputs[0].numel())
        else:  # the (A, C, n) residuals are the largest tensor per candidate
            n, (a, c) = len(state.train), (len(self.alphas), state.onehot.shape[1])
            groups = candidate_groups(outputs, self.dtype.itemsize * max(outputs[0].numel(), a * c * n), _DEVICE_GROUP_BYTES)
        return [s for group in groups for s in self._group(group, state)[0]]

    def _group(
        self, outputs: Sequence[torch.Tensor], state: _ProbeState
    ) -> tuple[list[tuple[float, dict[str, float]]], torch.Tensor]:
        """The scores of one group of candidates and their val predictions (B, n_val)."""
        device = outputs[0].device
        dtype = self.dtype
        eps = torch.finfo(dtype).eps
        state = state.on(device, dtype)
        with single_threaded(device):
            x = torch.stack(list(outputs)).detach().to(dtype).flatten(2)  # (B, N, D)
            # images last: the reductions and element-wise operations then run along
            # contiguous rows of n values, not of D or C
            xtr, xva = (x.index_select(1, idx).mT.contiguous() for idx in (state.train, state.val))
            mu = xtr.mean(2, keepdim=True)  # (B, D, 1)
            dtr = xtr - mu
            sd = dtr.square().mean(2, keepdim=True).sqrt()
            sd = torch.where(sd > 1e-12 * sd.amax(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny), sd, 1.0)
            zt, zvat = dtr / sd, (xva - mu) / sd  # (B, D, n), (B, D, n_val)
            # float64 keeps directions down to 1e-12 of the largest; float32's rounding is larger
            lam, ut = _left_singular(zt, rtol=max(1e-12, 100 * eps))  # (B, r), (B, r, n)
            (b, _, n), a, c = zt.shape, len(self.alphas), state.onehot.shape[1]
            uty = ut @ state.onehot  # (B, r, C)
            f = lam[:, None, :] / (lam[:, None, :] + state.alphas[:, None] * n)  # (B, A, r): shrinkage
            fit = ((f[:, :, None, :] * uty.mT[:, None]).reshape(b, a * c, -1) @ ut).reshape(b, a, c, n)
            # hat diagonal, with intercept (below 1, or a leave-one-out residual divides by zero)
            lev = (f @ ut.square() + 1.0 / n).clamp(max=1 - max(1e-9, 10 * eps))  # (B, A, n)
            res = state.onehot_t - fit  # (B, A, C, n): residuals
            # leave-one-out residuals are res / (1 - lev): their squared sum per alpha without
            # materialising them (the (B, A, C, n) passes dominate the probe's time)
            loo_err = torch.linalg.vecdot(res, res, dim=2) / (1 - lev).square()  # (B, A, n)
            pick = _least(loo_err.sum(2))  # (B,)
            rows = torch.arange(b, device=device)
            # val predictions: z^T u = v diag(sqrt(lam)), so w = z^T u diag(1 / (lam + a n)) u^T y
            g = uty / (lam + state.alphas[pick][:, None] * n)[..., None]  # (B, r, C)
            pred_val = _argmax(zvat.mT @ (zt @ (ut.mT @ g)) + state.y_mean, 2)  # (B, n_val)
            y_mean = state.y_mean[:, None]
            loo = res[rows, pick] / (1 - lev[rows, pick])[:, None, :]  # (B, C, n): at the chosen alpha
            loo_pred = _argmax(state.onehot_t - loo + y_mean, 1)
            train_pred = _argmax(fit[rows, pick] + y_mean, 1)
            # counts of correct predictions, and the group's one host synchronisation
            right = torch.stack([(pred_val == state.y_val).sum(1), pick, (loo_pred == state.y_train).sum(1),
                                 (train_pred == state.y_train).sum(1)]).tolist()
            n_val = len(state.y_val)
            return [
                (v / n_val, {"alpha": self.alphas[i], "loo_accuracy": lo / n, "train_accuracy": tr / n})
                for v, i, lo, tr in zip(*right)
            ], pred_val


#: Work per group of candidates the probe scores at once on an accelerator.
_DEVICE_GROUP_BYTES = 256 * 2**20


def _left_singular(zt: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (B, r) and left singular vectors, as rows (B, r, n), of each
    (n, D) matrix z whose transpose is in ``zt`` (B, D, n), from the eigendecomposition of the
    smaller of ``z^T z`` and ``z z^T`` (twice as fast as an SVD at D = n = 192, and far
    faster for tall z). Directions with no variance (below ``rtol`` of the largest) get zero
    vectors: they take no part in the ridge fit, as in the SVD."""
    d, n = zt.shape[-2:]
    if d < n:
        lam, v = torch.linalg.eigh(zt @ zt.mT)
        lam = lam.clamp_min(0)
        keep = lam > rtol * lam[:, -1:]
        ut = (v.mT @ zt) * torch.where(keep, lam, 1.0).rsqrt().mul(keep)[:, :, None]
    else:
        lam, u = torch.linalg.eigh(zt.mT @ zt)
        lam = lam.clamp_min(0)
        keep = lam > rtol * lam[:, -1:]
        ut = u.mT * keep[:, :, None]
    return torch.where(keep, lam, 0.0), ut


def _argmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.argmax(dim)`` (the first of tied maxima too), computed by ``max``: on the CPU
    ``argmax`` over a dimension that is not the last ran 6x slower (2.5 ms for a batch's
    (64, 10, 192) class scores)."""
    return x.max(dim).indices


def _least(errs: torch.Tensor) -> torch.Tensor:
    """Per row of ``errs`` (B, A), the first index within rounding of the row's least error
    (B,), on the device of ``errs`` (no host synchronisation)."""
    least = errs.amin(1, keepdim=True)
    close = errs <= least * (1 + 1e-12) + torch.finfo(errs.dtype).tiny
    return close.to(torch.uint8).argmax(1)


class Head(Objective):
    """Accuracy of the source head on the whole EvalSet (same classes, new domain).

    Side metric: ``nll`` (mean cross-entropy).
    """

    name = "head"
    output = "logits"
    needs_labels = True
    truth = "head"

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        logits = self._logits(outputs, evalset)
        acc = float(self.image_values(outputs, evalset, state).mean())
        nll = float(torch.nn.functional.cross_entropy(logits, evalset.y))  # type: ignore[arg-type]
        return acc, {"nll": nll}

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> torch.Tensor:
        """1.0 for each image the head classifies correctly, else 0.0."""
        return (self._logits(outputs, evalset).argmax(1) == evalset.y).double()

    @staticmethod
    def _logits(outputs: torch.Tensor, evalset: EvalSet) -> torch.Tensor:
        assert evalset.y is not None
        logits = outputs.detach().to("cpu", torch.float64)
        if int(evalset.y.max()) >= logits.shape[1]:
            raise ValueError(f"labels go up to {int(evalset.y.max())} but the head has {logits.shape[1]} classes")
        return logits


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
    truth = "head"

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        logp, p = _predictions(outputs)
        cond = float(-(p * logp).sum(1).mean())
        pm = p.mean(0)
        marg = float(-(pm * pm.clamp_min(1e-300).log()).sum())
        return -cond, {"marginal_entropy": marg, **_accuracy(p, evalset)}

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> torch.Tensor:
        """Minus each image's prediction entropy (their mean is the value)."""
        logp, p = _predictions(outputs)
        return (p * logp).sum(1)


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
    truth = "head"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: Any) -> tuple[float, dict[str, float]]:
        logp, p = _predictions(outputs)
        cond = float(-(p * logp).sum(1).mean())
        pm = p.mean(0)
        marg = float(-(pm * pm.clamp_min(1e-300).log()).sum())
        value = marg - self.weight * cond
        return value, {"marginal_entropy": marg, "conditional_entropy": cond, **_accuracy(p, evalset)}

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: Any, idx: torch.Tensor) -> torch.Tensor:
        """The value on every resample at once (the marginal term is not a mean over images)."""
        logp, p = _predictions(outputs)
        ent = -(p * logp).sum(1)  # (N,)
        out = []
        for rows in idx.split(256):  # (r, n, C) at a time: bounded memory
            pm = p[rows].mean(1)  # (r, C)
            marg = -(pm * pm.clamp_min(1e-300).log()).sum(1)
            out.append(marg - self.weight * ent[rows].mean(1))
        return torch.cat(out)


# --- defaults -------------------------------------------------------------------------

#: Objective of ``search`` (a labelled dataset) unless the user names one: the labelled
#: objective with the lowest median top-1 regret in ``benchmarks/objectives.py``.
DEFAULT_LABELLED = "probe"
#: Objective of ``adapt`` (an unlabelled target domain), chosen the same way.
DEFAULT_UNLABELLED = "infomax"

# --- registry -------------------------------------------------------------------------

_OBJECTIVES: Registry[Objective] = Registry("objective", Objective, ObjectiveError, options="keyword arguments")


def register_objective(name: str, factory: Callable[..., Objective]) -> None:
    """Make ``get_objective(name, **kwargs)`` return ``factory(**kwargs)``."""
    _OBJECTIVES.register(name, factory)


def list_objectives() -> list[str]:
    """Names of the registered objectives."""
    return _OBJECTIVES.names()


def get_objective(objective: str | Objective, **kwargs: Any) -> Objective:
    """An objective by name, or as given.

    Names: ``probe``, ``knn``, ``logme``, ``head`` (labelled); ``infomax``, ``snd``, ``bnm``,
    ``entropy`` (unlabelled); options after a colon (``knn:k=20,temperature=0.1``); and
    ensembles (``ensemble:infomax+snd``, ``ensemble:2*infomax+bnm,mode=rank``). An objective
    made from a string with options keeps that string as its :attr:`Objective.name`, so the
    name recorded with a study rebuilds it.
    """
    if isinstance(objective, str) and ":" in objective:
        base, _, rest = objective.partition(":")
        if kwargs:
            raise ObjectiveError(f"objective {objective!r}: give options in the string or as keyword arguments, not both")
        if base.strip() == "ensemble":
            from ._ensemble import Ensemble

            try:
                return Ensemble.parse(rest)
            except ObjectiveError:
                raise
            except ValueError as exc:
                raise ObjectiveError(f"objective {objective!r}: {exc}") from None
        try:
            made = _OBJECTIVES.get_or_make(base.strip(), **_options(objective, rest))
        except ObjectiveError:
            raise
        except ValueError as exc:  # e.g. int("x") for k=x
            raise ObjectiveError(f"objective {objective!r}: {exc}") from None
        made.name = objective.strip()  # type: ignore[misc]
        return made
    return _OBJECTIVES.get_or_make(objective, **kwargs)


def _options(objective: str, text: str) -> dict[str, Any]:
    """``k=20,temperature=0.1`` -> {"k": 20, "temperature": 0.1} (values read as JSON, else text)."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    return parse_options(items, lambda item: ObjectiveError(f"objective {objective!r}: options are key=value, got {item!r}"))


def _register_builtin() -> None:
    from ._ensemble import Ensemble
    from ._transfer import Knn, LogME
    from ._unsupervised import BNM, SND

    for cls in (Probe, Knn, LogME, Head, Infomax, SND, BNM, Entropy):
        register_objective(cls.name, cls)
    register_objective("ensemble", Ensemble)


_register_builtin()


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
