from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ordersearch.engine import Objective, Probe, get_objective, list_objectives, register_objective
from ordersearch.errors import ObjectiveError
from ordersearch.evalset import EvalSet


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:400], dtype=torch.float32)
    return EvalSet(x, torch.tensor(d.target[:400]))


def _score(name, outputs, evalset, **kwargs):
    obj = get_objective(name, **kwargs)
    return obj.score(outputs, evalset, obj.prepare(evalset))


NAMES = ["bnm", "ensemble", "entropy", "head", "infomax", "knn", "logme", "probe", "snd"]


def test_registry_lists_the_objectives():
    assert list_objectives() == NAMES
    assert get_objective("probe").needs_labels and not get_objective("infomax").needs_labels
    with pytest.raises(ObjectiveError, match="known: " + ", ".join(NAMES)):
        get_objective("accuracy")


def test_register_objective_adds_a_name():
    class Norm(Objective):
        name = "feature_norm"

        def score(self, outputs, evalset, state):
            return float(outputs.norm(dim=1).mean()), {}

    register_objective("feature_norm", Norm)
    try:
        assert isinstance(get_objective("feature_norm"), Norm)
    finally:
        from ordersearch.engine import objectives

        del objectives._OBJECTIVES["feature_norm"]


def test_probe_separates_real_digits_and_not_shuffled_labels(digits):
    acc, metrics = _score("probe", digits.x, digits)
    assert acc > 0.9 and metrics["loo_accuracy"] > 0.9
    g = torch.Generator().manual_seed(0)
    shuffled = EvalSet(digits.x, digits.y[torch.randperm(len(digits), generator=g)])
    chance, _ = _score("probe", digits.x, shuffled)
    assert chance < 0.3


def test_probe_leave_one_out_matches_refitting(digits):
    """The closed-form leave-one-out accuracy equals refitting ridge without each image."""
    from sklearn.linear_model import Ridge

    small = digits.select(torch.arange(80))
    probe = Probe(alphas=(0.1,))
    state = probe.prepare(small)
    _, metrics = probe.score(small.x, small, state)
    x = small.x[small.train_idx].double()
    z = ((x - x.mean(0)) / torch.where(x.std(0, correction=0) > 0, x.std(0, correction=0), 1)).numpy()
    y = small.y[small.train_idx].numpy()
    onehot = np.eye(10)[y]
    hits = 0
    for i in range(len(z)):
        keep = np.arange(len(z)) != i
        r = Ridge(alpha=0.1 * len(z), fit_intercept=True).fit(z[keep], onehot[keep])
        hits += int(r.predict(z[i : i + 1]).argmax() == y[i])
    assert metrics["loo_accuracy"] == pytest.approx(hits / len(z))


@pytest.mark.parametrize("n_features", [8, 64, 200])  # fewer features than images, as many, more
def test_probe_scores_each_candidate_of_a_batch_as_alone(digits, n_features):
    """score_many gives what score gives each candidate, whichever of the two Gram matrices
    (features x features or images x images) the probe decomposes, with constant features."""
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(64, n_features, generator=g)
    outputs = [digits.x @ proj * (k + 1) + torch.randn(len(digits), n_features, generator=g) * k for k in range(4)]
    outputs[3][:, :2] = 3.0  # constant features: no variance, no part in the fit
    probe = Probe()
    state = probe.prepare(digits)
    alone = [probe.score(o, digits, state) for o in outputs]
    assert probe.score_many(outputs, digits, state) == alone
    assert alone[0][0] > 0.5 and alone[3][0] > 0.3  # chance is 0.1


def test_probe_val_accuracy_matches_sklearn_ridge(digits):
    from sklearn.linear_model import Ridge

    for n_features in (16, 64):
        x = digits.x[:, :n_features]
        acc, metrics = Probe(alphas=(0.1,)).score(x, digits, Probe(alphas=(0.1,)).prepare(digits))
        xtr = x[digits.train_idx].double()
        mu, sd = xtr.mean(0), xtr.std(0, correction=0)
        sd = torch.where(sd > 0, sd, 1)
        y = digits.y[digits.train_idx].numpy()
        r = Ridge(alpha=0.1 * len(xtr)).fit(((xtr - mu) / sd).numpy(), np.eye(10)[y])
        pred = r.predict(((x[digits.val_idx].double() - mu) / sd).numpy()).argmax(1)
        assert acc == pytest.approx(float((pred == digits.y[digits.val_idx].numpy()).mean()))


def test_probe_is_invariant_to_feature_scale(digits):
    a, _ = _score("probe", digits.x, digits)
    b, _ = _score("probe", 1000 * digits.x + 5, digits)
    assert a == pytest.approx(b)


def test_probe_restores_the_thread_count(digits):
    n = torch.get_num_threads()
    _score("probe", digits.x, digits)
    assert torch.get_num_threads() == n


def test_head_accuracy_and_nll():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    es = EvalSet(torch.zeros(4, 1), torch.tensor([0, 1, 1, 1]))
    acc, metrics = _score("head", logits, es)
    assert acc == 0.75
    assert metrics["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, es.y)))


def test_infomax_is_marginal_minus_conditional_entropy():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), 1)
    cond = float(-(p * p.log()).sum(1).mean())
    pm = p.mean(0)
    marg = float(-(pm * pm.log()).sum())
    value, metrics = _score("infomax", logits, EvalSet(torch.zeros(4, 1)))
    assert value == pytest.approx(marg - cond)
    assert metrics == pytest.approx({"marginal_entropy": marg, "conditional_entropy": cond})
    ent, _ = _score("entropy", logits, EvalSet(torch.zeros(4, 1)))
    assert ent == pytest.approx(-cond)


def test_infomax_prefers_diverse_confident_predictions_over_collapse():
    diverse = torch.eye(4).repeat(3, 1) * 8  # confident, every class used
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 8  # confident, one class for everything
    es = EvalSet(torch.zeros(12, 1))
    assert _score("infomax", diverse, es)[0] > _score("infomax", collapsed, es)[0]
    # plain entropy cannot tell them apart: the documented failure mode
    assert _score("entropy", diverse, es)[0] == pytest.approx(_score("entropy", collapsed, es)[0])


@pytest.mark.parametrize("name", ["infomax", "entropy", "snd", "bnm"])
def test_unsupervised_objectives_only_report_labels(name):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, generator=g)
    y = torch.randint(0, 5, (20,), generator=g)
    a, ma = _score(name, logits, EvalSet(torch.zeros(20, 1), y))
    b, mb = _score(name, logits, EvalSet(torch.zeros(20, 1), y.roll(1)))
    c, mc = _score(name, logits, EvalSet(torch.zeros(20, 1)))
    assert a == b == c
    assert "accuracy" in ma and "accuracy" not in mc
    assert ma["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_probe_with_constant_features_does_not_break(digits):
    acc, _ = _score("probe", torch.ones(len(digits), 3), digits)
    assert math.isfinite(acc)


def _host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value by the host (on an accelerator each one waits for the
    queued work), recorded by name."""
    reads: list[str] = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def read(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


@pytest.mark.parametrize("name", ["probe", "knn"])
def test_batched_objectives_read_their_results_once_per_group(digits, monkeypatch, name):
    """The probe (one batched decomposition for all candidates and ridge strengths) and k-NN
    read their results with one host read for a batch of candidates, not one per candidate:
    on an accelerator nothing waits for each candidate's work."""
    obj = get_objective(name)
    state = obj.prepare(digits)
    g = torch.Generator().manual_seed(0)
    outputs = [torch.relu(digits.x @ torch.randn(64, 32, generator=g)) for _ in range(8)]
    expected = obj.score_many(outputs, digits, state)
    reads = _host_reads(monkeypatch)
    assert obj.score_many(outputs, digits, state) == expected
    assert reads == ["tolist"]


def test_probe_in_float32_keeps_the_float64_scores(digits):
    """The float32 solve (for accelerators whose float64 is slow) picks the same ridge
    strength and scores within 1e-4 of the float64 probe on real digits features."""
    g = torch.Generator().manual_seed(0)
    f64, f32 = Probe(), Probe(dtype=torch.float32)
    for d in (8, 32, 64, 128):
        outputs = [torch.relu(digits.x @ torch.randn(64, d, generator=g)) for _ in range(4)]
        a = f64.score_many(outputs, digits, f64.prepare(digits))
        b = f32.score_many(outputs, digits, f32.prepare(digits))
        assert [m["alpha"] for _, m in b] == [m["alpha"] for _, m in a]
        assert [v for v, _ in b] == pytest.approx([v for v, _ in a], abs=1e-4)
    assert get_objective("probe:dtype=float32").dtype == torch.float32
    with pytest.raises(ObjectiveError, match="float32 or float64"):
        get_objective("probe:dtype=float16")
