"""``ensemble``: several objectives combined into one, by z-scores or ranks.

Objectives are on different scales (``infomax`` in nats, ``bnm`` in [0, 1], ``snd`` in nats
of another distribution), so an ensemble puts each on the scale of a *reference population*
of orders before averaging: the identity and ``reference - 1`` seeded uniform random orders
of the bank, scored on the engine's EvalSet the first time the engine scores anything. Each
component's value then becomes a z-score (``mode="z"``, the default) or its mid-rank among
the reference values in [0, 1] (``mode="rank"``, which saturates above the best reference
order, so it separates good orders less well than ``z``), and the ensemble's value is their
weighted mean. The calibration is kept with the objective instance: an instance scored on
search images and then on held-out images keeps one scale.

String form (the CLI's ``--objective``): ``ensemble:infomax+snd``, with weights
``ensemble:2*infomax+snd`` and options after commas, e.g. ``ensemble:infomax+snd,mode=rank``.

Components must read the same output (all the head's logits, or all pooled features) and
fit nothing on a split (``probe`` cannot be a component; ``knn`` and ``logme`` can).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ObjectiveError
from ..evalset import EvalSet
from ..order import Order
from .objectives import Objective

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["Ensemble", "reference_orders"]


def reference_orders(n_blocks: int, count: int, seed: int = 0) -> list[Order]:
    """The identity and ``count - 1`` distinct uniform random orders (lengths 1..n_blocks,
    blocks drawn with replacement), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = [Order(tuple(range(n_blocks)))]
    seen = {out[0].ids}
    tries = 0
    while len(out) < count and tries < 100 * count:
        tries += 1
        length = int(torch.randint(1, n_blocks + 1, (1,), generator=g))
        ids = tuple(torch.randint(0, n_blocks, (length,), generator=g).tolist())
        if ids not in seen:
            seen.add(ids)
            out.append(Order(ids))
    return out


class Ensemble(Objective):
    """The weighted mean of component objectives, each standardised on a reference
    population of orders (see the module docstring).

    Args:
        components: Objectives (names or instances).
        weights: One per component (default: equal).
        mode: ``"z"`` (z-scores against the reference values) or ``"rank"`` (mid-ranks).
        reference: Orders in the reference population (the identity included).
        seed: Seed of the reference orders.

    Side metrics: each component's value under its name, each component's z-score or rank as
    ``<name>_z`` / ``<name>_rank``, and ``accuracy`` where a component reports it.
    """

    name = "ensemble"

    def __init__(
        self,
        components: Sequence[str | Objective],
        weights: Sequence[float] | None = None,
        mode: str = "z",
        reference: int = 32,
        seed: int = 0,
    ) -> None:
        from .objectives import get_objective

        self.components = [get_objective(c) for c in components]
        if len(self.components) < 2:
            raise ObjectiveError("an ensemble needs at least 2 objectives")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ObjectiveError(f"ensemble lists an objective twice: {'+'.join(names)}")
        if len({c.output for c in self.components}) > 1:
            raise ObjectiveError(
                f"ensemble {'+'.join(names)} mixes objectives on features and on logits; combine objectives "
                "that read the same output"
            )
        fitting = [c.name for c in self.components if c.fits or isinstance(c, Ensemble)]
        if fitting:
            raise ObjectiveError(f"ensemble cannot hold {', '.join(fitting)} (it fits on a split, or nests an ensemble)")
        if len({c.truth for c in self.components}) > 1:
            raise ObjectiveError(f"ensemble {'+'.join(names)} mixes labelled and unlabelled objectives")
        self.weights = [1.0] * len(self.components) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.components) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ObjectiveError("ensemble weights: one non-negative weight per objective, not all zero")
        if mode not in ("z", "rank"):
            raise ObjectiveError(f"ensemble mode must be 'z' or 'rank', got {mode!r}")
        if int(reference) < 3:
            raise ObjectiveError(f"ensemble reference must be >= 3 orders, got {reference}")
        self.mode, self.reference, self.seed = mode, int(reference), int(seed)
        self.output = self.components[0].output  # type: ignore[misc]
        self.needs_labels = any(c.needs_labels for c in self.components)  # type: ignore[misc]
        self.truth = self.components[0].truth  # type: ignore[misc]
        #: Reference values per component (R,), set by :meth:`calibrate`.
        self.reference_values: list[torch.Tensor] | None = None
        self.name = self.spec  # type: ignore[misc]  # the string that rebuilds it

    @classmethod
    def parse(cls, spec: str) -> Ensemble:
        """An ensemble from its string form, e.g. ``infomax+snd`` or ``2*infomax+snd,mode=rank``
        (the part after ``ensemble:``)."""
        expr, *opts = [p.strip() for p in spec.split(",")]
        names, weights = [], []
        for term in expr.split("+"):
            w, _, name = term.strip().rpartition("*")
            try:
                weights.append(float(w) if w else 1.0)
            except ValueError:
                raise ObjectiveError(f"ensemble term {term!r}: the weight must be a number, as in 2*infomax") from None
            names.append(name.strip())
        kwargs: dict[str, Any] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or key not in ("mode", "reference", "seed"):
                raise ObjectiveError(f"ensemble option {opt!r}: expected mode=z|rank, reference=N or seed=N")
            kwargs[key] = value if key == "mode" else _int(key, value)
        return cls(names, weights, **kwargs)

    @property
    def spec(self) -> str:
        """The string form that rebuilds this ensemble."""
        terms = [c.name if w == 1.0 else f"{w:g}*{c.name}" for c, w in zip(self.components, self.weights)]
        opts = "" if self.mode == "z" else f",mode={self.mode}"
        return f"ensemble:{'+'.join(terms)}{opts}"

    def prepare(self, evalset: EvalSet) -> list[Any]:
        return [c.prepare(evalset) for c in self.components]

    def calibrate(self, engine: Engine) -> None:
        """Score the reference orders' component values on ``engine`` (once per instance)."""
        if self.reference_values is not None:
            return
        states = self.prepare(engine.evalset)
        rows = []
        for order in reference_orders(engine.bank.n_blocks, self.reference, self.seed):
            try:
                out = engine.outputs(order)
            except ValueError:  # non-finite outputs: not part of the population
                continue
            rows.append([c.score(out, engine.evalset, s)[0] for c, s in zip(self.components, states)])
        values = torch.tensor(rows, dtype=torch.float64)
        if len(rows) < 3 or not bool(torch.isfinite(values).all()):
            raise ObjectiveError(f"{self.spec}: fewer than 3 reference orders have finite component values")
        self.reference_values = list(values.T)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: list[Any]) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: list[Any]
    ) -> list[tuple[float, dict[str, float]]]:
        if self.reference_values is None:
            raise RuntimeError(f"{self.spec} is not calibrated: an Engine calibrates it before it scores")
        per = [c.score_many(outputs, evalset, s) for c, s in zip(self.components, state)]
        out = []
        for i in range(len(outputs)):
            metrics: dict[str, float] = {}
            raw = []
            for c, scores in zip(self.components, per):
                value, side = scores[i]
                raw.append(value)
                metrics[c.name] = value
                if "accuracy" in side:
                    metrics["accuracy"] = side["accuracy"]
            scaled = self._scaled(torch.tensor(raw, dtype=torch.float64)[:, None])[:, 0]
            for c, v in zip(self.components, scaled.tolist()):
                metrics[f"{c.name}_{self.mode}"] = v
            out.append((self._combine(scaled[:, None])[0], metrics))
        return out

    def resampled_values(self, outputs: torch.Tensor, evalset: EvalSet, state: list[Any], idx: torch.Tensor) -> torch.Tensor:
        """The components' resampled values, scaled and combined (the scaling is fixed, so this
        is exactly the ensemble's value on each resample)."""
        raw = torch.stack([c.resampled_values(outputs, evalset, s, idx).double() for c, s in zip(self.components, state)])
        return torch.tensor(self._combine(self._scaled(raw)), dtype=torch.float64)

    def _scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """(K, M) component values -> their z-scores or reference mid-ranks."""
        assert self.reference_values is not None
        out = []
        for values, ref in zip(raw, self.reference_values):
            if self.mode == "z":
                sd = float(ref.std())
                out.append((values - ref.mean()) / (sd if sd > 1e-12 * max(1.0, float(ref.abs().max())) else 1.0))
            else:
                below = (ref[None, :] < values[:, None]).double().sum(1)
                ties = (ref[None, :] == values[:, None]).double().sum(1)
                out.append((below + 0.5 * ties) / len(ref))
        return torch.stack(out)

    def _combine(self, scaled: torch.Tensor) -> list[float]:
        w = torch.tensor(self.weights, dtype=torch.float64)[:, None]
        return ((w * scaled).sum(0) / w.sum()).tolist()

    def __repr__(self) -> str:
        return f"Ensemble({self.spec!r})"


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ObjectiveError(f"ensemble option {key}={value!r}: expected an integer") from None
