"""Optuna's own sampler conformance suite (``optuna.testing.pytest_samplers``) run against
every sampler the project ships, each under the test cases of the capabilities it declares:

- :class:`UniformSampler`: basic, relative, multi-objective;
- :class:`EvolutionSampler`: basic, relative, single-objective only (it refuses a
  multi-objective study);
- :class:`FreshOrders` around TPE, GP and NSGA-II: basic, relative, and multi-objective
  where the wrapped sampler is.

The suite samples parameters named ``x``/``y`` that are not positions of an order: the
samplers must sample the search space they are given, and sample parameters outside the
order encoding independently.
"""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
    SingleOnlySamplerTestCase,
)

from ordersearch import Order, OrderSpace
from ordersearch.search._encoding import OrderEncoding
from ordersearch.search._evolution import EvolutionSampler
from ordersearch.search._optuna import FreshOrders
from ordersearch.search._random import UniformSampler

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _encoding() -> OrderEncoding:
    return OrderEncoding(OrderSpace(4, max_len=5, max_repeats=2))


class TestUniformSampler(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: UniformSampler(_encoding(), seed=0)


class TestEvolutionSampler(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: EvolutionSampler(_encoding(), population=4, tournament=2, seed=0)


class TestFreshTPE(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: FreshOrders(optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True),
                                   _encoding(), seed=0)


class TestFreshGP(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: FreshOrders(optuna.samplers.GPSampler(seed=0, n_startup_trials=2), _encoding(), seed=0)


class TestFreshNSGA2(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self):
        return lambda: FreshOrders(optuna.samplers.NSGAIISampler(population_size=4, seed=0), _encoding(), seed=0)


# Outside Optuna's suite ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: UniformSampler(_encoding(), seed=3),
    lambda: EvolutionSampler(_encoding(), seed=3),
    lambda: FreshOrders(optuna.samplers.TPESampler(seed=3), _encoding(), seed=3),
], ids=["uniform", "evolution", "fresh-tpe"])
def test_two_parameters_of_one_trial_differ(make) -> None:
    study = optuna.create_study(sampler=make())
    for _ in range(10):
        t = study.ask()
        a, b = t.suggest_float("a", 0, 1), t.suggest_float("b", 0, 1)
        assert a != b
        study.tell(t, a)


def test_independent_parameters_reproduce_with_the_seed() -> None:
    def run() -> list[float]:
        study = optuna.create_study(sampler=UniformSampler(_encoding(), seed=11))
        out = []
        for _ in range(5):
            t = study.ask()
            out += [t.suggest_float("a", 0, 1), t.suggest_int("n", 0, 100)]
            study.tell(t, 0.0)
        return out
    assert run() == run()


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_evolution_tournament_follows_the_direction(direction: str) -> None:
    enc = _encoding()
    sampler = EvolutionSampler(enc, population=6, tournament=6, seed=0)
    study = optuna.create_study(direction=direction, sampler=sampler)
    orders = [Order.parse(t) for t in ("0", "1", "2", "3", "0-1", "1-2")]
    for i, o in enumerate(orders):
        study.add_trial(optuna.trial.create_trial(
            params=enc.params(o), distributions=enc.distributions, value=float(i), user_attrs={"order": str(o)}))
    best = orders[-1] if direction == "maximize" else orders[0]
    members = sampler.members(study.get_trials(deepcopy=False))
    assert sampler.winner(study, members, random.Random(0)) == best


def test_evolution_beats_uniform_when_minimising() -> None:
    """A cheap objective with one optimum (distance to a fixed order): in a minimize study
    aging evolution must do better than uniform sampling (it did worse while its tournament
    always took the maximum)."""
    enc = OrderEncoding(OrderSpace(6, max_len=6, min_len=1, max_repeats=1))
    target = Order.parse("5-4-3-2-1-0")

    def loss(o: Order) -> float:
        return float(sum(a != b for a, b in zip(o, target)) + abs(len(o) - len(target)))

    def best(sampler) -> float:
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for _ in range(80):
            t = study.ask()
            o = enc.suggest(t)
            study.tell(t, loss(o))
        return study.best_value

    evo = [best(EvolutionSampler(enc, population=12, tournament=4, seed=s)) for s in range(4)]
    uni = [best(UniformSampler(enc, seed=s)) for s in range(4)]
    assert sum(evo) < sum(uni), (evo, uni)


def test_evolution_refuses_a_multi_objective_study_in_one_clear_line() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=EvolutionSampler(_encoding(), seed=0))
    with pytest.raises(ValueError, match="single-objective"):
        study.ask().suggest_categorical("pos_0", _encoding().choices)
