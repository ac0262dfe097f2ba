"""The transferability and unsupervised validators (knn, logme, snd, bnm) and ensembles: known
answers on constructed features, batching, chunk-size invariance, failures with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ordersearch import load_bank
from ordersearch.cli import main
from ordersearch.engine import BNM, SND, Engine, Ensemble, Knn, LogME, get_objective
from ordersearch.errors import ObjectiveError
from ordersearch.evalset import EvalSet


def _clusters(n_per: int = 20, classes: int = 4, dim: int = 8, spread: float = 0.1, seed: int = 0):
    """Features of ``classes`` clusters around orthogonal centres, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 5
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def _score(obj, outputs, evalset):
    obj = get_objective(obj)
    return obj.score(outputs, evalset, obj.prepare(evalset))


# --- knn -----------------------------------------------------------------------------------------


def test_knn_is_perfect_on_separated_clusters_and_near_chance_on_shuffled_labels():
    x, y = _clusters()
    assert _score("knn", x, EvalSet(x, y))[0] == 1.0
    g = torch.Generator().manual_seed(1)
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert _score("knn", x, EvalSet(x, shuffled))[0] < 0.5  # chance is 0.25


def test_knn_equals_a_brute_force_leave_one_out_vote():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 5, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    value, metrics = _score("knn:k=5,temperature=0,center=false", x, EvalSet(x, y))
    xn = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    sim = xn @ xn.T
    hits = 0
    for i in range(60):
        others = np.array([j for j in range(60) if j != i])
        near = others[np.argsort(-sim[i, others], kind="stable")[:5]]
        votes = np.bincount(y.numpy()[near], minlength=3)
        hits += int(votes.argmax() == int(y[i]))
    assert value == pytest.approx(hits / 60) and metrics["k"] == 5


def test_knn_uses_at_most_n_minus_one_neighbours():
    x, y = _clusters(n_per=2, classes=2)
    value, metrics = _score("knn:k=50", x, EvalSet(x, y))
    assert metrics["k"] == 3 and math.isfinite(value)


# --- logme ---------------------------------------------------------------------------------------


def _logme_reference(f: np.ndarray, y: np.ndarray, iterations: int = 30) -> float:
    """LogME as in the paper's algorithm 1, one class at a time, from an SVD (numpy)."""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    out = []
    for k in range(y.max() + 1):
        t_ = (y == k).astype(float)
        x2 = (u.T @ t_) ** 2
        res_x2 = max(t_ @ t_ - x2.sum(), 0.0)
        alpha = beta = 1.0

        def moments(alpha, beta, x2=x2, res_x2=res_x2):
            t = alpha / beta
            return ((sigma / (sigma + t)).sum(), (sigma * x2 / (t + sigma) ** 2).sum(),
                    (x2 * (t / (sigma + t)) ** 2).sum() + res_x2)

        for _ in range(iterations):
            gamma, m2, res2 = moments(alpha, beta)
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        _, m2, res2 = moments(alpha, beta)
        logdet = np.log(alpha + beta * sigma).sum() + (d - len(sigma)) * np.log(alpha)
        ev = d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2 - beta / 2 * res2 - alpha / 2 * m2
        out.append((ev - n / 2 * np.log(2 * np.pi)) / n)
    return float(np.mean(out))


@pytest.mark.parametrize("dim", [6, 80])  # fewer features than images, and more
def test_logme_matches_the_papers_algorithm(dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    x[:, 0] += y  # some signal
    value, _ = _score("logme", x, EvalSet(x, y))
    assert value == pytest.approx(_logme_reference(x.numpy(), y.numpy()), rel=1e-6)


def test_logme_prefers_features_that_explain_the_labels():
    x, y = _clusters(spread=1.0)
    g = torch.Generator().manual_seed(4)
    good = _score("logme", x, EvalSet(x, y))[0]
    noise = _score("logme", torch.randn(x.shape, generator=g), EvalSet(x, y))[0]
    assert good > noise


# --- snd and bnm ---------------------------------------------------------------------------------


def test_snd_equals_its_formula_and_is_higher_for_tighter_clusters():
    tight, _ = _clusters(spread=0.05, classes=3, dim=3)
    loose, _ = _clusters(spread=2.0, classes=3, dim=3)
    es = EvalSet(torch.zeros(len(tight), 1))
    a, b = _score("snd", tight, es)[0], _score("snd", loose, es)[0]
    assert a > b
    p = torch.softmax(loose.double(), 1)
    p = p / p.norm(dim=1, keepdim=True)
    sim = p @ p.T / 0.05
    ent = []
    for i in range(len(p)):
        row = torch.softmax(torch.cat([sim[i, :i], sim[i, i + 1 :]]), 0)
        ent.append(float(-(row * row.log()).sum()))
    assert b == pytest.approx(float(np.mean(ent)), rel=1e-9)


def test_bnm_is_the_nuclear_norm_over_n_and_penalises_collapse():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(30, 4, generator=g)
    es = EvalSet(torch.zeros(30, 1))
    value, _ = _score("bnm", logits, es)
    p = torch.softmax(logits.double(), 1)
    assert value == pytest.approx(float(torch.linalg.matrix_norm(p, ord="nuc")) / 30)
    diverse = torch.eye(4).repeat(3, 1) * 8
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 8
    es12 = EvalSet(torch.zeros(12, 1))
    assert _score("bnm", diverse, es12)[0] > _score("bnm", collapsed, es12)[0]


# --- batching, chunking, failures ----------------------------------------------------------------


@pytest.mark.parametrize("obj", [Knn(), LogME(), SND(), BNM()])
def test_a_batch_scores_each_candidate_as_alone(obj):
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 5, (70,), generator=g)
    es = EvalSet(torch.zeros(70, 1), y)
    outputs = [torch.randn(70, 5, generator=g) * (k + 1) + y[:, None] * k for k in range(5)]
    state = obj.prepare(es)
    assert obj.score_many(outputs, es, state) == [obj.score(o, es, state) for o in outputs]


@pytest.mark.parametrize("name", ["knn", "logme", "snd", "bnm", "ensemble:infomax+snd"])
def test_values_do_not_depend_on_the_engines_chunk_size(name):
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    g = torch.Generator().manual_seed(7)
    es = EvalSet(torch.randn(50, 1, 16, 16, generator=g), torch.arange(50) % 5)
    orders = ["0-1-2", "2-0", "1-1-2", "0"]
    small = Engine(bank, es, get_objective(name), batch_size=7).evaluate(orders)
    large = Engine(bank, es, get_objective(name), batch_size=64).evaluate(orders)
    assert all(s.ok for s in small + large)
    assert [s.value for s in small] == pytest.approx([s.value for s in large], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["knn", "logme", "snd", "bnm"])
def test_non_finite_outputs_fail_the_candidate_with_a_reason(name):
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    with torch.no_grad():
        bank.blocks[1].conv1.weight[0, 0, 0, 0] = float("nan")
    es = EvalSet(torch.randn(30, 1, 16, 16), torch.arange(30) % 3)
    scores = Engine(bank, es, name).evaluate(["0-2", "0-1", "1"])
    assert [s.ok for s in scores] == [True, False, False]
    assert all("non-finite activation after block 1" in s.failed for s in scores[1:])


def test_an_objective_returning_nan_fails_the_candidate():
    class Broken(LogME):
        def score_many(self, outputs, evalset, state):
            return [(math.nan, {})] * len(outputs)

    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    es = EvalSet(torch.randn(20, 1, 16, 16), torch.arange(20) % 2)
    (s,) = Engine(bank, es, Broken()).evaluate(["0-1"])
    assert not s.ok and "returned nan" in s.failed


# --- ensembles -----------------------------------------------------------------------------------


def test_ensemble_strings_round_trip_and_bad_ones_say_why():
    e = get_objective("ensemble:2*infomax+snd,mode=rank")
    assert isinstance(e, Ensemble) and e.weights == [2.0, 1.0] and e.mode == "rank"
    assert e.name == e.spec == "ensemble:2*infomax+snd,mode=rank"
    assert get_objective(e.name).spec == e.spec
    assert not e.needs_labels and e.truth == "head" and e.output == "logits"
    assert get_objective("ensemble:knn+logme").needs_labels
    for bad, why in [
        ("ensemble:infomax", "at least 2"),
        ("ensemble:infomax+knn", "mixes objectives on features and on logits"),
        ("ensemble:probe+knn", "fits on a split"),
        ("ensemble:x*infomax+snd", "weight must be a number"),
        ("ensemble:infomax+snd,mode=max", "mode must be"),
        ("ensemble:infomax+snd,colour=red", "expected mode"),
        ("ensemble:infomax+nope", "unknown objective"),
        ("knn:k=many", "knn:k=many"),
        ("knn:k", "options are key=value"),
        ("knn:depth=3", "unexpected keyword"),
    ]:
        with pytest.raises(ObjectiveError, match=why):
            get_objective(bad)


def test_ensemble_value_is_the_mean_of_reference_z_scores():
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    g = torch.Generator().manual_seed(8)
    es = EvalSet(torch.randn(40, 1, 16, 16, generator=g))
    ens = get_objective("ensemble:infomax+2*bnm,reference=8")
    engine = Engine(bank, es, ens)
    (s,) = engine.evaluate(["2-1-0"])
    ref = ens.reference_values
    assert ref is not None and len(ref) == 2 and len(ref[0]) == 8  # calibrated once, on 8 orders
    z = [(s.metrics[n] - float(r.mean())) / float(r.std()) for n, r in zip(("infomax", "bnm"), ref)]
    assert s.metrics["infomax_z"] == pytest.approx(z[0]) and s.metrics["bnm_z"] == pytest.approx(z[1])
    assert s.value == pytest.approx((z[0] + 2 * z[1]) / 3)
    # the bootstrap's resampled values are the same combination, resample by resample
    out = engine.outputs("2-1-0")
    idx = torch.randint(0, 40, (5, 40), generator=g)
    state = ens.prepare(es)
    res = ens.resampled_values(out, es, state, idx)
    for row, v in zip(idx, res):
        sub = EvalSet(es.x[row])
        assert float(v) == pytest.approx(ens.score(out[row], sub, ens.prepare(sub))[0], rel=1e-9, abs=1e-9)


def test_rank_ensemble_values_lie_in_zero_one():
    bank = load_bank("isoresnet:width=8,blocks=3,classes=10")
    es = EvalSet(torch.randn(40, 1, 16, 16))
    scores = Engine(bank, es, "ensemble:infomax+snd,mode=rank,reference=6").evaluate(["0", "1-2", "2-2-0"])
    assert all(0.0 <= s.value <= 1.0 for s in scores)


def test_cli_accepts_objective_strings_and_refuses_bad_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["adapt", "--bank", "isoresnet:width=8,blocks=3,classes=10", "--data", "digits:n=100",
              "--objective", "ensemble:infomax+knn", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "mixes objectives on features and on logits" in err and not (tmp_path / "x").exists()
    rc = main(["adapt", "--bank", "isoresnet:width=8,blocks=3,classes=10", "--data", "digits:rotate=30,n=240",
               "--objective", "ensemble:infomax+snd", "--trials", "6", "--batch-size", "3", "--searcher", "random",
               "--reliability-orders", "0", "--no-progress", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "ensemble:infomax+snd" in out
    assert any(w in out for w in ("improved", "within noise", "worse"))
