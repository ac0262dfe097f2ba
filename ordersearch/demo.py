"""The main job: a source bank, a new labelled task, an unlabelled shifted domain.

``ordersearch demo`` trains a small isometric ResNet (the architecture of Zhmoginov et al.,
arXiv 2107.10963) on scikit-learn's digits, then reorders its frozen blocks twice, each time
with the engine and a searcher on an Optuna study:

1. **search** — a new labelled task (a strongly shifted digits domain): the ridge ``probe``
   objective picks the order whose features suit the new data best;
2. **adapt** — an unlabelled shifted domain: ``infomax`` with BatchNorm statistics
   re-estimated on the target (``norm="target"``), labels used only to report accuracy.

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
from .engine import DEFAULT_LABELLED, DEFAULT_UNLABELLED, EngineConfig
from .errors import BankError
from .isoresnet import IsoResNet, parse_isoresnet_source
from .report import write_outputs
from .search import JobResult, SearchError, SearchJob, sqlite_url
from .space import OrderSpace
from .spec import write_atomic
from .train import FitConfig, accuracy, fit_classifier

__all__ = ["DemoConfig", "DemoResult", "run_demo", "source_bank"]

log = logging.getLogger("ordersearch")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (written resolved to ``<out>/config.json``).

    Args:
        bank: Architecture of the source bank.
        source: Data spec of the source domain the bank is trained on.
        epochs: Training epochs of the source bank.
        task: Data spec of the new labelled task (``search`` with ``probe``).
        target: Data spec of the unlabelled shifted domain (``adapt`` with ``infomax``).
        searcher: Searcher of both parts.
        trials: Trial budget of each study, identity included.
        batch_size: Orders asked and scored together.
        max_len: Longest order (block reuse allowed up to ``max_repeats``).
        max_repeats: How often one block may run.
        seed: Seed of training, data splits and searchers.
    """

    bank: str = "isoresnet:width=16,blocks=6,classes=10"
    source: str = "digits"
    epochs: int = 15
    task: str = "digits:rotate=60,noise=0.2"
    target: str = "digits:rotate=30"
    searcher: str = "evolution"
    trials: int = 150
    batch_size: int = 10
    max_len: int = 8
    max_repeats: int = 2
    seed: int = 0

    def __post_init__(self) -> None:  # before the minutes of training, not after
        for name in ("epochs", "trials", "batch_size", "max_len", "max_repeats"):
            if getattr(self, name) < 1:
                raise SearchError(f"demo {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class DemoResult:
    """What the demo found.

    Attributes:
        parts: ``"search"`` and ``"adapt"``: each part's :class:`~ordersearch.search.JobResult`.
        files: ``report`` and, per part, its output files (``search/spec``, ...).
    """

    config: DemoConfig
    out: Path
    source_accuracy: float
    bank_reused: bool
    parts: dict[str, JobResult]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


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
    if bank_path.exists() and stamp.exists():
        try:
            recorded = json.loads(stamp.read_text())
            header = read_bank_header(bank_path)
            if recorded.get("training") == wanted and header.get("source") == arch.source():
                bank = load_bank(bank_path)
                log.info("reusing the source bank in %s", bank_path)
                return bank, float(recorded["source_test_accuracy"]), True
        except (BankError, json.JSONDecodeError, KeyError):
            log.warning("the saved bank in %s is unusable; training a new one", bank_path)
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


def run_demo(config: DemoConfig = DemoConfig(), out: str | Path = "runs/demo", *,
             progress: Progress | None = None) -> DemoResult:
    """Run the demo and write its files to ``out``.

    Args:
        config: Demo settings.
        out: Run folder: the bank (reused when present and trained with the same settings),
            ``study.db`` (both studies: a rerun resumes them), ``search/`` and ``adapt/``
            (order spec, trials table, report and plots of each part), ``report.md`` and
            ``config.json``.
        progress: Called with ``(stage, done, total)``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    bank, source_acc, reused = source_bank(config, out, progress)
    space = OrderSpace(bank.n_blocks, max_len=config.max_len, max_repeats=config.max_repeats)
    storage = sqlite_url(out / "study.db")
    parts: dict[str, JobResult] = {}
    files: dict[str, Path] = {}
    for name, data_spec, objective, norm in (("search", config.task, DEFAULT_LABELLED, "source"),
                                              ("adapt", config.target, DEFAULT_UNLABELLED, "target")):
        callbacks = []
        if progress is not None:
            def report(study: Any, trial: Any, name: str = name, data_spec: str = data_spec,
                       objective: str = objective) -> None:
                progress(f"{name}: {objective} on {data_spec}", len(study.trials), config.trials)
            callbacks.append(report)
        job = SearchJob(bank=bank, data=osdata.load(data_spec, bank.data_config, seed=config.seed),
                        objective=objective, searcher=config.searcher, space=space, engine=EngineConfig(norm=norm),
                        n_trials=config.trials, batch_size=config.batch_size, storage=storage,
                        study_name=f"demo-{name}", seed=config.seed, callbacks=callbacks)
        parts[name] = job.run()
        files.update({f"{name}/{k}": v for k, v in write_outputs(parts[name], out / name, bank=bank).items()})
    result = DemoResult(config, out, source_acc, reused, parts, time.perf_counter() - start, files)
    result.files["report"] = write_atomic(out / "report.md", report_text(result, bank))
    return result


def report_text(result: DemoResult, bank: Bank) -> str:
    """The demo's ``report.md``: each part's verdict and its finalists next to the identity."""
    cfg, s, a = result.config, result.parts["search"], result.parts["adapt"]
    lines = [
        "# ordersearch demo",
        "",
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()}, "
        f"{torch.get_num_threads()} threads · torch {torch.__version__} · {result.seconds:.0f} s",
        "",
        f"Source bank `{bank.source}` trained on `{cfg.source}` for {cfg.epochs} epochs (seed {cfg.seed}"
        f"{', reused from an earlier run' if result.bank_reused else ''}): source test accuracy "
        f"{result.source_accuracy:.3f}. Order space: lengths 1..{cfg.max_len}, each of the {bank.n_blocks} "
        f"blocks at most {cfg.max_repeats} times; searcher `{cfg.searcher}`, {cfg.trials} trials per part "
        f"(identity first), batches of {cfg.batch_size}. The searcher sees each target's *search* split "
        f"({s.sizes['search']} images); the {len(s.finalists) - 1} best orders and the identity are re-scored "
        f"on its *select* split ({s.sizes['select']}); the answer is judged on its *test* split "
        f"({s.sizes['test']}) with a paired bootstrap interval.",
        "",
        "## 1. New labelled task: `ordersearch search` (objective `probe`)",
        "",
        f"Data `{cfg.task}`. A ridge probe on the pooled features of each order, fit on half of the "
        "search split and scored on the other half (search), on the select split, or on the test split.",
        "",
        *_part_table(s),
        "",
        f"**{s.summary()}**",
        "",
        "## 2. Unlabelled shifted domain: `ordersearch adapt` (objective `infomax`, `norm=target`)",
        "",
        f"Data `{cfg.target}`, labels withheld from the search and the selection. BatchNorm statistics are "
        "re-estimated on the scored images for every order prefix (AdaBN per order); the source head is kept. "
        "Test labels only judge the result.",
        "",
        *_part_table(a),
        "",
        f"The unmodified source model (identity with its own statistics) scores "
        f"{'—' if a.reference is None else f'{a.reference:.3f}'} accuracy on the test split.",
        "",
        f"**{a.summary()}**",
        "",
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
        "`study.db` holds both Optuna studies (a rerun resumes them); `bank.safetensors` is the source bank.",
        "",
    ]
    return "\n".join(lines)


def _part_table(p: JobResult) -> list[str]:
    truth = p.truth or "—"
    rows = [f"| order | depth | search ({p.objective}) | select ({p.objective}) | test ({truth}) |",
            "|---|---:|---:|---:|---:|"]
    for label, f in ((p.baseline_name, p.baseline), ("chosen", p.chosen)):
        rows.append(f"| `{f.order}` ({label}) | {len(f.order)} | {_f(f.search)} | {_f(f.select)} | {_f(f.test)} |")
    return rows


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"
