from __future__ import annotations

import math
import random

import optuna
import pytest
import torch

from ordersearch import Order, OrderSpace
from ordersearch.search import (
    DEFAULT_MUTATIONS,
    OnePoint,
    OrderEncoding,
    SearchError,
    TwoPoint,
    mutate,
    neighbours,
    search,
)
from ordersearch.search._study import counts_toward_budget
from ordersearch.testing import make_problem

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def problem():
    return make_problem()


# --- encoding and mutations -------------------------------------------------------------


@pytest.mark.parametrize(
    "space",
    [OrderSpace(4, max_len=5, max_repeats=2), OrderSpace(4, max_len=4), OrderSpace(3, allow_skip=False),
     OrderSpace(4, min_len=3, max_len=5, max_repeats=1, prefix=(0,))],
)
def test_every_assignment_decodes_into_the_space_and_orders_round_trip(space):
    enc = OrderEncoding(space)
    rng = random.Random(0)
    for _ in range(300):
        params = {n: rng.choice(enc.choices) for n in enc.names}
        assert space.contains(enc.decode(params)), params
    for order in list(space.enumerate())[:200]:
        assert enc.decode(enc.params(order)) == order


def test_repair_turns_over_cap_repeats_into_skips_and_refills_short_orders():
    enc = OrderEncoding(OrderSpace(3, min_len=2, max_len=3, max_repeats=1))
    assert enc.decode({"pos_0": 1, "pos_1": 1, "pos_2": 2}) == Order([1, 2])
    assert enc.decode({"pos_0": 1, "pos_1": 1, "pos_2": -1}) == Order([1, 0])


def test_mutations_and_crossovers_stay_in_the_space_and_keep_the_prefix():
    space = OrderSpace(4, max_len=6, max_repeats=2, prefix=(0,))
    rng = random.Random(1)
    order = Order([0, 1, 2, 3])
    kinds = {m.name: m for m in DEFAULT_MUTATIONS}
    assert Order([0, 1, 1, 2, 3]) in [c for _, c in kinds["duplicate"].candidates(order, space)]
    assert Order([0, 1, 3]) in [c for _, c in kinds["delete"].candidates(order, space)]
    for _ in range(200):
        child = mutate(order, space, rng)
        assert child is not None and space.contains(child) and child != order
        for cx in (OnePoint(), TwoPoint()):
            c = cx(Order([0, 1, 2]), Order([0, 3, 3, 2, 1]), space, rng)
            assert c[0] == 0
    nb = neighbours(order, space)
    assert len(nb) == len(set(nb)) and all(space.contains(o) for o in nb)


def test_late_bias_moves_mutations_toward_the_end():
    space = OrderSpace(6, max_len=6)
    order = Order(range(6))

    def mean_shared_prefix(bias):
        rng = random.Random(0)
        total = 0
        for _ in range(400):
            child = mutate(order, space, rng, late_bias=bias)
            total += next((i for i, (a, b) in enumerate(zip(order, child)) if a != b), min(len(order), len(child)))
        return total / 400

    assert mean_shared_prefix(3.0) > mean_shared_prefix(0.0) + 0.5


# --- the search loop ----------------------------------------------------------------------


def test_identity_first_orders_recorded_and_result(problem):
    result = problem.run(lambda: "evolution", n_trials=9, batch_size=4, seed=0)
    t0 = result.study.trials[0]
    assert t0.user_attrs["order"] == "0-1-2-3" and t0.user_attrs["baseline"] is True
    assert result.identity_score == t0.value
    assert result.best_score == max(t.value for t in result.study.trials if t.value is not None)
    assert str(result.best_order) in set(result.trials["order"])
    assert {"order", "depth", "value", "state", "metric_loo_accuracy"} <= set(result.trials.columns)
    # the evolution searcher proposes the bank's source orders first
    assert list(result.trials["order"][1:3]) == ["0-2-1-3", "3-1-1"]


def test_batches_share_prefixes_in_the_engine(problem):
    engine = problem.engine()
    problem.run(lambda: "beam", n_trials=20, batch_size=8, seed=0, engine=engine)
    assert engine.stats.block_evals < engine.stats.naive_block_evals / 1.5


def test_nsga2_records_score_and_depth_and_a_pareto_front(problem):
    result = problem.run(lambda: "nsga2", n_trials=10, batch_size=5, seed=0)
    t = result.study.trials[3]
    assert t.values[1] == len(Order.parse(t.user_attrs["order"]))
    front = [(t.values[0], len(Order.parse(t.user_attrs["order"]))) for t in result.pareto()]
    assert front
    # by score, best first; a lower score is on the front only with a shallower order
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))
    done = [(t.values[0], t.values[1]) for t in result.study.trials if t.values and t.values[0] == t.values[0]]
    assert all(any(f[0] >= v and f[1] <= d for f in front) for v, d in done)  # the front dominates every trial


def test_pruning_with_successive_halving_records_pruned_trials(problem):
    result = problem.run(lambda: "random", n_trials=16, batch_size=8, seed=0, fidelities=[30, 60])
    states = result.trials["state"].tolist()
    assert "PRUNED" in states and "COMPLETE" in states
    pruned = result.trials[result.trials["state"] == "PRUNED"]
    assert (pruned["n_images"] < len(problem.evalset)).all()
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert (done["n_images"] == len(problem.evalset)).all()


def test_pruning_refused_for_multi_objective(problem):
    with pytest.raises(SearchError, match="multi-objective"):
        problem.run(lambda: "nsga2", n_trials=4, fidelities=[30])


def test_exhaustive_refuses_a_large_space_clearly(problem):
    big = OrderSpace(4, max_len=8, max_repeats=2)
    with pytest.raises(SearchError, match=r"holds [\d,]+ orders, more than the limit of 1,000"):
        search(problem.bank, problem.evalset, "probe", searcher="exhaustive", space=big, n_trials=5,
               searcher_options={"limit": 1000})


def test_exhaustive_finds_the_best_order_of_a_small_space(problem):
    space = OrderSpace(4, max_len=2)
    result = search(problem.bank, problem.evalset, "probe", searcher="exhaustive", space=space, n_trials=100)
    assert len(result.trials) == space.size() + 1  # every order once, plus the identity trial
    assert result.best_score == result.trials["value"].max()


def test_sources_scores_each_source_order_then_stops(problem):
    result = problem.run(lambda: "sources", n_trials=50)
    assert list(result.trials["order"]) == ["0-1-2-3", "0-2-1-3", "3-1-1"]
    assert list(result.trials["source"][1:]) == ["task_a", "task_b"]


def test_sources_needs_source_orders():
    from ordersearch import load_bank

    p = make_problem()
    p.bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    with pytest.raises(SearchError, match="carries source orders"):
        p.run(lambda: "sources", n_trials=3)


@pytest.mark.parametrize("options", [{"mixing": "weights"}, {"relaxation": "gumbel"}])
def test_differentiable_records_its_argmax_and_weights(problem, options):
    from ordersearch.search import DifferentiableSearcher

    result = problem.run(lambda: DifferentiableSearcher(steps=6, batch_images=32, **options), n_trials=4, seed=0)
    info = result.study.user_attrs["differentiable"]
    w = torch.tensor(info["weights"])
    assert w.shape == (5, 5) and torch.allclose(w.sum(-1), torch.ones(5), atol=1e-5)
    assert result.trials["differentiable"][1] == "argmax"


def test_differentiable_on_an_unsupervised_objective():
    p = make_problem(60)
    from ordersearch.evalset import EvalSet
    from ordersearch.search import DifferentiableSearcher

    unlabelled = EvalSet(p.evalset.x)
    result = search(p.bank, unlabelled, "infomax", searcher=DifferentiableSearcher(steps=5), space=p.space,
                    n_trials=3, seed=0)
    assert math.isfinite(result.best_score) and "accuracy" not in result.best_metrics


def test_resuming_with_other_settings_is_refused(problem, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    problem.run(lambda: "random", n_trials=2, storage=storage, study_name="x", seed=0)
    with pytest.raises(SearchError, match="was made with another searcher: 'random', not 'tpe'"):
        problem.run(lambda: "tpe", n_trials=2, storage=storage, study_name="x", seed=0)


def test_rerunning_a_finished_study_adds_nothing(problem, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    a = problem.run(lambda: "random", n_trials=5, storage=storage, study_name="x", seed=0)
    b = problem.run(lambda: "random", n_trials=5, storage=storage, study_name="x", seed=0)
    assert list(a.trials["order"]) == list(b.trials["order"])
    c = problem.run(lambda: "random", n_trials=7, storage=storage, study_name="x", seed=0)
    assert len(c.trials) == 7 and list(c.trials["order"][:5]) == list(a.trials["order"])


def test_unknown_searcher_and_bad_budget():
    p = make_problem(20)
    with pytest.raises(SearchError, match="unknown searcher 'annealing'"):
        search(p.bank, p.evalset, searcher="annealing")
    with pytest.raises(SearchError, match="n_trials"):
        search(p.bank, p.evalset, searcher="random", n_trials=0)


@pytest.mark.parametrize("searcher", ["tpe", "nsga2"])
def test_model_based_samplers_never_repeat_an_order_and_stop_when_the_space_is_spent(problem, searcher):
    """Many parameter assignments repair to one order; Optuna's samplers, wrapped in
    FreshOrders, still never score an order twice, and stop once all 3! orders are scored."""
    space = OrderSpace(4, min_len=3, max_len=3, allow_skip=False, prefix=(0,))  # 0-x-y: 6 orders
    result = search(problem.bank, problem.evalset, "probe", searcher=searcher, space=space, n_trials=40,
                    batch_size=4, seed=0)
    counted = [t for t in result.study.get_trials() if counts_toward_budget(t)]
    orders = [t.user_attrs["order"] for t in counted]
    assert len(orders) == len(set(orders)) == space.size() + (0 if space.contains(problem.bank.identity) else 1)
    assert len(result.study.get_trials()) < 40


def test_a_worker_that_joins_a_study_samples_with_a_seed_of_its_own(problem, tmp_path):
    """The worker that creates a study samples with the seed; one that joins it (a resume,
    another worker) with a seed derived from it and its process, so workers never propose
    in lockstep."""
    from ordersearch.search._lease import Leases

    url = f"sqlite:///{tmp_path / 's.db'}"
    first = search(problem.bank, problem.evalset, "probe", searcher="tpe", n_trials=3, storage=url, study_name="s", seed=5)
    assert first.study.sampler.seed == 5
    joined = search(problem.bank, problem.evalset, "probe", searcher="tpe", n_trials=6, storage=url, study_name="s", seed=5)
    derived = Leases(joined.study).seed(5)
    assert derived != 5 and joined.study.sampler.seed == derived
