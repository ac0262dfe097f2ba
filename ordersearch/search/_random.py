"""``random``: orders drawn uniformly from the space, without repeats.

Written as an Optuna sampler (:class:`OrderSampler`) over the order encoding, so it runs on
shared storage like any Optuna sampler. Each trial's random source is fixed by the seed and
the trial number: a resumed search draws what an uninterrupted one would have.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from ..order import Order
from ._base import SamplerSearcher, SearchContext, register_searcher
from ._encoding import OrderEncoding, is_live, order_of

__all__ = ["OrderSampler", "RandomSearcher", "UniformSampler"]


class OrderSampler(BaseSampler):
    """Base of samplers that propose a whole order per trial (relative sampling over all
    positions of the encoding).

    Args:
        encoding: The order encoding.
        seed: Seed; each trial draws from ``Random(f"{seed}:{trial.number}")``.
        max_tries: Draws before a repeated order is accepted.
    """

    def __init__(self, encoding: OrderEncoding, *, seed: int | None = None, max_tries: int = 100) -> None:
        self.encoding = encoding
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.max_tries = max_tries

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.encoding.distributions)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        rng = random.Random(f"{self.seed}:{trial.number}")
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        seen = {o for t in trials if is_live(t) and (o := order_of(t, self.encoding)) is not None}
        order = None
        for _ in range(self.max_tries):
            order = self.propose(study, trials, rng)
            if order not in seen:
                break
        assert order is not None
        params = self.encoding.params(order)
        assert params is not None, f"{type(self).__name__} proposed {order}, outside the space"
        return params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        # Only reached for parameters outside the encoding (none in an ordersearch study).
        return optuna.samplers.RandomSampler(seed=self.seed + trial.number).sample_independent(
            study, trial, param_name, param_distribution
        )

    @abstractmethod
    def propose(self, study: Study, trials: list[FrozenTrial], rng: random.Random) -> Order:
        """One order of the space for the next trial (``trials``: the study's other trials)."""


class UniformSampler(OrderSampler):
    """Orders uniformly from the space (``OrderSpace.sample``), rejecting repeats."""

    def propose(self, study: Study, trials: list[FrozenTrial], rng: random.Random) -> Order:
        return self.encoding.space.sample(rng)


@dataclass(frozen=True)
class RandomSearcher(SamplerSearcher):
    """Uniform random search without repeats: the baseline every searcher must beat.

    Example:
        >>> RandomSearcher().name
        'random'
    """

    name = "random"

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        return UniformSampler(ctx.encoding, seed=ctx.seed)


register_searcher("random", RandomSearcher)
