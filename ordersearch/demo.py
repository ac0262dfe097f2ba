"""The main job: a source bank, a new labelled task, an unlabelled shifted domain.

``ordersearch demo`` trains a small isometric ResNet (the architecture of Zhmoginov et al.,
arXiv 2107.10963) on scikit-learn's digits, then reorders its frozen blocks twice, each time
with the engine and a searcher on an Optuna study:

1. **search** — a new labelled task (a strongly shifted digits domain): the ridge ``probe``
   objective picks the order whose features suit the new data best;
2. **adapt** — an unlabelled shifted domain: ``infomax`` with BatchNorm statistics
   re-estimated on the target (``norm="target"``), labels used only to report accuracy.

Orders are chosen on the target's train+val images and reported on its held-out test split,
always next to the identity order (the unmodified source model).
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
from .engine import Engine
from .errors import BankError
from .isoresnet import IsoResNet, parse_isoresnet_source
from .report import held_out_scores, split_half_reliability, write_outputs
from .search import search, sqlite_url
from .space import OrderSpace
from .train import FitConfig, accuracy, fit_classifier

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

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


@dataclass
class DemoResult:
    """What the demo found.

    Attributes:
        parts: ``"search"`` and ``"adapt"``: each a dict with the best and identity orders,
            their search scores and held-out test figures, and the output files.
    """

    config: DemoConfig
    out: Path
    source_accuracy: float
    bank_reused: bool
    parts: dict[str, dict[str, Any]]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def _train_or_reuse(config: DemoConfig, out: Path, progress: Callable[[str, int, int], None] | None) -> tuple[Bank, float, bool]:
    bank_path = out / "bank.safetensors"
    stamp = out / "bank_training.json"
    arch = parse_isoresnet_source(config.bank)
    fit = FitConfig(epochs=config.epochs, seed=config.seed)
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
    stamp.write_text(json.dumps({"training": wanted, "source_test_accuracy": test_acc}, indent=2) + "\n")
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
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    bank, source_acc, reused = _train_or_reuse(config, out, progress)
    space = OrderSpace(bank.n_blocks, max_len=config.max_len, max_repeats=config.max_repeats)
    storage = sqlite_url(out / "study.db")
    parts = {
        "search": _part(bank, config, space, storage, out / "search", progress, name="search",
                        data_spec=config.task, objective="probe", norm="source"),
        "adapt": _part(bank, config, space, storage, out / "adapt", progress, name="adapt",
                       data_spec=config.target, objective="infomax", norm="target"),
    }
    result = DemoResult(config, out, source_acc, reused, parts, time.perf_counter() - start)
    result.files["report"] = out / "report.md"
    result.files["report"].write_text(report_text(result, bank))
    return result


def _part(bank: Bank, config: DemoConfig, space: OrderSpace, storage: str, out: Path,
          progress: Progress | None, *, name: str, data_spec: str, objective: str, norm: str) -> dict[str, Any]:
    data = osdata.load(data_spec, bank.data_config, seed=config.seed)
    evalset = data.evalset("train+val", labelled=objective == "probe", seed=config.seed)
    test = data.evalset("test", labelled=True, seed=config.seed)
    engine = Engine(bank, evalset, objective, norm=norm)
    callbacks = []
    if progress is not None:
        def report(study: Any, trial: Any) -> None:
            progress(f"{name}: {objective} on {data_spec}", len(study.trials), config.trials)
        callbacks.append(report)
    result = search(bank, evalset, objective, searcher=config.searcher, space=space, n_trials=config.trials,
                    batch_size=config.batch_size, storage=storage, study_name=f"demo-{name}", seed=config.seed,
                    engine=engine, callbacks=callbacks)
    identity, best = bank.identity, result.best_order
    top = [o for o, _ in result.top(20)]
    reliability = split_half_reliability(bank, evalset, objective, [identity, *top], norm=norm)
    result.study.set_user_attr("reliability", reliability)
    held_out = held_out_scores(bank, test, objective, [identity, best], norm=norm)
    result.study.set_user_attr("held_out", held_out)
    figures = {str(o): held_out["orders"][str(o)] for o in (identity, best)}
    if objective == "probe":
        # the probe is refit on the test split's own halves: features for new labels
        held = {k: {"probe_accuracy": figures[str(o)]["value"]} for k, o in (("identity", identity), ("best", best))}
    else:
        # infomax never saw labels; its side metric is the source head's accuracy
        plain = Engine(bank, test, "head", norm="source").evaluate([identity])[0]
        held = {k: {"accuracy": figures[str(o)]["metrics"].get("accuracy")} for k, o in (("identity", identity), ("best", best))}
        held["identity_source_norm"] = {"accuracy": plain.value}
    files = write_outputs(result.study, out, bank=bank)
    stats = engine.stats
    return {
        "data": data_spec, "objective": objective, "norm": norm, "searcher": config.searcher,
        "identity": str(identity), "identity_depth": len(identity), "best": str(best), "best_depth": len(best),
        "identity_score": result.identity_score, "best_score": result.best_score,
        "held_out": held, "reliability": reliability, "n_trials": len(result.trials),
        "n_test": len(test), "block_evals": stats.block_evals, "naive_block_evals": stats.naive_block_evals,
        "top": [(str(o), s) for o, s in result.top(5)], "files": {k: str(v) for k, v in files.items()},
    }


def report_text(result: DemoResult, bank: Bank) -> str:
    """The demo's ``report.md``: what was found in each part, next to the identity order."""
    cfg, s, a = result.config, result.parts["search"], result.parts["adapt"]
    sh, ah = s["held_out"], a["held_out"]
    gain_s = sh["best"]["probe_accuracy"] - sh["identity"]["probe_accuracy"]
    gain_a = ah["best"]["accuracy"] - ah["identity"]["accuracy"]
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
        f"(identity first), batches of {cfg.batch_size}. Orders are chosen on train+val and "
        "reported on the held-out test split.",
        "",
        "## 1. New labelled task: `ordersearch search` (objective `probe`)",
        "",
        f"Data `{s['data']}`. A ridge probe on the pooled features of each order, fit on one half and "
        "scored on the other; on the test split it is refit on the test split's own halves.",
        "",
        "| order | depth | probe accuracy (search) | probe accuracy (test) |",
        "|---|---:|---:|---:|",
        f"| `{s['identity']}` (identity) | {s['identity_depth']} | {s['identity_score']:.3f} | "
        f"{sh['identity']['probe_accuracy']:.3f} |",
        f"| `{s['best']}` (best) | {s['best_depth']} | {s['best_score']:.3f} | {sh['best']['probe_accuracy']:.3f} |",
        "",
        _finding(gain_s, "probe accuracy", s),
        "",
        "## 2. Unlabelled shifted domain: `ordersearch adapt` (objective `infomax`, `norm=target`)",
        "",
        f"Data `{a['data']}`, labels withheld from the search. BatchNorm statistics are re-estimated "
        "on the target for every order prefix (AdaBN per order); the source head is kept.",
        "",
        "| model | order | infomax (search) | source-head accuracy (test) |",
        "|---|---|---:|---:|",
        f"| unmodified source model | `{a['identity']}` | — | {ah['identity_source_norm']['accuracy']:.3f} |",
        f"| identity, target statistics | `{a['identity']}` | {a['identity_score']:.3f} | "
        f"{ah['identity']['accuracy']:.3f} |",
        f"| searched order, target statistics | `{a['best']}` | {a['best_score']:.3f} | {ah['best']['accuracy']:.3f} |",
        "",
        _finding(gain_a, "accuracy", a),
        "",
        "## Cost",
        "",
    ]
    for name, p in (("search", s), ("adapt", a)):
        saved = p["naive_block_evals"] / max(1, p["block_evals"])
        lines.append(f"- {name}: {p['n_trials']} trials; {p['block_evals']} block forwards over the data "
                     f"instead of {p['naive_block_evals']} without the prefix cache ({saved:.1f}x fewer).")
    lines += [
        "",
        "Files: `search/` and `adapt/` hold each part's `best_order.json` (order spec: "
        "`ordersearch show runs/demo/adapt/best_order.json`), `trials.csv`, `report.md` and plots; "
        "`study.db` holds both Optuna studies (a rerun resumes them); `bank.safetensors` is the source bank.",
        "",
    ]
    return "\n".join(lines)


def _finding(gain: float, what: str, part: dict[str, Any]) -> str:
    rel = part["reliability"].get("spearman")
    rel_text = "n/a" if rel is None else f"{rel:.2f}"
    if part["best"] == part["identity"]:
        return (f"**No order beat the identity** on the search data; split-half reliability of the "
                f"objective (Spearman over the top orders) {rel_text}.")
    verdict = "improved" if gain > 0 else "did not improve"
    images = round(abs(gain) * part["n_test"])
    small = " — a difference this small is within the noise of one test split" if images <= 5 else ""
    return (f"The searched order {verdict} held-out {what} by {gain:+.3f} over the identity "
            f"({images} of {part['n_test']} test images{small}; split-half reliability of the objective "
            f"over the top orders: Spearman {rel_text}).")
