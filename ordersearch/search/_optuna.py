"""Optuna's own samplers over the order encoding: ``tpe``, ``gp`` and ``nsga2``.

Each position of an order is a categorical parameter (blocks plus skip, see
:mod:`._encoding`); invalid assignments are repaired. ``nsga2`` is multi-objective: it
maximises the score and minimises the depth (the compute of the order), and its result
carries the Pareto front.

Each sampler is wrapped in :class:`FreshOrders`, so that it proposes orders no live trial of
the study has (many assignments repair to one order, and several workers share a study), and
is seeded with the worker's seed (:attr:`SearchContext.worker_seed`), so that workers joining
one study do not propose in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from ..order import Order
from ._base import SamplerSearcher, SearchContext, register_searcher
from ._encoding import OrderEncoding, is_live, order_of

__all__ = ["FreshOrders", "GPSearcher", "NSGA2Searcher", "TPESearcher"]


class FreshOrders(BaseSampler):
    """An Optuna sampler whose trials get orders that no live trial of the study has.

    Draws again while the order decoded from a proposal is known: first the wrapped
    sampler's joint (relative) proposal, then its per-parameter proposal, and last a uniform
    order of the space (seeded by ``seed`` and the trial number). Only when every draw is
    known (the space is exhausted) is a known order returned; the search loop then refuses
    it. Enqueued trials and parameters outside the order encoding pass through unchanged.

    Args:
        sampler: The wrapped sampler (TPE, GP, NSGA-II, ...).
        encoding: The order encoding.
        seed: Seed of the uniform fallback.
        tries: Proposals asked of ``sampler`` (half joint, half per parameter).
    """

    def __init__(self, sampler: BaseSampler, encoding: OrderEncoding, *, seed: int | None = None,
                 tries: int = 8) -> None:
        self.sampler, self.encoding, self.tries = sampler, encoding, tries
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {**self.sampler.infer_relative_search_space(study, trial), **self.encoding.distributions}

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """The wrapped sampler's joint proposal for the part of ``search_space`` it models, the
        rest sampled independently by it; drawn again while the order is a known one."""
        inner = {k: v for k, v in self.sampler.infer_relative_search_space(study, trial).items() if k in search_space}
        if trial.system_attrs.get("fixed_params"):
            return self.sampler.sample_relative(study, trial, inner)
        fresh = all(search_space.get(n) == self.encoding.distribution for n in self.encoding.names)
        seen = {o for t in study.get_trials(deepcopy=False) if t.number != trial.number and is_live(t)
                and (o := order_of(t, self.encoding)) is not None} if fresh else set()
        params: dict[str, Any] = {}
        for attempt in range(self.tries if fresh else 1):
            params = dict(self.sampler.sample_relative(study, trial, inner)) if attempt < self.tries // 2 else {}
            for name, dist in search_space.items():
                if name not in params:
                    params[name] = self.sampler.sample_independent(study, trial, name, dist)
            if not fresh or self.encoding.decode(params) not in seen:
                return params
        rng = random.Random(f"{self.seed}:{trial.number}")
        for _ in range(100):  # the sampler keeps proposing known orders
            order = self.encoding.space.sample(rng)
            if order not in seen:
                return {**params, **(self.encoding.params(order) or {})}
        return params

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


@dataclass(frozen=True)
class TPESearcher(SamplerSearcher):
    """Optuna's Tree-structured Parzen Estimator (multivariate, constant liar for batches).

    Args:
        n_startup_trials: Random trials before the model is used.
        multivariate: Model the positions jointly.
    """

    name = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = True

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        return FreshOrders(optuna.samplers.TPESampler(
            seed=ctx.worker_seed, n_startup_trials=self.n_startup_trials, multivariate=self.multivariate,
            constant_liar=True,
        ), ctx.encoding, seed=ctx.worker_seed)


@dataclass(frozen=True)
class GPSearcher(SamplerSearcher):
    """Optuna's Gaussian-process sampler (categorical positions).

    Args:
        n_startup_trials: Random trials before the model is used.
    """

    name = "gp"
    n_startup_trials: int = 10

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        return FreshOrders(optuna.samplers.GPSampler(seed=ctx.worker_seed, n_startup_trials=self.n_startup_trials),
                           ctx.encoding, seed=ctx.worker_seed)


@dataclass(frozen=True)
class NSGA2Searcher(SamplerSearcher):
    """Optuna's NSGA-II on two objectives: score (maximised) and depth (minimised).

    Args:
        population_size: Individuals per generation.
    """

    name = "nsga2"
    directions = ("maximize", "minimize")
    population_size: int = 16

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        return FreshOrders(optuna.samplers.NSGAIISampler(population_size=self.population_size, seed=ctx.worker_seed),
                           ctx.encoding, seed=ctx.worker_seed)

    def values(self, score: float, order: Order) -> list[float]:
        return [score, float(len(order))]


register_searcher("tpe", TPESearcher)
if hasattr(optuna.samplers, "GPSampler"):  # Optuna >= 3.6
    register_searcher("gp", GPSearcher)
register_searcher("nsga2", NSGA2Searcher)
