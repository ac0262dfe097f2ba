"""``search``: the loop every searcher runs in.

Ask a batch of trials from the searcher (``study.ask()`` x batch), score their orders together
with the engine (prefix sharing, retain hints, optional successive-halving pruning on growing
image subsets), tell the study, repeat until the trial budget, the time limit or the
searcher's proposals run out. The identity order is always trial 0.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..engine import EngineConfig
from ..order import Order
from ..space import OrderSpace
from ..spec import bank_description
from ._base import SearchContext, Searcher, SearchError, get_searcher
from ._encoding import OrderEncoding, is_live, order_of
from ._interrupt import HeldInterrupts
from ._lease import Leases
from ._result import SearchResult, best_trials, trials_table
from ._study import counts_toward_budget, fail_stale, make_storage, open_study

__all__ = ["search"]

log = logging.getLogger("ordersearch")

#: Trial states that hold a place in the budget before they finish (a waiting trial is an
#: enqueued order that the next ``study.ask()`` of any worker takes).
_IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)
#: Seconds between looks at a study whose remaining budget other workers are scoring.
_WAIT_SECONDS = 1.0
#: Seconds a claim waits for other workers' just-asked trials to show their orders.
_SETTLE_SECONDS = 2.0
#: Consecutive batches of known orders only after which a searcher is taken to have run dry.
_KNOWN_ONLY_LIMIT = 3

_STAT_KEYS = ("candidates", "failed", "block_evals", "min_block_evals", "naive_block_evals", "memo_hits",
              "image_block_evals", "total_seconds")


def search(
    bank: Any,
    evalset: Any,
    objective: Any = None,
    *,
    searcher: str | Searcher = "tpe",
    space: OrderSpace | None = None,
    n_trials: int = 100,
    batch_size: int = 8,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int | None = None,
    timeout: float | None = None,
    engine: Any = None,
    searcher_options: dict[str, Any] | None = None,
    fidelities: Sequence[int] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    progress: bool = False,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    run: dict[str, Any] | None = None,
) -> SearchResult:
    """Search an order of ``bank``'s blocks that maximises ``objective`` on ``evalset``.

    Args:
        bank: The frozen bank.
        evalset: The :class:`~ordersearch.evalset.EvalSet` scored on.
        objective: Objective name or object (default ``probe``; ignored when ``engine`` is given).
        searcher: Searcher name (``random``, ``tpe``, ``gp``, ``nsga2``, ``evolution``, ``beam``,
            ``local``, ``exhaustive``, ``sources``, ``differentiable``) or instance.
        space: Order space (default: permutations with skips, ``OrderSpace(K)``, widened in
            length and repeats to hold the bank's source orders).
        n_trials: Trial budget of the *study*, identity included: a resumed study runs only
            the trials it lacks. Searchers that run out of proposals stop earlier.
        batch_size: Trials asked and scored together.
        storage: Optuna storage URL or object; None keeps the study in memory.
        study_name: Name of the study; an existing one in ``storage`` is resumed.
        seed: Seed of the searcher (same seed, same trials).
        timeout: Stop asking new batches after this many seconds.
        engine: An :class:`~ordersearch.engine.Engine` to score with, or the
            :class:`~ordersearch.engine.EngineConfig` of a new one (default: ``EngineConfig()``).
        searcher_options: Options of a searcher given by name.
        fidelities: Image counts below the EvalSet size to score on first (multi-fidelity):
            candidates are pruned between them by ``pruner``.
        pruner: Optuna pruner (default with ``fidelities``: successive halving).
        progress: Show a progress bar with the best score so far.
        callbacks: Called as ``callback(study, trial)`` after each finished trial.
        run: Settings a new worker needs to join the study (what ``ordersearch worker``
            reads), recorded with the study when it is created.

    Returns:
        The best order, its score, the study and the trials table.

    Raises:
        SearchError: bad settings, a study made with other settings, or no trial scored.

    Example:
        >>> import ordersearch, torch
        >>> from ordersearch.evalset import EvalSet
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> data = EvalSet(torch.randn(40, 1, 16, 16), torch.arange(40) % 4)
        >>> result = search(bank, data, "probe", searcher="random", n_trials=6, seed=0)
        >>> result.trials["order"][0], len(result.trials)
        ('0-1-2', 6)
    """
    searcher = get_searcher(searcher, **(searcher_options or {}))
    if n_trials < 1 or batch_size < 1:
        raise SearchError(f"n_trials and batch_size must be >= 1, got {n_trials} and {batch_size}")
    if timeout is not None and not timeout > 0:
        raise SearchError(f"timeout must be a positive number of seconds, got {timeout}")
    if space is None:  # permutations with skips, widened to hold the bank's source orders
        space = OrderSpace.covering(bank.n_blocks, list(getattr(bank, "source_orders", {}).values()))
    if space.n_blocks != bank.n_blocks:
        raise SearchError(f"the order space has {space.n_blocks} blocks but the bank has {bank.n_blocks}")
    searcher.check(space)
    if engine is None or isinstance(engine, EngineConfig):
        engine = (engine or EngineConfig()).build(bank, evalset, objective if objective is not None else "probe")
    rungs, pruner = _fidelities(engine, searcher, fidelities, pruner)
    ctx = SearchContext(space, OrderEncoding(space), engine, bank, seed)
    meta = {
        "searcher": searcher.name,
        "searcher_config": searcher.config(),
        "space": space.describe(),
        "objective": engine.objective.name,
        "fingerprint": bank.fingerprint,
        "bank_digest": bank.digest,
        "bank": bank_description(bank),
        "data": evalset.describe() if hasattr(evalset, "describe") else None,
        "data_digest": evalset.digest,
        "engine": {"dtype": str(engine.dtype).removeprefix("torch."), "norm": engine.norm},
        "fidelities": rungs,
        "run": run,
    }
    ctx.study, joined = open_study(make_storage(storage), study_name, sampler=searcher.make_sampler(ctx),
                                   pruner=pruner, directions=searcher.directions, meta=meta)
    fail_stale(ctx.study)
    ctx.leases = Leases(ctx.study)
    if joined and seed is not None:  # a worker of its own: never in lockstep with the others
        ctx.worker_seed = ctx.leases.seed(seed)
        ctx.study.sampler = searcher.make_sampler(ctx)
    start = time.perf_counter()
    stats0 = _stats(engine)
    with warnings.catch_warnings():
        # The heartbeat serves ask-and-tell as well as Study.optimize; Optuna warns regardless.
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        return _loop(ctx, searcher, rungs, list(callbacks), n_trials, batch_size, timeout, progress, start, stats0)


def _loop(ctx: SearchContext, searcher: Searcher, rungs: list[int], callbacks: list, n_trials: int, batch_size: int,
          timeout: float | None, progress: bool, start: float, stats0: dict[str, float]) -> SearchResult:
    study, engine = ctx.study, ctx.engine
    assert study is not None
    obj_name = engine.objective.name
    bar = _bar(progress, n_trials, searcher.name)
    run = _Run(ctx, searcher, rungs, callbacks, bar)
    with run.held:
        _trials(ctx, searcher, run, bar, n_trials, batch_size, timeout, start)
    return _result(study, searcher, obj_name, _diff(stats0, _stats(engine)))


def _trials(ctx: SearchContext, searcher: Searcher, run: _Run, bar: Any, n_trials: int, batch_size: int,
            timeout: float | None, start: float) -> None:
    """Ask, claim, score and tell until the budget is met; fail what is held on the way out."""
    study = ctx.study
    assert study is not None and ctx.leases is not None
    stopped = "worker stopped"
    try:
        if not _has_baseline(study.get_trials(deepcopy=False), ctx):
            run.baseline(n_trials)
        searcher.prepare(ctx)
        known_only = 0  # consecutive batches in which every proposal was an order already asked
        while True:
            run.held.check()
            if timeout is not None and time.perf_counter() - start > timeout:
                log.info("search stopped by its time limit after %.0f s", time.perf_counter() - start)
                break
            trials = study.get_trials(deepcopy=False)
            if ctx.leases.reclaim(trials):  # trials of gone workers: failed, not counted
                trials = study.get_trials(deepcopy=False)
            # other workers' trials in flight count: together the workers stop at the budget
            used = sum(counts_toward_budget(t) or t.state == TrialState.RUNNING for t in trials)
            if bar is not None:
                bar.n = min(sum(counts_toward_budget(t) for t in trials), n_trials)
                bar.refresh()
            remaining = n_trials - used
            if remaining > 0 and not _has_baseline(trials, ctx):
                # the worker that held the baseline died (its trial was just reclaimed): every
                # study keeps "do nothing" among its trials, so another worker scores it again
                run.baseline(n_trials)
                continue
            if remaining <= 0:
                if not any(t.state == TrialState.RUNNING for t in trials):
                    break
                # the rest of the budget is in other workers' hands: wait for it, so that the
                # result covers every trial (and take over the trials of a worker that dies)
                time.sleep(_WAIT_SECONDS)
                continue
            asked = searcher.ask(ctx, min(batch_size, remaining))
            if not asked:
                log.info("searcher %s has nothing left to propose", searcher.name)
                break
            items, known = run.claim(asked, n_trials)
            known_only = known_only + 1 if known == len(asked) else 0
            if known_only >= _KNOWN_ONLY_LIMIT:
                log.info("searcher %s proposes only orders already in the study; stopping", searcher.name)
                break
            run.batch(items)
    except KeyboardInterrupt:
        stopped = "interrupted (SIGINT)"
        raise
    except BaseException as exc:
        stopped = f"worker stopped: {type(exc).__name__}: {str(exc)[:200]}"
        raise
    finally:
        if bar is not None:
            bar.close()
        # trials asked but never told (mid-batch, or asked by the searcher before a batch)
        n = ctx.leases.close(stopped)
        if n:
            log.warning("%d trials in flight were failed (%s); they will be proposed again", n, stopped)


def _has_baseline(trials: list[FrozenTrial], ctx: SearchContext) -> bool:
    """Whether a live trial scores the identity order (the baseline, or a searcher's proposal
    of it: asking the baseline again would then be refused as a repeat)."""
    return any(is_live(t) and (t.user_attrs.get("baseline") or order_of(t, ctx.encoding) == ctx.bank.identity)
               for t in trials)


class _Run:
    """Scores batches and tells the study (in-flight trials of an interrupted batch are
    failed by the leases, see :mod:`._lease`)."""

    def __init__(self, ctx: SearchContext, searcher: Searcher, rungs: list[int], callbacks: list, bar: Any) -> None:
        self.ctx, self.searcher, self.rungs, self.callbacks, self.bar = ctx, searcher, rungs, callbacks, bar
        self.best = -math.inf
        self.held = HeldInterrupts()  # Ctrl-C: at once while scoring, after the write otherwise

    def baseline(self, n_trials: int) -> None:
        """Ask for the identity order as the study's baseline trial and score it."""
        self.batch(self.claim([self.ctx.ask_order(self.ctx.bank.identity, baseline=True)], n_trials)[0])

    def claim(self, items: list[tuple[optuna.Trial, Order]], n_trials: int) -> tuple[list[tuple[optuna.Trial, Order]], int]:
        """The asked trials this worker scores, and how many were refused as known orders.

        Trial numbers order a study's trials for every worker alike, so all workers reach the
        same decision without a lock: a trial whose order an earlier live trial has is a
        repeat, and a trial past the ``n_trials``-th that holds a place in the budget
        (finished, running or waiting) lost the race for the budget's last places. Refused
        trials are failed with the reason (and, like lost ones, not counted).
        """
        if not items:
            return [], 0
        ctx, mine = self.ctx, {t.number: t for t, _ in items}
        assert ctx.leases is not None
        first: dict[Order, int] = {}
        refused: dict[int, str] = {}
        holding, known = 0, 0
        for t in self._settled(max(mine)):
            if t.number > max(mine):
                break
            if not is_live(t) or t.number in refused:
                continue
            order = order_of(t, ctx.encoding)
            if order is not None and order in first:
                if t.number in mine:
                    refused[t.number], known = f"refused: order {order} is trial {first[order]}'s", known + 1
                continue  # another worker's repeat: its worker refuses it
            if order is not None:
                first[order] = t.number
            if counts_toward_budget(t) or t.state in _IN_FLIGHT:
                holding += 1
                if holding > n_trials and t.number in mine:
                    refused[t.number] = f"refused: beyond the budget of {n_trials} trials"
                    holding -= 1
        for number, why in refused.items():
            ctx.leases.give_back(mine[number], why)
        return [(t, o) for t, o in items if t.number not in refused], known

    def _settled(self, last: int) -> list[FrozenTrial]:
        """The study's trials by number, once every running trial up to ``last`` shows its
        order: another worker records a trial's order a few storage round trips after asking
        for it, and a claim that read it before would miss a repeat. A trial that shows none
        after :data:`_SETTLE_SECONDS` (its worker died in between) is not waited for."""
        while True:
            trials = sorted(self.ctx.trials(), key=lambda t: t.number)
            since = datetime.now() - timedelta(seconds=_SETTLE_SECONDS)  # Optuna's clock: naive local time
            if not any(t.number <= last and t.state == TrialState.RUNNING and t.datetime_start is not None
                       and t.datetime_start > since and order_of(t, self.ctx.encoding) is None for t in trials):
                return trials
            time.sleep(0.01)

    def batch(self, items: list[tuple[optuna.Trial, Order]]) -> None:
        study = self.ctx.study
        assert study is not None
        if not items:
            return
        _beat(study, [t for t, _ in items])
        scores, pruned = self._evaluate(items)
        for (trial, order), score, was_pruned in zip(items, scores, pruned):
            frozen = self._tell(trial, order, score, was_pruned)
            for cb in self.callbacks:
                cb(study, frozen)

    def _evaluate(self, items: list[tuple[optuna.Trial, Order]]) -> tuple[list[Any], list[bool]]:
        engine = self.ctx.engine
        retain = self.searcher.retain(self.ctx)
        orders = [o for _, o in items]
        final: list[Any] = [None] * len(items)
        pruned = [False] * len(items)
        alive = list(range(len(items)))
        for n in self.rungs:
            with self.held.scoring():
                scores = engine.evaluate([orders[i] for i in alive], n_images=n)
            for i, s in zip(alive, scores):
                if s.ok:
                    items[i][0].report(s.value, n)
                else:
                    final[i] = s
            keep = []
            for i, s in zip(alive, scores):
                if s.ok and items[i][0].should_prune():
                    final[i], pruned[i] = s, True
                elif s.ok:
                    keep.append(i)
            alive = keep
            _beat(self.ctx.study, [items[i][0] for i in alive])
        if alive:
            with self.held.scoring():
                scores = engine.evaluate([orders[i] for i in alive], retain=retain)
            for i, s in zip(alive, scores):
                final[i] = s
        return final, pruned

    def _tell(self, trial: optuna.Trial, order: Order, score: Any, pruned: bool) -> FrozenTrial:
        study = self.ctx.study
        assert study is not None
        trial.set_user_attr("n_images", int(score.n_images))
        if score.metrics:
            trial.set_user_attr("metrics", {k: float(v) for k, v in score.metrics.items()})
        assert self.ctx.leases is not None
        self.ctx.leases.done(trial.number)
        if pruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        elif not score.ok:
            trial.set_user_attr("failed", str(score.failed))
            frozen = study.tell(trial, state=TrialState.FAIL)
        else:
            frozen = study.tell(trial, self.searcher.values(float(score.value), order))
            if score.value > self.best:
                self.best = score.value
        if self.bar is not None:
            self.bar.update(1)
            if math.isfinite(self.best):
                self.bar.set_postfix_str(f"best {self.best:.4f}", refresh=False)
        return frozen


def _fidelities(engine: Any, searcher: Searcher, fidelities: Sequence[int] | None,
                pruner: optuna.pruners.BasePruner | None) -> tuple[list[int], optuna.pruners.BasePruner | None]:
    if fidelities is None and pruner is None:
        return [], None
    n = engine.n_images
    if fidelities is None:  # successive halving's usual ladder: quarter steps down to 32 images
        rungs, m = [], n // 4
        while m >= 32:
            rungs.insert(0, m)
            m //= 4
    else:
        rungs = sorted({int(f) for f in fidelities})
        if rungs and (rungs[0] < 2 or rungs[-1] >= n):
            raise SearchError(f"fidelities must be image counts in 2..{n - 1} (the EvalSet has {n}), got {list(fidelities)}")
    if not rungs:
        raise SearchError(f"no fidelity below the EvalSet's {n} images to prune on; give fidelities")
    if len(searcher.directions) > 1:
        raise SearchError(f"searcher {searcher.name!r} is multi-objective; Optuna pruners need a single objective")
    if pruner is None:
        factor = max(2, round(rungs[1] / rungs[0])) if len(rungs) > 1 else max(2, round(n / rungs[0]))
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0], reduction_factor=factor)
    return rungs, pruner


def _beat(study: optuna.Study | None, trials: list[optuna.Trial]) -> None:
    storage = getattr(study, "_storage", None)
    if storage is None or not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        return
    for t in trials:
        storage.record_heartbeat(t._trial_id)


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _stats(engine: Any) -> dict[str, float]:
    stats = getattr(engine, "stats", None)
    return {k: float(getattr(stats, k, 0) or 0) for k in _STAT_KEYS}


def _diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in _STAT_KEYS}


def _result(study: optuna.Study, searcher: Searcher, objective: str, stats: dict[str, float]) -> SearchResult:
    best = best_trials(study)
    if not best:
        raise SearchError(f"no trial of study {study.study_name!r} scored successfully")
    t = best[0]
    ident = [x for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if x.user_attrs.get("baseline")]
    return SearchResult(
        best_order=Order.parse(t.user_attrs["order"]),
        best_score=t.values[0],
        best_metrics=dict(t.user_attrs.get("metrics") or {}),
        identity_score=ident[0].values[0] if ident else None,
        study=study,
        trials=trials_table(study),
        searcher=searcher.name,
        objective=objective,
        engine_stats=stats,
    )
