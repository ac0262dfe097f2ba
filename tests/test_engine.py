from __future__ import annotations

import copy
import gc
import math
import os
import random
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ordersearch import DataError, Order, OrderError, build_model, load_bank
from ordersearch.engine import Engine, Probe, Score, count_distinct_prefixes, get_objective, list_objectives
from ordersearch.evalset import EvalSet

BANKS = {
    "isoresnet": ("isoresnet:width=8,blocks=4,classes=10", {}),
    "vit": ("timm:test_vit", dict(img_size=32, num_classes=10)),
}


# On CUDA, convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32): outputs of
# differently batched forwards agree to ~1e-4, not to float32 rounding.
_CLOSE = 1e-3 if torch.cuda.is_available() else None


def _tol(tol: float) -> dict[str, float]:
    return {"rtol": max(tol, _CLOSE or 0.0), "atol": max(tol, _CLOSE or 0.0)}


def _digits(n: int, size: int, chans: int) -> EvalSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None]  # (n, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x / 16 - 0.5) / 0.5).repeat(1, chans, 1, 1)
    return EvalSet(x, torch.tensor(d.target[:n]), name="digits")


@pytest.fixture(scope="module")
def banks():
    return {name: load_bank(src, **kw) for name, (src, kw) in BANKS.items()}


@pytest.fixture(scope="module")
def data(banks):
    out = {}
    for name, bank in banks.items():
        c, h, _ = bank.data_config["input_size"]
        out[name] = _digits(120, h, c)
    return out


def _random_orders(k: int, n: int, seed: int, max_len: int | None = None) -> list[Order]:
    rng = random.Random(seed)
    max_len = max_len or k + 2
    return [Order(rng.randrange(k) for _ in range(rng.randint(1, max_len))) for _ in range(n)]


def _reference_outputs(bank, evalset, order, output: str, batch_size: int, norm: str) -> torch.Tensor:
    """The uncached reference: build the model and run a plain forward."""
    model = build_model(bank, order)
    x = evalset.x.to(next(bank.parameters()).device)  # an Engine moves its bank to its device
    if norm == "target":
        # AdaBN the plain way: every BatchNorm call uses the statistics of the whole EvalSet.
        model = copy.deepcopy(model).train()
        with torch.no_grad():
            return (model.features if output == "features" else model)(x).float().cpu()
    fn = model.features if output == "features" else model
    with torch.inference_mode():
        return torch.cat([fn(x[s : s + batch_size]) for s in range(0, len(evalset), batch_size)]).float().cpu()


def _reference_score(bank, evalset, order, objective, batch_size: int = 32, norm: str = "source") -> float:
    obj = get_objective(objective)
    out = _reference_outputs(bank, evalset, order, obj.output, batch_size, norm)
    return obj.score(out, evalset, obj.prepare(evalset))[0]


# --- correctness against the uncached reference -----------------------------------------


@pytest.mark.parametrize("objective", [n if n != "ensemble" else "ensemble:infomax+bnm" for n in list_objectives()])
@pytest.mark.parametrize("bank_name", list(BANKS))
def test_cached_scores_equal_uncached(banks, data, bank_name, objective):
    bank, evalset = banks[bank_name], data[bank_name]
    orders = _random_orders(bank.n_blocks, 10, seed=1) + [bank.identity, Order([0, 1]), Order([0, 1, 1])]
    engine = Engine(bank, evalset, objective, cache_bytes=2**26, batch_size=32, dtype=torch.float32)
    first = engine.evaluate(orders[:7])
    second = engine.evaluate(orders[7:] + orders[:3])  # second batch reuses the cache and memo
    scores = first + second
    assert all(s.ok for s in scores), [s.failed for s in scores]
    assert engine.stats.cache_hits > 0
    for s, o in zip(scores, orders + orders[:3]):
        assert s.order == o
        assert s.n_images == len(evalset)
        assert s.value == _reference_score(bank, evalset, o, engine.objective)  # calibrated instance


def test_scores_do_not_depend_on_how_candidates_are_grouped_for_scoring(banks, data, monkeypatch):
    """The engine scores a batch's candidates in groups (at most _SCORE_BATCH or _SCORE_BYTES);
    groups of three and one group of all give the same scores."""
    from ordersearch.engine import _engine

    bank, evalset = banks["isoresnet"], data["isoresnet"]
    orders = _random_orders(bank.n_blocks, 12, seed=3)
    whole = Engine(bank, evalset, "probe", dtype=torch.float32).evaluate(orders)
    monkeypatch.setattr(_engine, "_SCORE_BATCH", 3)
    grouped = Engine(bank, evalset, "probe", dtype=torch.float32).evaluate(orders)
    assert [s.value for s in grouped] == [s.value for s in whole]
    assert [s.metrics for s in grouped] == [s.metrics for s in whole]
    assert [s.order for s in grouped] == orders


@pytest.mark.parametrize("bank_name", list(BANKS))
def test_outputs_equal_the_rebuilt_model(banks, data, bank_name):
    bank, evalset = banks[bank_name], data[bank_name]
    engine = Engine(bank, evalset, "head", cache_bytes=2**26, batch_size=32, dtype=torch.float32)
    for o in [Order([2, 0, 0]), Order([2, 0, 0, 1]), Order([])]:
        assert torch.equal(engine.outputs(o), _reference_outputs(bank, evalset, o, "logits", 32, "source"))


def test_identity_reproduces_the_source_model(banks, data):
    bank, evalset = banks["vit"], data["vit"]
    engine = Engine(bank, evalset, "head", cache_bytes=0, batch_size=40, dtype=torch.float32)
    with torch.inference_mode():
        expected = bank.model(evalset.x.to(engine.device)).cpu()
    torch.testing.assert_close(engine.outputs(bank.identity), expected, **_tol(1e-5))


# --- counts -------------------------------------------------------------------------------


def _brute_force_distinct_prefixes(batches) -> int:
    return len({tuple(o)[:i] for batch in batches for o in batch for i in range(1, len(o) + 1)})


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
def test_min_block_evals_counts_distinct_prefixes(banks, data, cache_bytes):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    batches = [_random_orders(3, 25, seed=s, max_len=5) for s in range(4)]
    engine = Engine(bank, evalset, "entropy", cache_bytes=cache_bytes, batch_size=64, memo=False)
    per_batch = 0
    for batch in batches:
        engine.evaluate(batch)
        per_batch += _brute_force_distinct_prefixes([batch])
    st = engine.stats
    assert st.min_block_evals == _brute_force_distinct_prefixes(batches)
    assert count_distinct_prefixes(o for b in batches for o in b) == st.min_block_evals
    assert st.naive_block_evals == sum(len(o) for b in batches for o in b)
    if cache_bytes:
        assert st.block_evals == st.min_block_evals  # an unlimited cache reaches the limit
    else:
        assert st.block_evals == per_batch  # no cache: each batch pays its distinct prefixes


def test_repeated_orders_are_scored_once(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    engine = Engine(bank, evalset, "entropy", cache_bytes=0)
    a, b = engine.evaluate(["0-1-2", "0-1-2"])
    (c,) = engine.evaluate(["0-1-2"])
    assert a == b == c and engine.stats.block_evals == 3 and engine.stats.memo_hits == 1


# --- the cache ----------------------------------------------------------------------------


def _node_bytes(bank, evalset) -> int:
    element = 2 if torch.cuda.is_available() else 4  # the engine's default dtype: bf16 on CUDA, else fp32
    return len(evalset) * math.prod(bank.data_config["block_shape"]) * element


@pytest.mark.parametrize("policy", ["gdsf", "lru"])
def test_budget_is_never_exceeded_and_scores_do_not_change(banks, data, policy):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    node = _node_bytes(bank, evalset)
    budget = int(3.5 * node)
    engine = Engine(bank, evalset, "probe", cache_bytes=budget, batch_size=64, policy=policy)
    in_use: list[int] = []  # activation bytes held (cache, path, stem output) at each block forward
    fill = engine.pool.fill

    def measuring_fill(handle):
        chunks = fill(handle)
        in_use.append(engine.pool.bytes - engine.pool.free_bytes)
        return chunks

    engine.pool.fill = measuring_fill  # type: ignore[method-assign]
    unlimited = Engine(bank, evalset, "probe", cache_bytes=2**30, batch_size=64)
    rng = random.Random(3)
    pop = _random_orders(4, 6, seed=4, max_len=6)
    cached: list[int] = []
    for _ in range(5):  # an evolution-like stream: mutate the population's orders
        batch = []
        for parent in pop:
            ids = list(parent)
            ids[rng.randrange(len(ids))] = rng.randrange(4)
            batch.append(Order(ids))
        got = engine.evaluate(batch, retain=pop)
        assert [s.value for s in got] == [s.value for s in unlimited.evaluate(batch)]
        cached.append(sum(t.nbytes for t in engine.cache_tensors()))
        pop = batch
    assert max(cached) <= budget
    assert engine.stats.cache_bytes_peak <= budget
    # live memory: the budget plus one path (orders of up to 6 blocks) and the stem output
    assert max(in_use) <= budget + 7 * node
    assert engine.stats.live_bytes_peak <= budget + 7 * node + engine.pool.max_free * node
    assert engine.stats.evictions > 0  # the budget was binding
    assert engine.stats.min_block_evals < engine.stats.block_evals < engine.stats.naive_block_evals


def test_gdsf_evicts_leaves_first(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    engine = Engine(bank, evalset, "entropy", cache_bytes=3 * _node_bytes(bank, evalset), policy="gdsf")
    engine.evaluate(["0-1-2"])
    engine.evaluate(["3"])  # one entry must go: the leaf 0-1-2, not the shared 0 or 0-1
    assert sorted(engine.cache.keys()) == [(0, 0), (0, 0, 1), (0, 3)]


def test_eviction_order_does_not_depend_on_the_activation_size():
    """The benchmark counts a real bank's block forwards on a proxy bank of tiny activations:
    the same stream at the same budget in nodes must make the same evictions. (With the
    priority's size in MiB, float rounding broke ties differently: a ViT-S/16 stream ran
    2445 block forwards where its proxy ran 2436.)"""
    from ordersearch.engine._cache import BufferPool, Handle, PrefixCache
    from ordersearch.engine._trie import walk

    rng = random.Random(0)
    batches = [[tuple(rng.randrange(12) for _ in range(rng.randint(1, 12))) for _ in range(8)] for _ in range(40)]
    counts = {}
    for node in (32, 197 * 384 * 4 * 512):  # a proxy's node; ViT-S/16 at 224 px on 512 images
        for policy in ("gdsf", "lru"):
            cache = PrefixCache(int(37.5 * node), policy)
            pool = BufferPool(lambda key: (torch.empty(0), []))
            root = Handle(node, pool).acquire()
            computed: list = []
            for batch in batches:
                keys = sorted({(0, *ids) for ids in batch})
                walk(keys, cache, pool, root, lambda k, p, o, log=computed: log.append(k), lambda k, p, f: None, {})
            assert cache.evictions > 100  # the budget binds
            counts[node, policy] = computed
    assert counts[32, "gdsf"] == counts[197 * 384 * 4 * 512, "gdsf"]
    assert counts[32, "lru"] == counts[197 * 384 * 4 * 512, "lru"]


def test_retain_hints_keep_nodes(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    node = _node_bytes(bank, evalset)
    others = [Order([b, c]) for b in (1, 2, 3) for c in (1, 2, 3)]
    kept = {}
    for hint in (None, ["0-0-0"]):
        engine = Engine(bank, evalset, "entropy", cache_bytes=4 * node, policy="lru")
        engine.evaluate(["0-0-0"], retain=hint)
        engine.evaluate(others)
        kept[bool(hint)] = (0, 0, 0, 0) in engine.cache
        before = engine.stats.block_evals
        engine.evaluate(["0-0-0-1"])
        kept[f"cost {bool(hint)}"] = engine.stats.block_evals - before
    assert kept == {False: False, True: True, "cost False": 4, "cost True": 1}


def test_retained_keys_are_every_prefix_at_every_level():
    from ordersearch.engine._engine import _retained_keys

    rng = random.Random(3)
    pop = [tuple(rng.randrange(4) for _ in range(rng.randint(0, 6))) for _ in range(40)]
    pop += [p[:2] for p in pop[:5]] + [pop[0]]  # prefixes of others, and a repeat
    want = {(lv, *o[:d]) for lv in (0, 2) for o in pop for d in range(1, len(o) + 1)}
    assert _retained_keys([0, 2], pop) == want


def test_no_reference_cycles_hold_activations(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    gc.disable()
    try:
        engine = Engine(bank, evalset, "entropy", cache_bytes=2**26)
        engine.evaluate(_random_orders(4, 20, seed=5))
        refs = [weakref.ref(t) for t in engine.cache_tensors()]
        assert refs
        engine.clear()
        assert all(r() is None for r in refs)  # freed by reference counting alone
    finally:
        gc.enable()


# --- failures -----------------------------------------------------------------------------


def test_nan_candidate_fails_without_killing_the_batch(data):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    evalset = data["isoresnet"]
    with torch.no_grad():
        bank.blocks[2].conv1.weight[0, 0, 0, 0] = float("nan")
    engine = Engine(bank, evalset, "probe", cache_bytes=2**26, dtype=torch.float32)
    orders = [Order([0, 1]), Order([0, 2, 1]), Order([2]), Order([1, 3]), Order([0, 2, 3])]
    scores = engine.evaluate(orders)
    assert [s.ok for s in scores] == [True, False, False, True, False]
    assert all("non-finite activation after block 2" in s.failed for s in scores if not s.ok)
    assert all(math.isnan(s.value) for s in scores if not s.ok)
    assert scores[3].value == _reference_score(bank, evalset, orders[3], "probe")
    assert engine.stats.failed == 3
    # 0, 0-1, 0-2, 0-2-1 (checked on its outputs: the path names block 2), 1, 1-3, 2; not 0-2-3
    assert engine.stats.block_evals == 7
    assert (0, 0, 2) not in engine.cache and (0, 0, 2, 1) not in engine.cache
    (again,) = engine.evaluate(["0-2-0"])  # the failed prefix is not recomputed
    assert not again.ok and "after block 2 at position 1" in again.failed and engine.stats.block_evals == 7


_BATCH = ["0-1-2", "0-2-3-1", "1-2"]


def _assert_consistent(engine, bank, evalset) -> None:
    """Every cached prefix has its activation, and the pool holds nothing but the cache's
    buffers and the stem output (float32)."""
    assert len(engine.cache_tensors()) == len(engine.cache)
    stem_output = len(evalset) * math.prod(bank.data_config["block_shape"]) * 4
    assert engine.pool.bytes - engine.pool.free_bytes == engine.cache.bytes + stem_output


def _assert_scores_the_batch_again(engine, bank, evalset) -> None:
    orders = [Order.parse(o) for o in _BATCH]
    got = engine.evaluate(orders)
    assert [s.value for s in got] == [_reference_score(bank, evalset, o, "probe") for o in orders]


def test_a_block_that_raises_leaves_the_engine_consistent(banks, data, monkeypatch):
    """A walk plans a batch's cache bookkeeping before any block runs; when a block forward
    raises, the cache drops what the plan admitted but never computed and every buffer goes
    back to the pool, so the next batch scores correctly."""
    from ordersearch.isoresnet import IsoBlock

    bank, evalset = banks["isoresnet"], data["isoresnet"]
    engine = Engine(bank, evalset, "probe", cache_bytes=2**26, dtype=torch.float32)
    engine.evaluate(["0-1"])
    into = IsoBlock.forward_into

    def failing(self, x, out):
        if self is bank.blocks[3]:
            raise RuntimeError("boom")
        return into(self, x, out)

    monkeypatch.setattr(IsoBlock, "forward_into", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.evaluate(_BATCH)
    assert (0, 0, 2, 3) not in engine.cache and (0, 0, 2, 3, 1) not in engine.cache  # planned, never computed
    _assert_consistent(engine, bank, evalset)
    monkeypatch.setattr(IsoBlock, "forward_into", into)
    _assert_scores_the_batch_again(engine, bank, evalset)


def test_an_interrupted_plan_leaves_the_engine_consistent(banks, data, monkeypatch):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    engine = Engine(bank, evalset, "probe", cache_bytes=int(2.5 * _node_bytes(bank, evalset)), dtype=torch.float32)
    engine.evaluate(["0-1", "2"])
    admit = engine.cache.admit
    calls = []

    def interrupted(key, handle):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return admit(key, handle)

    monkeypatch.setattr(engine.cache, "admit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.evaluate(_BATCH)
    _assert_consistent(engine, bank, evalset)
    monkeypatch.setattr(engine.cache, "admit", admit)
    _assert_scores_the_batch_again(engine, bank, evalset)


def test_an_objective_that_raises_fails_only_that_candidate(banks, data):
    """Candidates are scored together after their block forwards; when that batch raises,
    each is scored alone, so only the candidate that raises fails, with the reason."""
    probe = get_objective("probe")

    class Picky(type(probe)):
        name = "picky"

        def score_many(self, outputs, evalset, state):
            if any(float(o.abs().sum()) == bad_sum for o in outputs):
                raise torch.linalg.LinAlgError("singular")
            return super().score_many(outputs, evalset, state)

    bank, evalset = banks["isoresnet"], data["isoresnet"]
    bad_sum = float(Engine(bank, evalset, "probe", dtype=torch.float32).outputs("1-2").abs().sum())
    engine = Engine(bank, evalset, Picky(), cache_bytes=2**26, dtype=torch.float32)
    scores = engine.evaluate(["0-1", "1-2", "3"])
    assert [s.ok for s in scores] == [True, False, True]
    assert scores[1].failed == "objective picky raised LinAlgError: singular"
    assert scores[0].value == _reference_score(bank, evalset, Order([0, 1]), "probe")
    assert scores[2].value == _reference_score(bank, evalset, Order([3]), "probe")


def test_non_finite_images_fail_every_candidate_with_the_stem_named(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    x = evalset.x.clone()
    x[5, 0, 3, 3] = float("inf")
    engine = Engine(bank, EvalSet(x, evalset.y), "probe", cache_bytes=2**26)
    scores = engine.evaluate(["0-1", "2"])
    assert [s.failed for s in scores] == ["non-finite stem output (are the images finite?)"] * 2


def test_invalid_orders_are_rejected(banks, data):
    engine = Engine(banks["isoresnet"], data["isoresnet"], "entropy")
    with pytest.raises(OrderError, match="block 7"):
        engine.evaluate(["0-7"])


def test_labelled_objective_needs_labels(banks, data):
    unlabelled = EvalSet(data["isoresnet"].x)
    with pytest.raises(ValueError, match="needs labels"):
        Engine(banks["isoresnet"], unlabelled, "probe")
    assert Engine(banks["isoresnet"], unlabelled, "infomax").evaluate(["0-1"])[0].ok
    one_class = EvalSet(data["isoresnet"].x, torch.zeros(len(data["isoresnet"].x), dtype=torch.long))
    for name in ("probe", "knn", "logme", "head"):
        with pytest.raises(DataError, match="at least 2 classes"):
            Engine(banks["isoresnet"], one_class, name)


# --- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["probe", "head", "infomax"])
def test_target_norm_matches_adabn_reference(data, objective):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10", seed=3)
    evalset = data["isoresnet"]
    engine = Engine(bank, evalset, objective, cache_bytes=2**26, batch_size=16, norm="target", dtype=torch.float32)
    orders = [Order([0, 1, 2, 3]), Order([1, 1, 0]), Order([3, 1, 1, 2, 0])]
    output = get_objective(objective).output
    scores = engine.evaluate(orders)
    for s, o in zip(scores, orders):
        ref = _reference_outputs(bank, evalset, o, output, len(evalset), "target")
        torch.testing.assert_close(engine.outputs(o), ref, **_tol(1e-4))
        if _CLOSE is None:  # (a TF32 difference can flip a prediction)
            assert s.value == pytest.approx(_reference_score(bank, evalset, o, objective, norm="target"), abs=1e-6)
    # and it is not the source statistics
    src = _reference_outputs(bank, evalset, orders[0], output, 32, "source")
    assert not torch.allclose(engine.outputs(orders[0]), src, atol=1e-3)


def test_target_norm_does_not_depend_on_chunk_size(data):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10", seed=4)
    evalset = data["isoresnet"]
    orders = _random_orders(4, 8, seed=6)
    results = []
    for bs in (7, 32, len(evalset)):
        engine = Engine(bank, evalset, "head", cache_bytes=2**26, batch_size=bs, norm="target")
        scores = engine.evaluate(orders)
        results.append(([s.value for s in scores], [engine.outputs(o) for o in orders[:3]]))
    for values, outs in results[1:]:
        assert values == results[0][0]
        for a, b in zip(outs, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_target_norm_statistics_are_cached_per_prefix(data):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    evalset = data["isoresnet"]
    engine = Engine(bank, evalset, "head", cache_bytes=0, batch_size=32, norm="target")
    engine.evaluate(["0-1-2"])
    passes = engine.stats.stat_passes
    assert passes > 0
    engine.evaluate(["0-1-3"])  # recomputes 0 and 0-1 (no cache) but reuses their statistics
    assert engine.stats.block_evals == 6
    assert engine.stats.stat_passes - passes == 2 + 1  # block 3's two BatchNorms, the tail's one


# --- precision, fidelity ------------------------------------------------------------------


def test_bfloat16_screening_runs_and_stores_bfloat16(banks, data):
    bank, evalset = banks["vit"], data["vit"]
    engine = Engine(bank, evalset, "probe", cache_bytes=2**26, dtype=torch.bfloat16)
    scores = engine.evaluate(_random_orders(bank.n_blocks, 6, seed=7))
    assert all(s.ok for s in scores)
    assert {t.dtype for t in engine.cache_tensors()} == {torch.bfloat16}


def test_low_fidelity_scores_equal_scoring_the_subset(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    orders = _random_orders(4, 6, seed=8)
    engine = Engine(bank, evalset, "probe", cache_bytes=2**26)
    low = engine.evaluate(orders, n_images=60)
    direct = Engine(bank, evalset.subset(60), "probe").evaluate(orders)
    assert [s.value for s in low] == [s.value for s in direct]
    assert {s.n_images for s in low} == {60}


def test_staged_evaluation_prunes_and_keeps_history(banks, data):
    bank, evalset = banks["isoresnet"], data["isoresnet"]
    orders = list(dict.fromkeys(_random_orders(4, 16, seed=9)))
    engine = Engine(bank, evalset, "probe", cache_bytes=2**26)
    scores = engine.evaluate_staged(orders, rungs=[30, 60], keep=0.5)
    full = [s for s in scores if s.n_images == len(evalset)]
    assert len(full) == math.ceil(math.ceil(len(orders) / 2) / 2)
    assert all(set(s.intermediate) == {30, 60} for s in full)
    best_low = max((s for s in scores if s.n_images == 30), key=lambda s: s.value, default=None)
    assert best_low is None or best_low.value <= max(s.intermediate[30] for s in full)
    ref = Engine(bank, evalset, "probe").evaluate([s.order for s in full])
    assert [s.value for s in full] == [s.value for s in ref]


def test_score_to_dict_is_json_friendly():
    s = Score(Order([1, 2]), float("nan"), {}, "boom", 10)
    assert s.to_dict() == {
        "order": [1, 2], "value": None, "metrics": {}, "failed": "boom", "n_images": 10, "intermediate": {}
    }


def test_timers_split_the_wall_clock_time(banks, data):
    engine = Engine(banks["isoresnet"], data["isoresnet"], "probe", cache_bytes=2**24)
    engine.evaluate(_random_orders(4, 12, seed=4))
    st = engine.stats
    parts = st.block_seconds + st.stem_seconds + st.output_seconds + st.objective_seconds + st.memory_seconds
    assert 0 < st.block_seconds and 0 < st.output_seconds and 0 < st.objective_seconds
    assert 0 < st.memory_seconds  # the pool's new buffers, faulted in apart from the blocks
    assert parts + st.plan_seconds <= st.total_seconds  # planning is part of the overhead
    assert 0 < st.plan_seconds <= st.overhead_seconds
    assert st.as_dict()["plan_us_per_candidate"] == pytest.approx(1e6 * st.plan_seconds / st.candidates)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_scores_in_float32(banks, data):
    bank, evalset = copy.deepcopy(banks["vit"]), data["vit"]
    orders = _random_orders(bank.n_blocks, 8, seed=10)
    cpu = Engine(copy.deepcopy(bank), evalset, "probe", device="cpu").evaluate(orders)
    engine = Engine(bank, evalset, "probe", device="cuda", dtype=torch.float32)
    gpu = engine.evaluate(orders)
    assert [s.value for s in gpu] == pytest.approx([s.value for s in cpu], abs=0.02)
    # block time is the GPU's (CUDA events), within the wall-clock time of the calls
    assert 0 < engine.stats.block_seconds < engine.stats.total_seconds
    bf16 = Engine(bank, evalset, "probe", device="cuda").evaluate(orders)
    assert all(s.ok for s in bf16)


def test_target_norm_re_estimates_per_position_statistics_of_compositional_banks(data):
    from ordersearch import bank_from_model, build_model
    from ordersearch.adapters.compositional import CompositionalConfig, CompositionalNet

    torch.manual_seed(0)
    net = CompositionalNet(CompositionalConfig(width=8, blocks=3, depth=4, affine="slot"))
    bank = bank_from_model(net.eval(), source=net.config.source())
    evalset = data["isoresnet"]
    order = Order([2, 2, 0, 1])
    engine = Engine(bank, evalset, "head", cache_bytes=2**26, batch_size=16, norm="target", dtype=torch.float32)
    got = engine.outputs(order)
    # reference: the rebuilt model with every BatchNorm normalising by whole-set batch statistics
    model = build_model(bank, order)
    model.train()
    with torch.no_grad():
        saved = {k: v.clone() for k, v in net.state_dict().items()}
        ref = model(evalset.x.to(engine.device)).cpu()
        net.load_state_dict(saved)  # train mode updated running statistics in place
    torch.testing.assert_close(got, ref, **_tol(1e-4))
    source = Engine(bank, evalset, "head", norm="source", dtype=torch.float32).outputs(order)
    assert not torch.allclose(got, source, atol=1e-3)


@pytest.mark.parametrize("env", ["ORDERSEARCH_TUNE_MALLOC", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_malloc_tuning_leaves_a_users_own_allocator_settings_alone(monkeypatch, env):
    from ordersearch.engine import _malloc

    monkeypatch.setattr(_malloc, "_mallopt", None)
    monkeypatch.setattr(_malloc, "_trim", 0)
    monkeypatch.setenv(env, "0" if env == "ORDERSEARCH_TUNE_MALLOC" else "glibc.malloc.trim_threshold=131072")
    assert _malloc.tune_malloc(2**30) is False
    assert _malloc._trim == 0


def test_malloc_tuning_keeps_the_largest_budget(monkeypatch):
    import platform
    import sys

    from ordersearch.engine import _malloc

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    for var in ("ORDERSEARCH_TUNE_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_malloc, "_mallopt", None)
    monkeypatch.setattr(_malloc, "_trim", 0)
    assert _malloc.tune_malloc(2**30) is True and _malloc._trim == 2**30
    assert _malloc.tune_malloc(2**20) is True and _malloc._trim == 2**30  # never lowered
    assert _malloc.tune_malloc(2**40) is True and _malloc._trim == 2**31 - 1  # mallopt takes an int


def test_blocks_that_write_into_the_cache_buffer_skip_the_copy(banks, data, monkeypatch):
    from ordersearch.isoresnet import IsoBlock

    bank, evalset = banks["isoresnet"], data["isoresnet"]
    calls = []
    into = IsoBlock.forward_into

    def counting(self, x, out):
        calls.append(out.data_ptr())
        return into(self, x, out)

    monkeypatch.setattr(IsoBlock, "forward_into", counting)
    engine = Engine(bank, evalset, "head", cache_bytes=2**26, batch_size=32, dtype=torch.float32)
    order = Order([1, 0, 2])
    assert torch.equal(engine.outputs(order), _reference_outputs(bank, evalset, order, "logits", 32, "source"))
    assert len(calls) == 3 * math.ceil(len(evalset) / 32)  # every chunk of every block
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in engine.cache_tensors()]
    assert len(spans) == 3 and all(any(a <= p < b for a, b in spans) for p in calls)  # into cached buffers


# --- shards: memory set by the budget, not by the number of images ----------------------------

def _shard_problem(n: int):
    bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
    return bank, _digits(n, 16, 1)


@pytest.mark.parametrize("objective", ["probe", "head", "infomax"])
def test_sharded_scores_equal_unsharded(objective):
    bank, es = _shard_problem(320)
    orders = _random_orders(4, 24, seed=5, max_len=6)
    kw = dict(cache_bytes=2**22, batch_size=32, device="cpu", dtype=torch.float32)
    whole = Engine(bank, es, objective, shard_images=0, **kw)
    sharded = Engine(bank, es, objective, shard_images=64, **kw)
    a = [s.value for s in whole.evaluate(orders)]
    b = [s.value for s in sharded.evaluate(orders[:10])] + [s.value for s in sharded.evaluate(orders[10:])]
    assert a == b  # shard boundaries fall on batch boundaries: the same block forwards, bit for bit
    assert torch.equal(whole.outputs(orders[0]), sharded.outputs(orders[0]))
    assert sharded._levels[len(es)].shards is not None and len(sharded._levels[len(es)].shards) == 5
    # block forwards are counted over all images: a shard's count as its share
    assert sharded.stats.naive_block_evals == whole.stats.naive_block_evals


def test_sharded_memory_does_not_grow_with_the_number_of_images():
    peaks = []
    for n in (256, 1024):
        bank, es = _shard_problem(n)
        engine = Engine(bank, es, "probe", cache_bytes=2**20, batch_size=32, device="cpu", shard_images=64)
        engine.evaluate(_random_orders(4, 16, seed=1, max_len=6))
        engine.evaluate(_random_orders(4, 16, seed=2, max_len=6))
        node = 64 * math.prod(bank.data_config["block_shape"]) * 4
        # the budget, one shard's path (stem output + 6 positions + one being filled) and no more
        assert engine.stats.live_bytes_peak <= 2**20 + 8 * node
        peaks.append(engine.stats.live_bytes_peak)
    assert peaks[1] <= peaks[0] * 1.05, peaks  # 4x the images, the same memory


def test_a_sharded_batch_s_outputs_go_to_disk_when_large(monkeypatch, mapped_file):
    """A sharded level's outputs are complete only after its last shard, so a batch holds every
    candidate's outputs over all images: beyond 128 MiB (here: beyond none) they are filled
    into a temporary file the objective reads, with the scores of outputs in memory."""
    from ordersearch.engine import _engine

    bank, es = _shard_problem(320)
    orders = _random_orders(4, 12, seed=6, max_len=6)
    kw = dict(cache_bytes=2**22, batch_size=32, device="cpu", shard_images=64)
    in_memory = [(s.value, s.metrics) for s in Engine(bank, es, "probe", **kw).evaluate(orders)]
    monkeypatch.setattr(_engine, "_OUTPUT_BYTES", 0)
    engine = Engine(bank, es, Probe(chunk=50), **kw)
    seen: list[str | None] = []
    real = Probe.score_many
    monkeypatch.setattr(Probe, "score_many", lambda self, outs, *a: seen.extend(map(mapped_file, outs)) or real(self, outs, *a))
    scores = engine.evaluate(orders)
    assert [s.value for s in scores] == pytest.approx([v for v, _ in in_memory], abs=1e-4)
    assert [s.metrics for s in scores] == [m for _, m in in_memory]
    assert len(seen) == len(set(orders)) and all("(deleted)" in f for f in seen)  # unlinked temporary files
    assert not list((Path(os.environ["ORDERSEARCH_CACHE"]) / "tmp").iterdir())  # nothing left behind


def test_shards_are_automatic_when_the_data_outgrows_the_budget():
    bank, es = _shard_problem(640)  # 640 images x 8 KiB per activation = 5 MiB a prefix
    engine = Engine(bank, es, "entropy", cache_bytes=8 * 2**20, batch_size=32, device="cpu")
    engine.evaluate(["0-1-2"])
    shards = engine._levels[640].shards
    assert shards is not None and [s.n for s in shards] == [64] * 10  # (8 MiB / 16) / 8 KiB images per shard
    small = Engine(bank, _digits(64, 16, 1), "entropy", cache_bytes=8 * 2**20, batch_size=32, device="cpu")
    small.evaluate(["0-1-2"])
    assert small._levels[64].shards is None


def test_shards_need_source_statistics():
    bank, es = _shard_problem(128)
    with pytest.raises(ValueError, match="shard_images needs norm='source'"):
        Engine(bank, es, "infomax", norm="target", shard_images=64)


def test_target_statistics_refuse_a_set_that_would_not_fit_in_memory(monkeypatch):
    from ordersearch.engine import _engine

    bank, es = _shard_problem(128)  # 128 images x 8 KiB per activation: 1 MiB a prefix
    engine = Engine(bank, es, "infomax", norm="target", device="cpu")
    memory = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000}  # a 4 MB machine: a quarter is under 1 MiB
    monkeypatch.setattr(_engine.os, "sysconf", memory.__getitem__)
    with pytest.raises(DataError, match="norm='target' keeps activations over all 128 images.*norm='source'"):
        engine.evaluate(["0-1"])
    memory["SC_PHYS_PAGES"] = 10_000  # 40 MB
    assert engine.evaluate(["0-1"])[0].ok


def test_a_memory_mapped_evalset_scores_as_one_in_memory(tmp_path):
    import numpy as np
    from numpy.lib.format import open_memmap

    bank, es = _shard_problem(256)
    out = open_memmap(tmp_path / "x.npy", "w+", np.float32, tuple(es.x.shape))
    for a in range(0, len(es), 100):  # written in chunks, as a large folder would be
        out[a : a + 100] = es.x[a : a + 100].numpy()
    out.flush()
    del out
    mapped = EvalSet.from_npy(tmp_path / "x.npy", es.y)
    assert isinstance(mapped.x, torch.Tensor) and mapped.digest == es.digest
    orders = _random_orders(4, 12, seed=9, max_len=5)
    kw = dict(cache_bytes=2**20, batch_size=32, device="cpu", shard_images=64)
    assert [s.value for s in Engine(bank, mapped, "probe", **kw).evaluate(orders)] == \
        [s.value for s in Engine(bank, es, "probe", **kw).evaluate(orders)]
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="is not a .npy array file"):
        EvalSet.from_npy(tmp_path / "bad.npy")


def test_the_accelerator_path_waits_once_per_scoring_group(banks, data, monkeypatch):
    """On an accelerator the engine does not wait for each candidate's blocks: outputs stay on
    the device, their finiteness is checked and the probe solved once per scoring group. The
    same code runs here on the CPU (the switch an accelerator sets): the scores equal the CPU
    path's, a NaN block is still named (found by a second, checked walk of that order), and
    the host reads the device a fixed number of times per batch, not per candidate."""
    bank = copy.deepcopy(banks["isoresnet"])
    evalset = data["isoresnet"]
    orders = _random_orders(bank.n_blocks, 24, seed=11)
    cpu = Engine(bank, evalset, "probe", cache_bytes=2**26).evaluate(orders)
    accel = Engine(bank, evalset, "probe", cache_bytes=2**26)
    accel._sync_checks = False
    reads: list[str] = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append("tolist"), original(self))[1])
    for name in ("item", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, _n=name: pytest.fail(f"Tensor.{_n} read the device"))
    assert [(s.value, s.metrics) for s in accel.evaluate(orders)] == [(s.value, s.metrics) for s in cpu]
    assert len(reads) == 2  # one scoring group: the finiteness check and the probe's results
    monkeypatch.undo()

    with torch.no_grad():
        bank.blocks[2].conv1.weight[0, 0, 0, 0] = float("nan")
    for sync in (True, False):
        engine = Engine(bank, evalset, "probe", cache_bytes=2**26)
        engine._sync_checks = sync
        scores = engine.evaluate(["0-1", "0-2-1", "2", "1-3"])
        assert [s.ok for s in scores] == [True, False, False, True]
        assert all("non-finite activation after block 2" in s.failed for s in scores if not s.ok)
        with pytest.raises(ValueError, match="non-finite activation after block 2"):
            engine.outputs("2-0")
