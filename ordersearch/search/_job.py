"""``SearchJob``: one search run, from data to an answer with held-out evidence.

The one owner of the pipeline that ``ordersearch search``, ``ordersearch adapt``, the demo and
the studies run (Zhmoginov, Bashkirova and Sandler, arXiv 2107.10963, reorder frozen blocks; a
search over a noisy objective overstates its winner, so the answer is checked on images the
search never saw):

1. the data is split into disjoint, seeded, stratified *search*, *select* and (when
   labelled) *test* parts; the searcher sees only *search*;
2. the search runs on an Optuna study (the identity order is trial 0);
3. the top distinct *finalists* by search score, and always the baseline, are re-scored on
   *select* with the same objective (a probe keeps its fit part, the search split's train
   half, and is scored on the select images); the returned order is the best on *select*;
4. a paired bootstrap over images gives the interval of chosen-minus-baseline on *select* and,
   where labels exist, on *test* with the objective's labelled truth (``head`` accuracy for
   the unsupervised objectives); the verdict (``improved``, ``within noise``, ``worse``) is
   read from *test* when it exists, else from *select*;
5. the :class:`JobResult` is written once into the study (user attribute
   :data:`RESULT_KEY`), from which ``ordersearch export`` renders it again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState

from .._images import gather
from ..data import Data, stratified_split
from ..engine import DEFAULT_LABELLED, EngineConfig, get_objective
from ..engine._norm import batchnorm_modules
from ..errors import DataError
from ..evalset import EvalSet
from ..order import Order
from ..space import OrderSpace
from ..spec import bank_description
from ._base import Searcher, SearchError
from ._evidence import WITHIN_NOISE, Interval, paired_bootstrap
from ._result import SearchResult, best_trials
from ._search import search

__all__ = ["Finalist", "JobResult", "RESULT_KEY", "SearchJob", "SelectionConfig", "Splits", "make_splits"]

log = logging.getLogger("ordersearch")

_NO_NORM = ("norm='target' (--norm target) re-estimates BatchNorm statistics, but this bank has no BatchNorm "
            "layers: its scores are those of norm='source'")

#: The study user attribute that holds a finished job's :class:`JobResult` (``to_dict()``).
RESULT_KEY = "ordersearch_result"


@dataclass(frozen=True)
class SelectionConfig:
    """How the answer is chosen and checked.

    Args:
        finalists: Distinct orders taken from the search (best search scores first) to be
            re-scored on *select*; the baseline is added when not among them.
        resamples: Paired bootstrap resamples over images.
        confidence: Coverage of the bootstrap interval.
        reliability_orders: Best orders re-scored on two halves of *search* for the split-half
            reliability of the objective (0: skip).
        select_share: Share of *search* set aside as *select* when the data has no val split.
    """

    finalists: int = 10
    resamples: int = 2000
    confidence: float = 0.95
    reliability_orders: int = 30
    select_share: float = 0.25

    def __post_init__(self) -> None:
        if self.finalists < 1:
            raise SearchError(f"finalists must be >= 1, got {self.finalists}")
        if self.resamples < 1000:
            raise SearchError(f"the bootstrap needs >= 1000 resamples for a stable interval, got {self.resamples}")
        if not 0.5 <= self.confidence < 1:
            raise SearchError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.reliability_orders < 0:
            raise SearchError(f"reliability_orders must be >= 0, got {self.reliability_orders}")
        if not 0 < self.select_share < 1:
            raise SearchError(f"select_share must be in (0, 1), got {self.select_share}")


# --- splits --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Splits:
    """The disjoint parts of the user's data a job uses.

    Attributes:
        search: What the searcher scores on (unlabelled for unsupervised objectives).
        select: Held-out images the finalists are re-scored on (labelled like ``search``).
        test: Labelled held-out images for the truth (accuracy), or None.
        notes: What was done to the data that the report should say (a carved select part,
            no test split, ...).
    """

    search: EvalSet
    select: EvalSet
    test: EvalSet | None = None
    notes: tuple[str, ...] = ()

    def sizes(self) -> dict[str, int]:
        return {"search": len(self.search), "select": len(self.select), "test": 0 if self.test is None else len(self.test)}


def make_splits(data: Data, *, labelled: bool, seed: int = 0, n_images: int | None = None,
                select_share: float = 0.25) -> Splits:
    """*search* = the data's train split, *select* = its val split, *test* = its test split.

    A dataset without a val split gets its select part carved from train (stratified,
    ``select_share``); one without labelled test images has no test part (the verdict is then
    read on *select*). ``labelled=False`` drops the labels from *search* and *select* (an
    unsupervised objective never sees them; *test* keeps them, for the report only).
    ``n_images`` subsets *search* (seeded).
    """
    notes: list[str] = []
    (xs, ys), (xv, yv), (xt, yt) = data.train, data.val, data.test
    if len(xv) < 2:
        if len(xs) < 8:
            raise DataError(f"{data.spec}: {len(xs)} train images and no val split: too few to set a select part aside")
        rest, held = stratified_split(ys, len(xs), (1 - select_share, select_share), seed)
        xs, ys, xv, yv = (gather([(xs, rest)]), None if ys is None else ys[rest], gather([(xs, held)]),
                          None if ys is None else ys[held])
        notes.append(f"{data.spec} has no val split: select is {len(held)} train images set aside "
                     f"({100 * select_share:.0f}%, stratified, seed {seed})")
    keep = labelled and ys is not None
    search = EvalSet(xs, ys if keep else None, seed=seed, name=f"{data.spec}[search]", classes=data.classes or None)
    if n_images is not None and n_images < len(search):
        search = search.subset(n_images, seed=seed)
    select = EvalSet(xv, yv if keep else None, seed=seed, name=f"{data.spec}[select]", classes=data.classes or None)
    test = None
    if len(xt) >= 2 and yt is not None:
        test = EvalSet(xt, yt, seed=seed, name=f"{data.spec}[test]", classes=data.classes or None)
    elif len(xt) == 0:
        notes.append(f"{data.spec} has no test split: no held-out accuracy; the verdict is read on select")
    else:
        notes.append(f"{data.spec}'s test split is unlabelled or too small: the verdict is read on select")
    return Splits(search, select, test, tuple(notes))


def held_out(objective: Any, search: EvalSet, images: EvalSet) -> EvalSet:
    """The EvalSet an objective scores held-out ``images`` on: for objectives that fit on a
    train part (``probe``), the search EvalSet's train part stays the fit part and ``images``
    become the scored part; other objectives score ``images`` alone."""
    if not objective.fits:
        return images
    if search.y is None or images.y is None:
        raise DataError(f"objective {objective.name!r} needs labels on both the search and the held-out images")
    fit = search.train_idx
    n_fit = len(fit)
    return EvalSet.with_split(
        gather([(search.x, fit), (images.x, None)]), torch.cat([search.y[fit], images.y]),
        torch.arange(n_fit), torch.arange(n_fit, n_fit + len(images)),
        seed=images.seed, name=images.name, classes=images.classes,
    )


# --- the result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finalist:
    """An order re-scored on the held-out parts.

    Attributes:
        order: The order.
        search: Objective on *search* (what the searcher saw).
        select: Objective on *select* (None if it failed there).
        test: The truth (e.g. accuracy) on *test*, None without labelled test images.
        baseline: True for the baseline order.
        trial: Its trial number in the study (None if the search never scored it).
    """

    order: Order
    search: float | None
    select: float | None
    test: float | None = None
    baseline: bool = False
    trial: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"order": str(self.order), "search": self.search, "select": self.select, "test": self.test,
                "baseline": self.baseline, "trial": self.trial}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finalist:
        return cls(Order.parse(d["order"]), d.get("search"), d.get("select"), d.get("test"),
                   bool(d.get("baseline")), d.get("trial"))


@dataclass(frozen=True, eq=False)
class JobResult:
    """The answer of a :class:`SearchJob`, with its evidence.

    Attributes:
        chosen: The returned order: the finalist with the best *select* score.
        baseline: The order every gain is measured against (the identity unless the job
            names another, e.g. a multi-source bank's source order; with target statistics for
            ``norm="target"``).
        finalists: Every re-scored order, best on *select* first.
        verdict: ``improved``, ``within noise`` or ``worse``.
        select_interval: Chosen minus baseline on *select* (the objective).
        test_interval: Chosen minus baseline on *test* (the truth), if labelled test images exist.
        objective, truth: The objective searched and the labelled measure on *test*.
        baseline_name: How the baseline is named in reports.
        reference: The unmodified source model's truth on *test* (the baseline order with the
            bank's own statistics: its task's, for a source order of a multi-task bank) when the
            job re-estimated them (``norm="target"``).
        reliability: Split-half reliability of the objective on *search* (``spearman``,
            ``n_orders``, ``half_size``), or None.
        sizes: Images in *search*, *select*, *test*.
        notes: What was done to the data (carved select part, missing test split).
        settings: The job's settings (searcher, space, engine, selection, budget, seed, data).
        bank: The bank's description (:func:`ordersearch.spec.bank_description`).
        engine_stats: The search engine's counters for this run.
        n_trials: Trials in the study.
        seconds: Wall-clock time of the run.
        study: The Optuna study (None when rebuilt without one).
    """

    chosen: Finalist
    baseline: Finalist
    finalists: tuple[Finalist, ...]
    verdict: str
    select_interval: Interval
    test_interval: Interval | None
    objective: str
    truth: str | None
    baseline_name: str
    reference: float | None
    reliability: dict[str, Any] | None
    sizes: dict[str, int]
    notes: tuple[str, ...]
    settings: dict[str, Any]
    bank: dict[str, Any]
    engine_stats: dict[str, float] = field(default_factory=dict)
    n_trials: int = 0
    seconds: float = 0.0
    study: optuna.Study | None = None

    @property
    def best_order(self) -> Order:
        return self.chosen.order

    @property
    def improved(self) -> bool:
        return self.verdict == "improved"

    @property
    def winners_curse(self) -> float | None:
        """Search minus select score of the chosen order: how much the search score overstates it."""
        c = self.chosen
        return None if c.search is None or c.select is None else c.search - c.select

    @property
    def deciding(self) -> Interval:
        """The interval the verdict is read from: *test* when it exists, else *select*."""
        return self.test_interval if self.test_interval is not None else self.select_interval

    def summary(self) -> str:
        """The one verdict line, e.g. ``best 1-5-3-5-2 +0.206 (95% CI +0.170..+0.240) over the
        identity on 359 held-out test images (probe): improved``; it starts with ``no better
        order found`` unless the verdict is ``improved``."""
        iv = self.deciding
        if self.chosen.order == self.baseline.order:
            return (f"no better order found: the {self.baseline_name} {self.baseline.order} scored best on "
                    f"{self.sizes.get('select', 0)} held-out select images ({self.objective}): {WITHIN_NOISE}")
        line = (f"{self.chosen.order} {iv.text()} over the {self.baseline_name} on {iv.n} held-out "
                f"{iv.split} images ({iv.metric}): {self.verdict}")
        # an order that only ties (or loses) is never reported as a result
        return f"best {line}" if self.verdict == "improved" else f"no better order found: the best candidate {line}"

    def table(self) -> pd.DataFrame:
        """One row per finalist: order, depth, search, select and test scores."""
        return pd.DataFrame([{**f.to_dict(), "depth": len(f.order), "chosen": f.order == self.chosen.order}
                             for f in self.finalists])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (what the study keeps under :data:`RESULT_KEY`)."""
        return {
            "chosen": self.chosen.to_dict(), "baseline": self.baseline.to_dict(),
            "finalists": [f.to_dict() for f in self.finalists], "verdict": self.verdict, "summary": self.summary(),
            "select_interval": self.select_interval.to_dict(),
            "test_interval": None if self.test_interval is None else self.test_interval.to_dict(),
            "objective": self.objective, "truth": self.truth, "baseline_name": self.baseline_name,
            "reference": self.reference, "reliability": self.reliability, "sizes": dict(self.sizes),
            "notes": list(self.notes), "settings": self.settings, "bank": self.bank,
            "engine_stats": dict(self.engine_stats), "n_trials": self.n_trials, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], study: optuna.Study | None = None) -> JobResult:
        return cls(
            chosen=Finalist.from_dict(d["chosen"]), baseline=Finalist.from_dict(d["baseline"]),
            finalists=tuple(Finalist.from_dict(f) for f in d["finalists"]), verdict=d["verdict"],
            select_interval=Interval.from_dict(d["select_interval"]),
            test_interval=None if d.get("test_interval") is None else Interval.from_dict(d["test_interval"]),
            objective=d["objective"], truth=d.get("truth"), baseline_name=d.get("baseline_name", "identity"),
            reference=d.get("reference"), reliability=d.get("reliability"), sizes=dict(d.get("sizes") or {}),
            notes=tuple(d.get("notes") or ()), settings=dict(d.get("settings") or {}), bank=dict(d.get("bank") or {}),
            engine_stats=dict(d.get("engine_stats") or {}), n_trials=int(d.get("n_trials") or 0),
            seconds=float(d.get("seconds") or 0.0), study=study,
        )

    @classmethod
    def from_study(cls, study: optuna.Study) -> JobResult:
        """The result a finished job wrote into ``study``.

        Raises:
            SearchError: the study holds no job result (made by :func:`search` alone, or its
                job was interrupted before it finished).
        """
        d = study.user_attrs.get(RESULT_KEY)
        if not d:
            raise SearchError(f"study {study.study_name!r} holds no finished search run (no held-out selection was "
                              "recorded); run `ordersearch search` or `adapt` with it to finish it")
        return cls.from_dict(d, study)

    def __repr__(self) -> str:
        return f"JobResult({self.summary()!r})"


# --- the job -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class SearchJob:
    """One search run: search on *search*, select finalists on *select*, judge on *test*.

    Args:
        bank: The frozen bank.
        data: A :class:`~ordersearch.data.Data` (split by :func:`make_splits`) or ready
            :class:`Splits`.
        objective: Objective name or object (``probe`` for a labelled task, ``infomax`` for an
            unlabelled domain).
        searcher: Searcher name or instance; ``searcher_options`` configure one given by name.
        space: Order space (default: permutations with skips, widened for source orders).
        engine: How candidates are scored (:class:`~ordersearch.engine.EngineConfig`).
        n_trials: Trial budget of the study, identity included.
        batch_size: Orders asked and scored together.
        storage: Optuna storage URL or object (None: in memory).
        study_name: Study name; an existing one resumes.
        selection: Finalists, bootstrap and reliability settings.
        seed: Seed of the splits, the searcher and the bootstrap.
        timeout: Stop asking new orders after this many seconds.
        fidelities: Image counts to prune on first (successive halving).
        n_images: Score the search on a seeded subset of this many *search* images.
        progress: Show the search's progress bar.
        callbacks: Called as ``callback(study, trial)`` after each finished trial.
        jobs: Local worker processes that share the search (joblib; needs a storage URL);
            the held-out selection runs once they have met the budget.
        run_settings: Settings recorded with the study for ``ordersearch worker`` (see
            :func:`search`'s ``run``).
        baseline: The order gains are measured against: None for the identity, a name of
            ``bank.source_orders`` (the unmodified model of that source domain: with a
            multi-source bank the identity is an order no task ran) or an order.

    Example:
        >>> import ordersearch
        >>> from ordersearch.data import load
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> data = load("digits:rotate=30,n=300", bank.data_config)
        >>> result = SearchJob(bank=bank, data=data, objective="probe", searcher="random", n_trials=6).run()
        >>> result.verdict in ("improved", "within noise", "worse")
        True
    """

    bank: Any
    data: Data | Splits
    objective: Any = DEFAULT_LABELLED
    searcher: str | Searcher = "tpe"
    searcher_options: Mapping[str, Any] = field(default_factory=dict)
    space: OrderSpace | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    n_trials: int = 100
    batch_size: int = 8
    storage: str | optuna.storages.BaseStorage | None = None
    study_name: str | None = None
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = 0
    timeout: float | None = None
    fidelities: Sequence[int] | None = None
    n_images: int | None = None
    progress: bool = False
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()
    jobs: int = 1
    run_settings: Mapping[str, Any] | None = None
    baseline: Order | str | None = None

    def __post_init__(self) -> None:
        self.baseline_order()  # a bad name fails before the search, not after it
        if self.jobs < 1:
            raise SearchError(f"jobs must be >= 1, got {self.jobs}")
        if self.jobs > 1 and not (isinstance(self.storage, str) and self.study_name):
            raise SearchError("several jobs share one study through a storage URL (e.g. sqlite:///run/study.db): "
                              "give storage and study_name")

    def baseline_order(self) -> tuple[Order, str]:
        """The baseline order and its name in reports (``identity`` or ``source order 'plain'``)."""
        if self.baseline is None:
            return self.bank.identity, "identity"
        named = getattr(self.bank, "source_orders", {}) or {}
        if isinstance(self.baseline, str) and self.baseline in named:
            return named[self.baseline], f"source order {self.baseline!r}"
        try:
            order = Order.parse(self.baseline).validate(self.bank.n_blocks)
        except ValueError as exc:
            known = f"; source orders: {', '.join(named)}" if named else " (this bank names no source orders)"
            raise SearchError(f"baseline {str(self.baseline)!r} is neither a source order nor a valid order: "
                              f"{exc}{known}") from None
        return order, "identity" if order == self.bank.identity else f"order {order}"

    def splits(self) -> Splits:
        """The parts of the data this job uses."""
        if isinstance(self.data, Splits):
            return self.data
        objective = get_objective(self.objective)
        return make_splits(self.data, labelled=objective.needs_labels, seed=self.seed, n_images=self.n_images,
                           select_share=self.selection.select_share)

    def work(self) -> SearchResult:
        """The search alone, as one worker of the study: score its trials until the budget
        is met (with the other workers), without the held-out selection (:meth:`run`)."""
        objective = get_objective(self.objective)
        splits = self.splits()
        if objective.needs_labels and not splits.search.has_labels:
            raise DataError(f"objective {objective.name!r} needs labels; {splits.search.name} has none")
        engine = self.engine.build(self.bank, splits.search, objective)
        return search(self.bank, splits.search, objective, searcher=self.searcher, space=self.space,
                      n_trials=self.n_trials, batch_size=self.batch_size, storage=self.storage,
                      study_name=self.study_name, seed=self.seed, timeout=self.timeout, engine=engine,
                      searcher_options=dict(self.searcher_options), fidelities=self.fidelities,
                      progress=self.progress, callbacks=self.callbacks,
                      run=None if self.run_settings is None else dict(self.run_settings))

    def run(self) -> JobResult:
        """Search (in ``jobs`` processes), select, judge; write the result into the study and
        return it."""
        start = time.perf_counter()
        objective = get_objective(self.objective)
        splits = self.splits()
        bank, sel = self.bank, self.selection
        no_norm = self.engine.norm == "target" and not batchnorm_modules(bank)
        if no_norm:
            log.warning("%s", _NO_NORM)
        if self.jobs > 1:
            _parallel(self)
        found = (replace(self, progress=False) if self.jobs > 1 else self).work()  # with jobs: budget met
        study = found.study
        base, base_name = self.baseline_order()
        search_scores = _search_scores(study)
        ranked = [t for t in best_trials(study, sel.finalists + 1)]
        orders = [base] + [o for o in (Order.parse(t.user_attrs["order"]) for t in ranked) if o != base]
        orders = orders[: sel.finalists + 1] if len(orders) > sel.finalists else orders

        # select: the same objective on held-out images
        select_es = held_out(objective, splits.search, splits.select)
        select_engine = self.engine.build(bank, select_es, objective)
        select_scores = {s.order: (s.value if s.ok else None) for s in select_engine.evaluate(orders)}
        if select_scores[base] is None:
            raise SearchError(f"the {base} order failed on the select images; no held-out comparison is possible")
        # best on select; ties keep the baseline, then the better search score
        rank = {o: i for i, o in enumerate(orders)}
        chosen = max((o for o in orders if select_scores[o] is not None),
                     key=lambda o: (select_scores[o], o == base, -rank[o]))
        state = objective.prepare(select_es)
        select_iv = paired_bootstrap(objective, select_engine.outputs(chosen), select_engine.outputs(base),
                                     select_es, split="select", resamples=sel.resamples,
                                     confidence=sel.confidence, seed=self.seed, state=state)

        # test: the truth (labelled) on held-out images, judged but never used to choose
        truth, test_scores, test_iv, reference = None, {}, None, None
        notes = list(splits.notes) + ([_NO_NORM] if no_norm else [])
        if splits.test is not None and objective.truth:
            truth = get_objective(objective.truth)
            try:
                test_es = held_out(truth, splits.search, splits.test)
            except DataError as exc:
                notes.append(f"no test scores: {exc}")
                truth = None
        if truth is not None:
            test_engine = self.engine.build(bank, test_es, truth)
            test_scores = {s.order: (s.value if s.ok else None) for s in test_engine.evaluate(orders)}
            test_iv = paired_bootstrap(truth, test_engine.outputs(chosen), test_engine.outputs(base), test_es,
                                       split="test", resamples=sel.resamples, confidence=sel.confidence,
                                       seed=self.seed)
            if self.engine.norm == "target":
                own = _own_bank(bank, self.baseline)
                plain = replace(self.engine, norm="source").build(own, test_es, truth).evaluate([base])[0]
                reference = plain.value if plain.ok else None

        trial_of = {Order.parse(t.user_attrs["order"]): t.number for t in ranked}
        finalists = tuple(sorted(
            (Finalist(o, search_scores.get(o), select_scores[o], test_scores.get(o), o == base, trial_of.get(o))
             for o in orders),
            key=lambda f: (f.select is None, -(f.select or 0.0), not f.baseline, rank[f.order]),
        ))
        by_order = {f.order: f for f in finalists}
        deciding = test_iv if test_iv is not None else select_iv
        result = JobResult(
            chosen=by_order[chosen], baseline=by_order[base], finalists=finalists,
            verdict=WITHIN_NOISE if chosen == base else deciding.verdict,
            select_interval=select_iv, test_interval=test_iv, objective=objective.name,
            truth=None if truth is None else truth.name,
            baseline_name=f"{base_name} (target statistics)" if self.engine.norm == "target" and not no_norm
            else base_name,
            reference=reference, reliability=self._reliability(splits.search, objective, found),
            sizes=splits.sizes(), notes=tuple(notes), settings=self._settings(found, splits),
            bank=bank_description(bank), engine_stats=dict(found.engine_stats), n_trials=len(found.trials),
            seconds=time.perf_counter() - start, study=study,
        )
        study.set_user_attr(RESULT_KEY, result.to_dict())
        log.info("%s", result.summary())
        return result

    def _reliability(self, search_es: EvalSet, objective: Any, found: Any) -> dict[str, Any] | None:
        """Spearman correlation of the objective over the best orders between two disjoint
        halves of *search*: how far the ranking of orders is signal rather than noise."""
        n = self.selection.reliability_orders
        if n <= 0:
            return None
        orders = list(dict.fromkeys([self.baseline_order()[0]] + [o for o, _ in found.top(n)]))
        values = []
        for half in search_es.halves():
            engine = self.engine.build(self.bank, half, objective)
            values.append([s.value if s.ok else math.nan for s in engine.evaluate(orders)])
        frame = pd.DataFrame({"a": values[0], "b": values[1]}).dropna()
        with warnings.catch_warnings():  # constant scores: rho is undefined
            warnings.simplefilter("ignore")
            rho = float(frame["a"].corr(frame["b"], method="spearman")) if len(frame) >= 3 else math.nan
        return {"spearman": None if math.isnan(rho) else rho, "n_orders": len(frame), "half_size": len(search_es) // 2}

    def _settings(self, found: Any, splits: Splits) -> dict[str, Any]:
        meta = found.study.user_attrs.get("ordersearch") or {}
        return {
            "searcher": found.searcher, "searcher_config": meta.get("searcher_config"), "space": meta.get("space"),
            "engine": self.engine.to_dict(), "selection": asdict(self.selection), "n_trials": self.n_trials,
            "batch_size": self.batch_size, "seed": self.seed, "study": found.study.study_name,
            "data": self.data.spec if isinstance(self.data, Data) else splits.search.name,
            "data_description": getattr(self.data, "description", None) or {},
            "n_images": self.n_images, "baseline": str(self.baseline_order()[0]),
        }


def _own_bank(bank: Any, baseline: Order | str | None) -> Any:
    """The bank whose source statistics are the baseline's own: a multi-task bank's view for
    the named source order's task (the bank runs task 0's statistics otherwise)."""
    if isinstance(baseline, str) and baseline in (getattr(bank, "source_orders", {}) or {}):
        from ..adapters.compositional import CompositionalNet, task_bank

        if isinstance(getattr(bank, "model", None), CompositionalNet):
            return task_bank(bank, baseline)
    return bank


def _parallel(job: SearchJob) -> None:
    """Run ``job.jobs`` worker processes on the job's study until its budget is met."""
    from joblib import Parallel, delayed

    threads = max(1, (torch.get_num_threads() or 1) // job.jobs)
    solo = replace(job, jobs=1, progress=False, callbacks=())
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(job, stop), daemon=True) if job.progress else None
    if watcher is not None:
        watcher.start()
    try:
        done = Parallel(n_jobs=job.jobs, backend="loky")(delayed(_work)(solo, threads) for _ in range(job.jobs))
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    log.info("%d workers scored %s candidates", job.jobs, "+".join(map(str, done)))


def _work(job: SearchJob, threads: int) -> int:
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return int(job.work().engine_stats["candidates"])


def _watch(job: SearchJob, stop: threading.Event) -> None:
    """A progress bar of the study the workers fill (counted trials against the budget)."""
    from tqdm.auto import tqdm

    from ._study import counts_toward_budget, make_storage

    storage = make_storage(job.storage)
    with tqdm(total=job.n_trials, desc=f"{job.jobs} workers", dynamic_ncols=True) as bar:
        while not stop.wait(1.0):
            try:
                trials = optuna.load_study(study_name=job.study_name, storage=storage).get_trials(deepcopy=False)
            except (KeyError, ValueError):  # not created yet
                continue
            bar.n = min(sum(counts_toward_budget(t) for t in trials), job.n_trials)
            bar.refresh()


def _search_scores(study: optuna.Study) -> dict[Order, float]:
    """Best search score per order over the completed trials."""
    out: dict[Order, float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values and "order" in t.user_attrs and math.isfinite(t.values[0]):
            o = Order.parse(t.user_attrs["order"])
            out[o] = max(out.get(o, -math.inf), t.values[0])
    return out
