"""A conformance suite every searcher must pass, shipped with the package.

In the spirit of ``optuna.testing.pytest_samplers``: a searcher (built-in or registered by a
user) is checked for the behaviour a search relies on:

- **valid proposals**: every trial's order is in the space, identity first;
- **budget**: never more trials than ``n_trials``, whatever the batch size;
- **seed**: the same seed proposes the same trials;
- **resume**: a search interrupted mid-batch and resumed from its storage finishes the
  budget without repeating or losing a finished trial.

Use the ``check_*`` functions directly, or subclass :class:`SearcherConformance` in a test
module and override its ``searcher_factory`` fixture::

    class TestMySearcher(SearcherConformance):
        @pytest.fixture
        def searcher_factory(self):
            return lambda: MySearcher(width=2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from .order import Order
from .space import OrderSpace

__all__ = [
    "Problem",
    "SearcherConformance",
    "check_budget",
    "check_resume",
    "check_seed_reproduces",
    "check_valid_proposals",
    "make_problem",
]

SearcherFactory = Callable[[], Any]


@dataclass
class Problem:
    """A tiny search problem: a bank, an EvalSet, a space and an objective."""

    bank: Any
    evalset: Any
    space: OrderSpace
    objective: str = "probe"

    def engine(self) -> Any:
        from .engine import Engine

        return Engine(self.bank, self.evalset, self.objective, cache_bytes=2**24, batch_size=64)

    def run(self, factory: SearcherFactory, **kwargs: Any) -> Any:
        from .search import search

        kwargs.setdefault("engine", self.engine())
        return search(self.bank, self.evalset, searcher=factory(), space=self.space, **kwargs)


def make_problem(n_images: int = 120, *, max_len: int = 5, max_repeats: int = 2) -> Problem:
    """A 4-block isometric ResNet bank (random weights, two source orders) scored by the ridge
    probe on ``n_images`` real digits; orders up to ``max_len`` deep with block reuse."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from .adapters import load_bank
    from .evalset import EvalSet

    bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    bank.source_orders = {"task_a": Order([0, 2, 1, 3]), "task_b": Order([3, 1, 1])}
    d = load_digits()
    x = torch.tensor(d.images[:n_images], dtype=torch.float32)[:, None]
    x = (F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) / 16 - 0.5) / 0.5
    evalset = EvalSet(x, torch.tensor(d.target[:n_images]), name=f"digits[{n_images}]")
    return Problem(bank, evalset, OrderSpace(4, max_len=max_len, max_repeats=max_repeats))


def _orders(study: Any) -> list[Order]:
    return [Order.parse(t.user_attrs["order"]) for t in study.get_trials(deepcopy=False)]


def _counted(study: Any) -> list[Any]:
    from .search._study import counts_toward_budget

    return [t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)]


def check_valid_proposals(factory: SearcherFactory, problem: Problem, *, n_trials: int = 12, batch_size: int = 4,
                          seed: int = 0) -> None:
    """Every trial records an order in the space; trial 0 is the identity."""
    result = problem.run(factory, n_trials=n_trials, batch_size=batch_size, seed=seed)
    trials = result.study.get_trials(deepcopy=False)
    assert trials, "no trial recorded"
    assert trials[0].user_attrs.get("baseline") and Order.parse(trials[0].user_attrs["order"]) == problem.bank.identity
    for t in trials:
        assert "order" in t.user_attrs, f"trial {t.number} has no 'order' user attribute"
        order = Order.parse(t.user_attrs["order"])
        assert problem.space.contains(order), f"trial {t.number} proposed {order}, outside {problem.space}"
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    assert list(result.trials["order"]) == [t.user_attrs["order"] for t in trials]


def check_budget(factory: SearcherFactory, problem: Problem, *, budgets: tuple[int, ...] = (1, 6, 11),
                 batch_size: int = 4) -> None:
    """Never more trials than the budget, and never an order asked twice."""
    for n in budgets:
        result = problem.run(factory, n_trials=n, batch_size=batch_size, seed=1)
        trials = result.study.get_trials(deepcopy=False)
        assert 1 <= len(trials) <= n, f"budget {n}: {len(trials)} trials"
        orders = _orders(result.study)
        assert len(set(orders)) == len(orders), f"repeated orders: {orders}"


def check_seed_reproduces(factory: SearcherFactory, problem: Problem, *, n_trials: int = 10, batch_size: int = 3) -> None:
    """Two searches with one seed propose the same orders and get the same scores."""
    runs = [problem.run(factory, n_trials=n_trials, batch_size=batch_size, seed=7) for _ in range(2)]
    a, b = (r.trials for r in runs)
    assert list(a["order"]) == list(b["order"]), f"{list(a['order'])} != {list(b['order'])}"
    assert list(a["value"].fillna(-1)) == list(b["value"].fillna(-1))


class _Interrupt(Exception):
    """Raised by :class:`_FlakyEngine` to simulate a crash in the middle of a batch."""


class _FlakyEngine:
    """An engine that raises on its ``fail_at``-th call to ``evaluate``."""

    def __init__(self, engine: Any, fail_at: int) -> None:
        self._engine, self._left = engine, fail_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self._left -= 1
        if self._left == 0:
            raise _Interrupt("simulated crash")
        return self._engine.evaluate(*args, **kwargs)


def check_resume(factory: SearcherFactory, problem: Problem, tmp_path: Path, *, n_trials: int = 11,
                 batch_size: int = 3, fail_at: int = 2) -> None:
    """Interrupt a search mid-batch, resume it from its SQLite storage: the budget is
    finished, finished trials are kept as they were and none is evaluated again."""
    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    with pytest.raises(_Interrupt):
        problem.run(factory, n_trials=n_trials, batch_size=batch_size, seed=3, storage=storage, study_name="s",
                    engine=_FlakyEngine(problem.engine(), fail_at))
    import optuna

    study = optuna.load_study(study_name="s", storage=storage)
    before = {t.number: (t.user_attrs["order"], t.values) for t in _counted(study)}
    interrupted = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL and t.user_attrs.get("lost")]
    assert before, "nothing finished before the interruption"
    assert interrupted, "the interrupted batch was not recorded as failed"
    result = problem.run(factory, n_trials=n_trials, batch_size=batch_size, seed=3, storage=storage, study_name="s")
    after = _counted(result.study)
    assert len(after) <= n_trials
    assert {t.number: (t.user_attrs["order"], t.values) for t in after if t.number in before} == before
    assert all(t.number in before for t in after[: len(before)])
    orders = [t.user_attrs["order"] for t in after]
    assert len(set(orders)) == len(orders), f"a finished order was evaluated again: {orders}"
    # the budget is met, unless the searcher ran out of proposals (every trial then counts)
    assert len(after) == n_trials or len(after) == len(result.study.get_trials()) - len(interrupted)


class SearcherConformance:
    """pytest base class: subclass it and override :meth:`searcher_factory`."""

    @pytest.fixture
    def searcher_factory(self) -> SearcherFactory:
        raise NotImplementedError("override the searcher_factory fixture")

    @pytest.fixture(scope="class")
    def problem(self) -> Problem:
        return make_problem()

    def test_valid_proposals(self, searcher_factory: SearcherFactory, problem: Problem) -> None:
        check_valid_proposals(searcher_factory, problem)

    def test_budget(self, searcher_factory: SearcherFactory, problem: Problem) -> None:
        check_budget(searcher_factory, problem)

    def test_seed_reproduces(self, searcher_factory: SearcherFactory, problem: Problem) -> None:
        check_seed_reproduces(searcher_factory, problem)

    def test_resume(self, searcher_factory: SearcherFactory, problem: Problem, tmp_path: Path) -> None:
        check_resume(searcher_factory, problem, tmp_path)
