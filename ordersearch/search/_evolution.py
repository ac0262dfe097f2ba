"""``evolution``: regularized (aging) evolution over orders, as an Optuna sampler.

Real et al.'s regularized evolution (AAAI 2019): the population is the last ``population``
completed trials (the oldest leave, whatever their score); each child is a mutation of the
winner of a tournament among ``tournament`` random members. The population is rebuilt from
the study's trials at every proposal, as Optuna's GA samplers keep their generations in
storage, so the search resumes and runs on shared storage.

For multi-source adaptation (Zhmoginov, Bashkirova and Sandler, arXiv 2107.10963) the bank's
source orders are proposed first and, when there are several, children are also made by
one- or two-point crossover between tournament winners.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ..order import Order
from ._base import SamplerSearcher, SearchContext, register_searcher
from ._encoding import OrderEncoding, is_live, order_of
from ._mutations import DEFAULT_MUTATIONS, Crossover, Mutation, OnePoint, TwoPoint, mutate
from ._random import OrderSampler

__all__ = ["EvolutionSampler", "EvolutionSearcher"]


def gain(study: Study, value: float) -> float:
    """``value`` signed so that larger is better in ``study``'s direction."""
    return -value if study.direction == StudyDirection.MINIMIZE else value


class EvolutionSampler(OrderSampler):
    """Aging evolution with order mutations and optional crossover.

    Args:
        encoding: The order encoding.
        population: Size of the population (the last completed trials).
        tournament: Members drawn per tournament.
        mutations: Mutation operators (default: replace, swap, insert, delete, duplicate).
        crossovers: Crossover operators used with probability ``crossover_prob``.
        crossover_prob: Chance that a child is a crossover of two tournament winners.
        late_bias: Mutation position weight ``(position + 1) ** late_bias``; > 0 favours
            late positions, whose children share longer prefixes with their parents.
        seeds: Orders proposed before anything else (e.g. the bank's source orders).
        seed: Random seed.
    """

    def __init__(
        self,
        encoding: OrderEncoding,
        *,
        population: int = 16,
        tournament: int = 4,
        mutations: Sequence[Mutation] = DEFAULT_MUTATIONS,
        crossovers: Sequence[Crossover] = (OnePoint(), TwoPoint()),
        crossover_prob: float = 0.0,
        late_bias: float = 0.0,
        seeds: Sequence[Order] = (),
        seed: int | None = None,
    ) -> None:
        super().__init__(encoding, seed=seed)
        self.population = population
        self.tournament = tournament
        self.mutations = tuple(mutations)
        self.crossovers = tuple(crossovers)
        self.crossover_prob = crossover_prob
        self.late_bias = late_bias
        self.seeds = [o for o in seeds if encoding.space.contains(o)]

    def check_study(self, study: Study) -> None:
        if len(study.directions) > 1:
            raise ValueError(f"evolution is a single-objective sampler; this study has {len(study.directions)} "
                             "objectives (use nsga2 or tpe for several)")

    def members(self, trials: list[FrozenTrial]) -> list[tuple[Order, float]]:
        """The current population: ``(order, score)`` of the last completed trials."""
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values), key=lambda t: t.number)
        out = []
        for t in done[-self.population:]:
            o = order_of(t, self.encoding)
            if o is not None and self.encoding.space.contains(o):
                out.append((o, t.values[0]))
        return out

    def propose(self, study: Study, trials: list[FrozenTrial], rng: random.Random) -> Order:
        space = self.encoding.space
        seen = {o for t in trials if is_live(t) and (o := order_of(t, self.encoding)) is not None}
        for s in self.seeds:
            if s not in seen:
                return s
        pop = self.members(trials)
        if len(trials) < self.population or not pop:
            return space.sample(rng)
        parent = self.winner(study, pop, rng)
        child: Order | None = None
        if self.crossovers and len({o for o, _ in pop}) > 1 and rng.random() < self.crossover_prob:
            other = self.winner(study, pop, rng)
            if other != parent:
                child = rng.choice(self.crossovers)(parent, other, space, rng)
                if child in (parent, other) or not space.contains(child):
                    child = None
        if child is None:
            child = mutate(parent, space, rng, self.mutations, late_bias=self.late_bias)
        return child if child is not None else space.sample(rng)

    def winner(self, study: Study, pop: list[tuple[Order, float]], rng: random.Random) -> Order:
        """The best of ``tournament`` random members, in the study's direction."""
        picks = rng.sample(pop, min(self.tournament, len(pop)))
        return max(picks, key=lambda m: gain(study, m[1]))[0]


@dataclass(frozen=True)
class EvolutionSearcher(SamplerSearcher):
    """Regularized evolution (see :class:`EvolutionSampler`).

    Args:
        population: Population size.
        tournament: Tournament size.
        mutations: Mutation operators.
        crossovers: Crossover operators.
        crossover_prob: Crossover probability; None: 0.5 when the bank carries two or more
            source orders (multi-source adaptation), else 0.
        late_bias: Bias of mutation positions toward the end of the order (0: uniform).
        use_sources: Propose the bank's source orders first.

    Example:
        >>> EvolutionSearcher(population=8, late_bias=1.0).name
        'evolution'
    """

    name = "evolution"
    population: int = 16
    tournament: int = 4
    mutations: tuple[Mutation, ...] = field(default=DEFAULT_MUTATIONS)
    crossovers: tuple[Crossover, ...] = field(default=(OnePoint(), TwoPoint()))
    crossover_prob: float | None = None
    late_bias: float = 0.0
    use_sources: bool = True

    def _sources(self, ctx: SearchContext) -> list[Order]:
        if not self.use_sources or ctx.bank is None:
            return []
        return list(getattr(ctx.bank, "source_orders", {}).values())

    def make_sampler(self, ctx: SearchContext) -> BaseSampler:
        sources = self._sources(ctx)
        prob = self.crossover_prob if self.crossover_prob is not None else (0.5 if len(sources) >= 2 else 0.0)
        return EvolutionSampler(
            ctx.encoding, population=self.population, tournament=self.tournament, mutations=self.mutations,
            crossovers=self.crossovers, crossover_prob=prob, late_bias=self.late_bias, seeds=sources, seed=ctx.seed,
        )

    def retain(self, ctx: SearchContext) -> list[Order]:
        assert ctx.study is not None
        sampler = ctx.study.sampler
        if not isinstance(sampler, EvolutionSampler):
            return []
        pop = sorted(sampler.members(ctx.trials()), key=lambda m: -gain(ctx.study, m[1]))
        return [o for o, _ in pop[: self.tournament]]


register_searcher("evolution", EvolutionSearcher)
