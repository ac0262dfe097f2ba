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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probe_in_chunks_of_images_keeps_the_scores(digits, dtype):
    """Read 37 images at a time (as a large set is), the probe fits from the D x D statistics
    of the chunks and gives today's whole-set scores: the same ridge strength, leave-one-out
    and train accuracy, and val accuracy within 1e-4, per val image too; fewer features than
    images, with constant ones; with more features than images it decomposes the n x n Gram
    matrix whole."""
    g = torch.Generator().manual_seed(2)
    for d in (4, 16, 64, 300):
        outputs = [torch.relu(digits.x @ torch.randn(64, d, generator=g)) for _ in range(3)]
        outputs[2][:, :2] = 3.0
        whole, chunked = Probe(dtype=dtype), Probe(dtype=dtype, chunk=37)
        a = whole.score_many(outputs, digits, whole.prepare(digits))
        b = chunked.score_many(outputs, digits, chunked.prepare(digits))
        assert [m for _, m in b] == [m for _, m in a]
        assert [v for v, _ in b] == pytest.approx([v for v, _ in a], abs=1e-4)
        assert torch.equal(chunked.image_values(outputs[0], digits, chunked.prepare(digits)),
                           whole.image_values(outputs[0], digits, whole.prepare(digits)))
    assert a[0][0] > 0.8  # a real fit, not chance (0.1)
    with pytest.raises(ObjectiveError, match="probe chunk must be a positive number of images"):
        Probe(chunk=0)


def test_probe_memory_on_many_images_is_a_fixed_workspace():
    """On 20,000 and 80,000 images x 384 features (31 and 123 MiB as float32) the probe works
    in chunks: its peak memory above what was resident before is 30-62 MiB for both (malloc varies),
    where the whole-set probe (several float64 copies of every image's features) took 380 and
    1,092 MiB."""
    import subprocess
    import sys

    script = """
import sys, torch
from ordersearch.engine import Probe
from ordersearch.evalset import EvalSet
probe = Probe()
small = EvalSet(torch.zeros(500, 1), torch.arange(500) % 10)
Probe(chunk=100).score(torch.randn(500, 384), small, probe.prepare(small))  # libraries' one-off buffers
n, d = int(sys.argv[1]), 384
g = torch.Generator().manual_seed(0)
y = torch.randint(0, 10, (n,), generator=g)
x = torch.randn(n, d, generator=g)
x[:, :10] += torch.nn.functional.one_hot(y, 10)
evalset = EvalSet(torch.zeros(n, 1), y)
state = probe.prepare(evalset)
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak resident memory starts again from now
before = status("VmRSS:")
value, _ = probe.score(x, evalset, state)
print((status("VmHWM:") - before) / 1024, value)
"""
    grown = {}
    for n in (20_000, 80_000):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True)
        grown[n], value = (float(v) for v in out.stdout.split())
        assert value > 0.25  # the labels are in the features: a real fit (chance is 0.1)
    assert max(grown.values()) < 96, grown
    assert grown[80_000] < grown[20_000] + 48, grown  # 4x the images, the same workspace (to malloc's noise)


@pytest.mark.parametrize("name", ["knn", "snd"])
def test_similarity_objectives_in_rows_keep_their_values(digits, monkeypatch, name):
    """k-NN and SND compare every image with every other: on a large set they build the
    similarities a few rows at a time (an (N, N) float64 matrix of 50,000 images is 20 GB),
    with the values and per-image values of the whole matrix."""
    from ordersearch.engine import _transfer

    obj = get_objective(name)
    state = obj.prepare(digits)
    g = torch.Generator().manual_seed(3)
    outputs = [torch.relu(digits.x @ torch.randn(64, 32 if name == "knn" else 10, generator=g)) for _ in range(3)]
    whole = obj.score_many(outputs, digits, state), obj.image_values(outputs[0], digits, state)
    monkeypatch.setattr(_transfer, "_SIM_BYTES", 8 * len(digits) * 3 * 37)  # 37 rows of 3 candidates' similarities
    assert len(_transfer.similarity_rows(3, len(digits))) == 11
    chunked = obj.score_many(outputs, digits, state), obj.image_values(outputs[0], digits, state)
    assert chunked[0] == whole[0] and torch.equal(chunked[1], whole[1])
    assert whole[0][0][0] > (0.8 if name == "knn" else 0.0)


def test_logme_in_chunks_of_images_keeps_the_evidence(digits):
    """LogME needs only the D x D Gram matrix and the features-labels products: read 37 images
    at a time it gives the whole-set evidence (to rounding), constant features included."""
    from ordersearch.engine import LogME

    g = torch.Generator().manual_seed(4)
    outputs = [torch.relu(digits.x @ torch.randn(64, d, generator=g)) for d in (4, 32, 64)]
    outputs[2][:, :2] = 3.0
    whole, chunked = LogME(), LogME(chunk=37)
    a = [whole.score(o, digits, whole.prepare(digits)) for o in outputs]
    b = [chunked.score(o, digits, chunked.prepare(digits)) for o in outputs]
    assert [v for v, _ in b] == pytest.approx([v for v, _ in a], rel=1e-10, abs=1e-12)
    assert [m["alpha_over_beta"] for _, m in b] == pytest.approx([m["alpha_over_beta"] for _, m in a], rel=1e-10)
    assert a[0][0] < a[1][0]  # more random features explain the labels better
