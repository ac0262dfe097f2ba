"""Optuna's own samplers over the order encoding: ``tpe``, ``gp`` and ``nsga2``.

Each position of an order is a categorical parameter (blocks plus skip, see
:mod:`._encoding`); invalid assignments are repaired. ``nsga2`` is multi-objective: it
maximises the score and minimises the depth (the compute of the order), and its result
carries the Pareto front.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.samplers import BaseSampler

from ..order import Order
from ._base import SamplerSearcher, SearchContext, register_searcher

__all__ = ["GPSearcher", "NSGA2Searcher", "TPESearcher"]


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
        return optuna.samplers.TPESampler(
            seed=ctx.seed, n_startup_trials=self.n_startup_trials, multivariate=self.multivariate,
            constant_liar=True,
        )


@dataclass(frozen=True)
class GPSearcher(SamplerSearcher):
    """Optuna's Gaussian-process sampler (categorical positions).

    Args:
        n_startup_trials: Random trials before the model is used.
    """

    name = "gp"
    n_startup_trials: int = 10

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        return optuna.samplers.GPSampler(seed=ctx.seed, n_startup_trials=self.n_startup_trials)


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
        return optuna.samplers.NSGAIISampler(population_size=self.population_size, seed=ctx.seed)

    def values(self, score: float, order: Order) -> list[float]:
        return [score, float(len(order))]


register_searcher("tpe", TPESearcher)
if hasattr(optuna.samplers, "GPSampler"):  # Optuna >= 3.6
    register_searcher("gp", GPSearcher)
register_searcher("nsga2", NSGA2Searcher)
