"""``random``: orders drawn uniformly from the space, without repeats.

Written as an Optuna sampler (:class:`OrderSampler`) over the order encoding, so it runs on
shared storage like any Optuna sampler. Each trial's random source is fixed by the seed and
the trial number: a resumed search draws what an uninterrupted one would have.
"""

from __future__ import annotations

import random
import zlib
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

__all__ = ["OrderSampler", "RandomSearcher", "UniformSampler", "sample_independent"]


def sample_independent(seed: int, study: Study, trial: FrozenTrial, name: str, distribution: BaseDistribution) -> Any:
    """A uniform draw of one parameter outside the order encoding, from a random source fixed
    by ``seed``, the trial number and the parameter's name (two parameters of one trial, or
    one parameter of two trials, get independent draws; a rerun gets the same ones)."""
    key = zlib.crc32(f"{seed}:{trial.number}:{name}".encode())
    return optuna.samplers.RandomSampler(seed=key).sample_independent(study, trial, name, distribution)


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

    def check_study(self, study: Study) -> None:
        """Raise ValueError for a study this sampler cannot serve (none by default)."""

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.encoding.distributions)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """One proposed order for the positions of ``search_space`` that are positions of the
        encoding; every other parameter of ``search_space`` sampled independently."""
        self.check_study(study)
        positions = [n for n in self.encoding.names if search_space.get(n) == self.encoding.distribution]
        out: dict[str, Any] = {}
        if positions:
            params = self.encoding.params(self._order(study, trial))
            out = {n: params[n] for n in positions}
        for name, distribution in search_space.items():
            if name not in out:
                out[name] = sample_independent(self.seed, study, trial, name, distribution)
        return out

    def _order(self, study: Study, trial: FrozenTrial) -> Order:
        rng = random.Random(f"{self.seed}:{trial.number}")
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        seen = {o for t in trials if is_live(t) and (o := order_of(t, self.encoding)) is not None}
        order = None
        for _ in range(self.max_tries):
            order = self.propose(study, trials, rng)
            if order not in seen:
                break
        assert order is not None and self.encoding.space.contains(order), \
            f"{type(self).__name__} proposed {order}, outside the space"
        return order

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self.check_study(study)
        return sample_independent(self.seed, study, trial, param_name, param_distribution)

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
