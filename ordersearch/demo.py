"""The main job: reorder frozen blocks for a new labelled task and for an unlabelled domain.

``ordersearch demo`` trains two small isometric ResNet banks (the architecture of Zhmoginov
et al., arXiv 2107.10963) on scikit-learn's digits and reorders their frozen blocks, each time
with the engine and a searcher on an Optuna study:

1. **search** (transfer) — a bank trained on plain digits, a new labelled task (a strongly
   shifted digits domain): the ridge ``probe`` objective picks the order whose features suit
   the new data best;
2. **adapt** (multi-source adaptation) — a bank trained by :func:`~ordersearch.train.train_bank`
   on four source domains at once, each with its own learned order of the shared blocks, and an
   unlabelled held-out domain: ``infomax`` with BatchNorm statistics re-estimated on the target
   (``norm="target"``), labels used only to report accuracy. The report sets the unmodified
   ``plain`` model, AdaBN (its order with target statistics), every source order, the chosen
   order and the oracle (the best order by test labels, for reference only) side by side.

Each part is a :class:`~ordersearch.search.SearchJob`: the searcher sees the target's
*search* split only, the finalists are re-scored on its *select* split, and the answer is
judged on its labelled *test* split against the identity order, with a paired bootstrap
interval and a verdict (``improved``, ``within noise`` or ``worse``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as osdata
from .adapters import bank_from_model, load_bank, read_bank_header
from .adapters.isoresnet import data_config as isoresnet_data_config
from .bank import Bank
from .engine import DEFAULT_LABELLED, DEFAULT_UNLABELLED, EngineConfig, get_objective
from .errors import BankError
from .isoresnet import IsoResNet, parse_isoresnet_source
from .report import write_outputs
from .search import JobResult, SearchError, SearchJob, SelectionConfig, held_out, sqlite_url
from .space import OrderSpace
from .spec import write_atomic
from .train import FitConfig, TrainConfig, accuracy, fit_classifier, train_bank

__all__ = ["DemoConfig", "DemoResult", "run_demo", "source_bank", "source_comparison", "sources_bank"]

log = logging.getLogger("ordersearch")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (written resolved to ``<out>/config.json``).

    Args:
        bank: Architecture of the source bank of the transfer part.
        source: Data spec of the source domain that bank is trained on.
        epochs: Training epochs of that bank.
        task: Data spec of the new labelled task (``search`` with ``probe``).
        sources: The multi-source bank's domains, ``name=spec`` separated by ``;`` (its first
            is the unmodified model the adaptation is measured against).
        sources_arch: Block architecture of the multi-source bank.
        sources_blocks: Its number of shared blocks (K).
        sources_depth: The depth of its learned orders (L).
        sources_epochs: Its epochs with soft orders (two more follow with the hardened ones).
        target: Data spec of the unlabelled held-out domain (``adapt`` with ``infomax``).
        searcher: Searcher of both parts.
        trials: Trial budget of the search part's study, identity included.
        adapt_trials: Trial budget of the adapt part's study (its source orders come first).
        batch_size: Orders asked and scored together.
        max_len: Longest order (block reuse allowed up to ``max_repeats``).
        max_repeats: How often one block may run.
        seed: Seed of training, data splits and searchers.
    """

    bank: str = "isoresnet:width=16,blocks=6,classes=10"
    source: str = "digits"
    epochs: int = 15
    task: str = "digits:rotate=60,noise=0.2"
    sources: str = ("plain=digits:n=1000;rot=digits:rotate=30,n=1000;inv=digits:invert,n=1000;"
                    "blur=digits:blur=1.5,n=1000")
    sources_arch: str = "isoresnet:width=16"
    sources_blocks: int = 4
    sources_depth: int = 6
    sources_epochs: int = 12
    target: str = "digits:rotate=45"
    searcher: str = "evolution"
    trials: int = 150
    adapt_trials: int = 100
    batch_size: int = 10
    max_len: int = 8
    max_repeats: int = 2
    seed: int = 0

    def __post_init__(self) -> None:  # before the minutes of training, not after
        for name in ("epochs", "trials", "adapt_trials", "batch_size", "max_len", "max_repeats", "sources_blocks",
                     "sources_depth", "sources_epochs"):
            if getattr(self, name) < 1:
                raise SearchError(f"demo {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        from .adapters.compositional import parse_block_arch

        if parse_block_arch(self.sources_arch).family != "isoresnet":
            raise SearchError(f"demo sources-arch must be isoresnet[:...] (the demo compares with AdaBN, which needs "
                              f"BatchNorm), got {self.sources_arch!r}; train a ViT bank with `ordersearch train "
                              "--set arch=timm:vit_tiny_patch16_224,...` (see studies/multisource_adaptation --family vit)")
        if len(self.source_tasks) < 2:
            raise SearchError(f"demo sources must name at least two domains as name=spec;name=spec, "
                              f"got {self.sources!r}")

    @property
    def source_tasks(self) -> list[str]:
        """The multi-source bank's domains (``name=spec``)."""
        return [t.strip() for t in self.sources.split(";") if t.strip()]

    def check_sources(self) -> None:
        """Read every source domain's data and check the multi-source training settings, so a
        bad ``sources`` spec fails in a second, before any bank is trained."""
        from .data import load

        train = self.sources_training()
        for task in train.tasks:
            load(task.data, train.block_arch.data_config, seed=self.seed)

    def sources_training(self) -> TrainConfig:
        """How the multi-source bank is trained: the paper's soft orders over shared blocks, a
        shared stem and head, BatchNorm statistics per domain and position, on one thread."""
        return TrainConfig.from_dict({
            "tasks": self.source_tasks, "arch": self.sources_arch, "n_blocks": self.sources_blocks,
            "depth": self.sources_depth, "stem": "shared", "head": "shared", "norm": "auto", "mixing": "weights",
            "temperature": {"start": 1.0, "end": 0.01, "shape": "exponential"}, "prune": 0.05,
            "epochs": self.sources_epochs, "harden_epochs": 2, "batch_size": 32, "lr": 1e-2, "order_lr": 0.05,
            "device": "cpu", "seed": self.seed, "threads": 1,
        })


@dataclass
class DemoResult:
    """What the demo found.

    Attributes:
        source_accuracy: The transfer bank's test accuracy on its source domain.
        bank_reused: Both banks came from an earlier run.
        sources: Per source domain of the multi-source bank: its learned order and own test accuracy.
        parts: ``"search"`` and ``"adapt"``: each part's :class:`~ordersearch.search.JobResult`.
        comparison: The adapt part's rows (:func:`source_comparison`).
        files: ``report`` and, per part, its output files (``search/spec``, ...).
    """

    config: DemoConfig
    out: Path
    source_accuracy: float
    bank_reused: bool
    parts: dict[str, JobResult]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)

    @property
    def oracle(self) -> dict[str, Any]:
        """The adapt row of the best order by test accuracy among every order scored (chosen by
        labels: a reference, not a result)."""
        return next(r for r in self.comparison if r["kind"] == "oracle")


def source_bank(config: DemoConfig, out: Path, progress: Progress | None = None) -> tuple[Bank, float, bool]:
    """The demo's source bank in ``out``: trained on ``config.source`` (or reused when a bank
    trained with the same settings is there); returns the bank, its source test accuracy and
    whether it was reused."""
    bank_path = out / "bank.safetensors"
    stamp = out / "bank_training.json"
    arch = parse_isoresnet_source(config.bank)
    # One thread: the weights (and so every figure after) do not depend on the machine's
    # thread count; training this small bank is barely slower on one thread than on two.
    fit = FitConfig(epochs=config.epochs, seed=config.seed, threads=1)
    wanted = {"bank": arch.source(), "source": config.source, "fit": fit.to_dict()}
    reused = _reusable(bank_path, stamp, wanted, "source_test_accuracy", source=arch.source())
    if reused is not None:
        return reused[0], float(reused[1]), True
    torch.manual_seed(config.seed)
    model = IsoResNet(arch)
    src = osdata.load(config.source, isoresnet_data_config(arch), seed=config.seed)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if progress is not None:
            progress(f"train source bank (val acc {metrics.get('val_accuracy', 0):.3f})", epoch + 1, config.epochs)

    fit_classifier(model, *src.train, fit, val=src.val, on_epoch=on_epoch)
    test_acc = accuracy(model, *src.test)
    bank = bank_from_model(model, source=arch.source())
    bank.save(bank_path)
    bank = load_bank(bank_path)
    write_atomic(stamp, json.dumps({"training": wanted, "source_test_accuracy": test_acc}, indent=2) + "\n")
    return bank, test_acc, False


def _reusable(bank_path: Path, stamp: Path, wanted: dict[str, Any], key: str,
              source: str | None = None) -> tuple[Bank, Any] | None:
    """The bank saved at ``bank_path`` and its recorded ``key``, when ``stamp`` says it was
    trained with the ``wanted`` settings (and its header names ``source``, if given); else None."""
    if not (bank_path.exists() and stamp.exists()):
        return None
    try:
        recorded = json.loads(stamp.read_text())
        if recorded.get("training") != wanted or (source is not None
                                                  and read_bank_header(bank_path).get("source") != source):
            return None
        bank, value = load_bank(bank_path), recorded[key]
    except (BankError, json.JSONDecodeError, KeyError):
        log.warning("the saved bank in %s is unusable; training a new one", bank_path)
        return None
    log.info("reusing the bank in %s", bank_path)
    return bank, value


def sources_bank(config: DemoConfig, out: Path,
                 progress: Progress | None = None) -> tuple[Bank, dict[str, dict[str, Any]], bool]:
    """The demo's multi-source bank in ``out/sources`` (trained by
    :func:`~ordersearch.train.train_bank`, resumed when interrupted, reused when a bank trained
    with the same settings is there); returns the bank, per domain its order and own test
    accuracy, and whether it was reused."""
    folder = out / "sources"
    train = config.sources_training()
    stamp = folder / "demo_training.json"
    wanted = train.resolved()
    reused = _reusable(folder / "bank.safetensors", stamp, wanted, "sources")
    if reused is not None:
        return reused[0], reused[1], True

    def on_epoch(stage: str, done: int, total: int) -> None:
        assert progress is not None
        progress(f"train multi-source bank ({stage})", done, total)

    result = train_bank(train, out=folder, progress=on_epoch if progress is not None else None)
    sources = {name: {"order": str(order), "test_accuracy": float(result.metrics[name]["final_test_accuracy"])}
               for name, order in result.orders.items()}
    write_atomic(stamp, json.dumps({"training": wanted, "sources": sources}, indent=2) + "\n")
    return result.bank, sources, False


def source_comparison(job: SearchJob, result: JobResult) -> list[dict[str, Any]]:
    """The adapt part's evidence beside each source order: one row per source order (target
    statistics), the chosen order and the oracle, the best by test accuracy of the source orders
    and the finalists, with the objective on *select* and the accuracy on *test* (labels used
    for this table only)."""
    bank, splits = job.bank, job.splits()
    if splits.test is None or not splits.test.has_labels:
        return []
    objective = get_objective(job.objective)
    select_es = held_out(objective, splits.search, splits.select)
    test_es = held_out(get_objective("head"), splits.search, splits.test)
    named = dict(bank.source_orders)
    # the finalists (chosen and baseline among them) were scored on select and test by the job
    test = {f.order: f.test for f in result.finalists if f.test is not None}
    select = {f.order: f.select for f in result.finalists if f.select is not None}
    missing = [o for o in dict.fromkeys(named.values()) if o not in test]
    test.update((s.order, s.value) for s in job.engine.build(bank, test_es, "head").evaluate(missing) if s.ok)
    select.update((s.order, s.value) for s in job.engine.build(bank, select_es, objective).evaluate(missing) if s.ok)
    orders = list(test)
    rows = [{"kind": "source", "name": name, "order": str(order), "select": select.get(order),
             "test": test.get(order)} for name, order in named.items()]
    rows.append({"kind": "chosen", "name": "chosen", "order": str(result.chosen.order),
                 "select": result.chosen.select, "test": test.get(result.chosen.order)})
    best = max((o for o in orders if o in test), key=lambda o: test[o])
    rows.append({"kind": "oracle", "name": f"oracle (best of {len(test)} source orders and finalists by test labels)",
                 "order": str(best), "select": None, "test": test[best]})
    return [r for r in rows if r["test"] is not None]


def run_demo(config: DemoConfig = DemoConfig(), out: str | Path = "runs/demo", *,
             progress: Progress | None = None) -> DemoResult:
    """Run the demo and write its files to ``out``.

    Args:
        config: Demo settings.
        out: Run folder: the transfer bank (``bank.safetensors``) and the multi-source bank's
            training run (``sources/``), each reused when present and trained with the same
            settings, ``study.db`` (both studies: a rerun resumes them), ``search/`` and
            ``adapt/`` (order spec, trials table, report and plots of each part),
            ``report.md`` and ``config.json``.
        progress: Called with ``(stage, done, total)``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    config.check_sources()
    bank, source_acc, reused = source_bank(config, out, progress)
    multi, sources, multi_reused = sources_bank(config, out, progress)
    storage = sqlite_url(out / "study.db")
    parts: dict[str, JobResult] = {}
    files: dict[str, Path] = {}
    comparison: list[dict[str, Any]] = []
    for name, b, data_spec, objective, norm, budget in (
            ("search", bank, config.task, DEFAULT_LABELLED, "source", config.trials),
            ("adapt", multi, config.target, DEFAULT_UNLABELLED, "target", config.adapt_trials)):
        callbacks = []
        if progress is not None:
            def report(study: Any, trial: Any, name: str = name, data_spec: str = data_spec,
                       objective: str = objective, budget: int = budget) -> None:
                progress(f"{name}: {objective} on {data_spec}", len(study.trials), budget)
            callbacks.append(report)
        space = _space(b, config)
        # split-half reliability on 10 orders, not 30 (it scores them again on both halves of
        # the search split): the demo keeps to 3 minutes of work on 2 cores
        selection = SelectionConfig(reliability_orders=10)
        job = SearchJob(bank=b, data=osdata.load(data_spec, b.data_config, seed=config.seed), selection=selection,
                        objective=objective, searcher=config.searcher, space=space, engine=EngineConfig(norm=norm),
                        n_trials=budget, batch_size=config.batch_size, storage=storage,
                        study_name=f"demo-{name}", seed=config.seed, callbacks=callbacks,
                        baseline=next(iter(b.source_orders), None))
        parts[name] = job.run()
        files.update({f"{name}/{k}": v for k, v in write_outputs(parts[name], out / name, bank=b).items()})
        if name == "adapt":
            comparison = source_comparison(job, parts[name])
    result = DemoResult(config, out, source_acc, reused and multi_reused, parts, time.perf_counter() - start, files,
                        sources, comparison)
    result.files["report"] = write_atomic(out / "report.md", report_text(result, bank))
    return result


def _space(bank: Bank, config: DemoConfig) -> OrderSpace:
    """Lengths up to ``max_len``, each block at most ``max_repeats`` times, widened to hold the
    bank's source orders."""
    wide = OrderSpace.covering(bank.n_blocks, list(bank.source_orders.values()))
    return OrderSpace(bank.n_blocks, max_len=max(config.max_len, wide.max_len or 0),
                      max_repeats=max(config.max_repeats, wide.max_repeats or 0))


def report_text(result: DemoResult, bank: Bank) -> str:
    """The demo's ``report.md``: each part's verdict and its finalists next to its baseline."""
    cfg, s, a = result.config, result.parts["search"], result.parts["adapt"]
    first = next(iter(result.sources), "?")
    lines = [
        "# ordersearch demo",
        "",
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()}, "
        f"{torch.get_num_threads()} threads · torch {torch.__version__} · {result.seconds:.0f} s",
        "",
        f"Searcher `{cfg.searcher}`, {cfg.trials} trials for the search part and {cfg.adapt_trials} for the "
        f"adapt part (the baseline first), batches of "
        f"{cfg.batch_size}, orders up to {cfg.max_len} long with each block at most {cfg.max_repeats} times "
        f"(widened to hold a bank's source orders); seed {cfg.seed}. The searcher sees each target's *search* "
        f"split ({s.sizes['search']} images); the {len(s.finalists) - 1} best orders and the baseline are "
        f"re-scored on its *select* split ({s.sizes['select']}); the answer is judged on its *test* split "
        f"({s.sizes['test']}) with a paired bootstrap interval.",
        "",
        "## 1. Transfer to a new labelled task: `ordersearch search` (objective `probe`)",
        "",
        f"Bank `{bank.source}` trained on `{cfg.source}` for {cfg.epochs} epochs (source test accuracy "
        f"{result.source_accuracy:.3f}). Data `{cfg.task}`. A ridge probe on the pooled features of each order, "
        "fit on half of the search split and scored on the other half (search), on the select split, or on the "
        "test split.",
        "",
        *_part_table(s),
        "",
        f"**{s.summary()}**",
        "",
        "## 2. Multi-source adaptation to an unlabelled domain: `ordersearch adapt` (objective `infomax`, "
        "`norm=target`)",
        "",
        f"Bank trained by `ordersearch train` on {len(result.sources)} source domains at once "
        f"({cfg.sources_blocks} shared `{cfg.sources_arch}` blocks, orders of depth {cfg.sources_depth} learned "
        f"per domain, shared stem and head, statistics per domain): "
        + ", ".join(f"{k} `{v['order']}` (own test accuracy {v['test_accuracy']:.3f})"
                    for k, v in result.sources.items())
        + f". Held-out domain `{cfg.target}`, labels withheld from the search and the selection. BatchNorm "
        "statistics are re-estimated on the scored images for every order prefix (AdaBN per order); the shared "
        f"head is kept. The baseline is the `{first}` model's order with target statistics (AdaBN).",
        "",
        *_part_table(a),
        "",
        f"**{a.summary()}**",
        "",
        *_comparison_table(result),
        "## Cost",
        "",
    ]
    for name, p in (("search", s), ("adapt", a)):
        st = p.engine_stats
        if st.get("block_evals"):
            lines.append(f"- {name}: {p.n_trials} trials; {st['block_evals']:.0f} block forwards over the search "
                         f"split instead of {st['naive_block_evals']:.0f} without the prefix cache "
                         f"({st['naive_block_evals'] / st['block_evals']:.1f}x fewer).")
        else:
            lines.append(f"- {name}: {p.n_trials} trials, all resumed from the study (no new block forwards).")
    lines += [
        "",
        "Files: `search/` and `adapt/` hold each part's `best_order.json` (order spec with its evidence: "
        "`ordersearch show runs/demo/adapt/best_order.json`), `trials.csv`, `report.md` and plots; "
        "`study.db` holds both Optuna studies (a rerun resumes them); `bank.safetensors` is the transfer bank, "
        "`sources/` the multi-source bank's training run (its orders, mixing plots and report).",
        "",
    ]
    return "\n".join(lines)


def _comparison_table(result: DemoResult) -> list[str]:
    """The adapt part's test accuracy of the unmodified model, AdaBN, every source order, the
    chosen order and the oracle."""
    a = result.parts["adapt"]
    if not result.comparison:
        return []
    first = next(iter(result.sources), "?")
    rows = ["| model | order | select (infomax) | test accuracy |", "|---|---|---:|---:|"]
    if a.reference is not None:
        rows.append(f"| unmodified `{first}` model (its own statistics) | `{a.baseline.order}` | — | "
                    f"{a.reference:.3f} |")
    rows.append(f"| AdaBN: `{first}` with target statistics (baseline) | `{a.baseline.order}` | {_f(a.baseline.select)} | "
                f"{_f(a.baseline.test)} |")
    for r in result.comparison:
        label = {"source": f"source order `{r['name']}` (target statistics)",
                 "chosen": "**chosen by the search**"}.get(r["kind"], r["name"])
        rows.append(f"| {label} | `{r['order']}` | "
                    f"{_f(r['select'])} | {r['test']:.3f} |")
    return ["Every source order beside it (test labels used for this table only; the oracle is a reference, "
            "not a result):", "", *rows, ""]


def _part_table(p: JobResult) -> list[str]:
    truth = p.truth or "—"
    rows = [f"| order | depth | search ({p.objective}) | select ({p.objective}) | test ({truth}) |",
            "|---|---:|---:|---:|---:|"]
    for label, f in ((p.baseline_name, p.baseline), ("chosen", p.chosen)):
        rows.append(f"| `{f.order}` ({label}) | {len(f.order)} | {_f(f.search)} | {_f(f.select)} | {_f(f.test)} |")
    return rows


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"
