"""Objectives: one float per candidate order (higher is better) plus side metrics.

An objective reads either the pooled features (``bank.features``) or the source head's logits
of a candidate order on the whole EvalSet:

- ``probe`` — closed-form ridge linear probe: fit on the EvalSet's train split with the ridge
  strength chosen by exact leave-one-out error, accuracy on its val split. The score for a
  new labelled dataset (transfer by reordering, Zhmoginov et al., arXiv 2107.10963;
  ``_probe.py``).
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


from ._probe import Probe  # noqa: E402  (it subclasses Objective, defined above)

_register_builtin()


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
