from __future__ import annotations

import optuna
import pytest

from ordersearch.search import list_searchers
from ordersearch.testing import (
    check_budget,
    check_resume,
    check_seed_reproduces,
    check_valid_proposals,
    make_problem,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIONS = {"differentiable": {"steps": 8, "batch_images": 32}, "tpe": {"n_startup_trials": 4},
           "gp": {"n_startup_trials": 6}, "nsga2": {"population_size": 4}, "evolution": {"population": 5},
           "beam": {"width": 2}}


def _factory(name):
    from ordersearch.search import get_searcher

    return lambda: get_searcher(name, **OPTIONS.get(name, {}))


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def test_every_registered_searcher_is_covered():
    assert set(list_searchers()) >= {"random", "tpe", "nsga2", "evolution", "beam", "local", "exhaustive",
                                     "sources", "differentiable"}


@pytest.mark.parametrize("name", list_searchers())
def test_valid_proposals(name, problem):
    check_valid_proposals(_factory(name), problem)


@pytest.mark.parametrize("name", list_searchers())
def test_budget(name, problem):
    check_budget(_factory(name), problem)


@pytest.mark.parametrize("name", list_searchers())
def test_seed_reproduces(name, problem):
    check_seed_reproduces(_factory(name), problem)


@pytest.mark.parametrize("name", list_searchers())
def test_resume(name, problem, tmp_path):
    check_resume(_factory(name), problem, tmp_path)
