"""Same seed, same answer, whatever torch's thread count.

Searches need no setting: forward passes, the engine and the objectives give the same numbers
with one thread or two. Training does not (a convolution's weight gradient is summed in
per-thread parts), so its thread count is a setting (``FitConfig.threads``,
``TrainConfig.threads``), and the demo trains on one thread.
"""

from __future__ import annotations

import pytest
import torch

from ordersearch import IsoResNet
from ordersearch.isoresnet import parse_isoresnet_source
from ordersearch.search import get_searcher
from ordersearch.testing import make_problem
from ordersearch.train import FitConfig, fit_classifier


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("objective", ["probe", "infomax"])
def test_a_search_gives_the_same_scores_on_one_thread_and_two(restore_threads, objective):
    problem = make_problem(240)
    problem.objective = objective
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(problem.run(lambda: get_searcher("evolution"), n_trials=14, batch_size=5, seed=3).trials)
    a, b = runs
    assert list(a["order"]) == list(b["order"])
    assert list(a["value"]) == list(b["value"])  # bit for bit


def _train(ambient: int, threads: int | None) -> list[torch.Tensor]:
    torch.set_num_threads(ambient)
    torch.manual_seed(0)
    model = IsoResNet(parse_isoresnet_source("isoresnet:width=8,blocks=2,classes=10"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 16, 16, generator=g), torch.randint(0, 10, (96,), generator=g)
    fit_classifier(model, x, y, FitConfig(epochs=1, batch_size=48, seed=0, threads=threads))
    assert torch.get_num_threads() == ambient  # restored
    return [p.detach().clone() for p in model.parameters()]


def test_training_with_a_thread_setting_does_not_depend_on_the_ambient_count(restore_threads):
    one, two = _train(1, threads=1), _train(2, threads=1)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


def test_the_thread_count_changes_trained_weights(restore_threads):
    """Why the setting exists: if this starts passing bit for bit, the setting can go."""
    one, two = _train(1, threads=None), _train(2, threads=None)
    assert not all(torch.equal(p, q) for p, q in zip(one, two))


def test_train_records_its_thread_count():
    from ordersearch.errors import OrderSearchError
    from ordersearch.train import TrainConfig

    assert TrainConfig(tasks=("digits",), threads=1).resolved()["resolved"]["threads"] == 1
    assert TrainConfig(tasks=("digits",)).resolved()["resolved"]["threads"] == torch.get_num_threads()
    with pytest.raises(OrderSearchError, match="threads must be >= 1"):
        TrainConfig(tasks=("digits",), threads=0)
