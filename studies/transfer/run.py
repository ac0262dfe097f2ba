"""Transfer by reordering frozen blocks: a new labelled task, at two amounts of labelled data.

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) claim that a bank of frozen residual
blocks transfers to a new task by finding a new order of its blocks. This study trains an
isometric ResNet (6 blocks, width 16) on digits 0-4 and, for two new labelled tasks

- ``digits:classes=5-9``: new classes, same domain;
- ``digits:classes=0-4,rotate=60,noise=0.2``: the source classes in a strongly shifted domain;

and two amounts of labelled training images (10 per class, and the whole train split), compares
on the task's held-out test split (which no choice sees):

- **identity probe**: a ridge probe on the pooled features of the source order;
- **searched order probe**: ``SearchJob`` (``evolution``, ``probe``): orders scored on the train
  images, finalists re-scored on the val images, the chosen order judged on test against the
  identity (paired bootstrap, verdict);
- **stem-only probe**: the probe on the stem's features (an empty order): what the blocks add;
- **random-bank probe**: the probe on the identity order of the same architecture, untrained;
- **fine-tune from the searched order**: the searched order's network, unrolled (a copy of the
  stem and of the block at each position, a new head), trained whole on the same images;
- **fine-tune from the identity**: the same from the source order (the usual transfer recipe);
- **from scratch**: the same architecture trained on the same images from random weights.

Every method sees the same labelled train images (and the val images for its choice); seeds 0, 1,
2. Writes ``RESULTS.md`` and ``figures/`` next to itself.

Run (about 10 minutes on 2 CPU cores)::

    python studies/transfer/run.py            # writes RESULTS.md and figures/
    python studies/transfer/run.py --quick    # 1 seed, one task, short; report in --out
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

import ordersearch
from ordersearch import Order, OrderSpace, SearchJob, SelectionConfig
from ordersearch.adapters import bank_from_model
from ordersearch.adapters.isoresnet import data_config as isoresnet_data_config
from ordersearch.data import load, stratified_split
from ordersearch.engine import Engine, get_objective
from ordersearch.isoresnet import IsoResNet, parse_isoresnet_source
from ordersearch.search import held_out, sqlite_url
from ordersearch.train import FitConfig, accuracy, fit_classifier

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import pm  # noqa: E402

SOURCE = "digits:classes=0-4"
ARCH = "isoresnet:width=16,blocks=6,classes=5"
TASKS = {
    "new classes": "digits:classes=5-9",
    "shifted domain": "digits:classes=0-4,rotate=60,noise=0.2",
}
#: Labelled training images per class (None: the whole train split, about 107 per class).
BUDGETS = (10, None)
SOURCE_EPOCHS = 15
TUNE_EPOCHS = 20  # fine-tuning and training from scratch, on the same images ...
TUNE_STEPS = 340  # ... and at least this many optimiser steps (20 epochs of the whole train split at
#                   batch 32): with 50 images, 20 epochs are 40 steps, after which BatchNorm's running
#                   statistics are still unsettled and every model scored chance (first run)
TUNE_BATCH = 32
TUNE_LR = 3e-3  # fit_classifier's default, for fine-tuning and scratch alike
TRIALS = 100
SEEDS = (0, 1, 2)
METHODS = ("identity probe", "searched order probe", "stem-only probe", "random-bank probe",
           "fine-tune from searched order", "fine-tune from identity", "from scratch")

log = logging.getLogger("transfer")


def source_bank(seed: int) -> tuple[Any, float]:
    """The source bank (trained on digits 0-4 on one thread) and its source test accuracy."""
    arch = parse_isoresnet_source(ARCH)
    torch.manual_seed(seed)
    model = IsoResNet(arch)
    src = load(SOURCE, isoresnet_data_config(arch), seed=seed)
    fit_classifier(model, *src.train, FitConfig(epochs=SOURCE_EPOCHS, seed=seed, threads=1), val=src.val)
    return bank_from_model(model, source=arch.source()), accuracy(model, *src.test)


def budgeted(data: Any, per_class: int | None, seed: int) -> Any:
    """``data`` with its train split cut to ``per_class`` images of each class (seeded)."""
    if per_class is None:
        return data
    x, y = data.train
    share = min(1.0, per_class * data.num_classes / len(y))
    keep, _ = stratified_split(y, len(y), (share, 1 - share), seed)
    return replace(data, train=(x[keep], y[keep]))


def tunable(bank: Any, order: Order, n_classes: int, seed: int) -> nn.Module:
    """The network of ``order`` unrolled into trainable copies (the bank itself stays frozen):
    the stem, one copy of the block at each position, a new linear head on the pooled features.
    A block that runs twice gets two copies: trained tied, its one set of BatchNorm statistics
    would mix both positions' activations, and such models scored chance after fine-tuning
    (as shared statistics do in studies/block_reuse)."""
    parts = [copy.deepcopy(bank.stem)]
    parts += [copy.deepcopy(bank.block_at(k, pos)) for pos, k in enumerate(order)]
    features = copy.deepcopy(bank.features)
    with torch.no_grad():  # the pooled features' width
        width = features(parts[0](torch.zeros(1, *bank.data_config["input_size"]))).shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*parts, features, nn.Linear(width, n_classes))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def run_cell(bank: Any, seed: int, task: str, spec: str, per_class: int | None, out: Path,
             trials: int, tune_epochs: int) -> dict[str, Any]:
    """Every method on one (seed, task, budget)."""
    t0 = time.perf_counter()
    data = budgeted(load(spec, bank.data_config, seed=seed), per_class, seed)
    space = OrderSpace(bank.n_blocks, max_len=8, max_repeats=2)
    tag = f"{task.replace(' ', '-')}-{per_class or 'all'}"
    job = SearchJob(bank=bank, data=data, objective="probe", searcher="evolution", space=space, n_trials=trials,
                    batch_size=10, storage=sqlite_url(out / "study.db"), study_name=tag, seed=seed,
                    selection=SelectionConfig(reliability_orders=0))
    result = job.run()
    splits = job.splits()
    test_es = held_out(get_objective("probe"), splits.search, splits.test)

    def probe(b: Any, order: Order) -> float:
        return Engine(b, test_es, "probe").evaluate([order])[0].value

    torch.manual_seed(seed)
    random_bank = bank_from_model(IsoResNet(parse_isoresnet_source(ARCH)), source=ARCH)
    acc = {
        "identity probe": result.baseline.test,
        "searched order probe": result.chosen.test,
        "stem-only probe": probe(bank, Order([])),
        "random-bank probe": probe(random_bank, random_bank.identity),
    }
    steps = TUNE_STEPS if tune_epochs >= TUNE_EPOCHS else TUNE_STEPS // 4  # --quick: a quarter
    epochs = max(tune_epochs, math.ceil(steps * TUNE_BATCH / len(data.train[1])))
    tuned = {}
    fit = FitConfig(epochs=epochs, batch_size=TUNE_BATCH, lr=TUNE_LR, seed=seed, threads=1)
    for name, start in (("fine-tune from searched order", result.chosen.order),
                        ("fine-tune from identity", bank.identity)):
        model = tunable(bank, start, data.num_classes, seed)
        fit_classifier(model, *data.train, fit)  # no per-epoch val pass: nothing stops early
        acc[name] = accuracy(model, *data.test)
        tuned[name] = str(start)
    torch.manual_seed(seed)
    scratch = IsoResNet(parse_isoresnet_source(ARCH))
    fit_classifier(scratch, *data.train, fit)
    acc["from scratch"] = accuracy(scratch, *data.test)
    iv = result.deciding
    rec = {"seed": seed, "task": task, "spec": spec, "per_class": per_class, "n_train": len(data.train[1]),
           "n_select": result.sizes["select"], "n_test": result.sizes["test"], "accuracy": acc,
           "chosen": str(result.chosen.order), "verdict": result.verdict, "gain": iv.diff, "low": iv.low,
           "high": iv.high, "tuned_orders": tuned, "tune_epochs": epochs, "seconds": time.perf_counter() - t0}
    log.info("seed %d %s (%s/class): %s; searched %s %s (%.0f s)", seed, task, per_class or "all",
             {k: round(v, 3) for k, v in acc.items()}, rec["chosen"], rec["verdict"], rec["seconds"])
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, one task, 30 trials, 8 epochs (smoke test)")
    parser.add_argument("--out", default=str(HERE / "runs"), help="run folders (ignored by git)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("matplotlib", "ordersearch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = SEEDS[:1] if args.quick else SEEDS
    tasks = dict(list(TASKS.items())[:1]) if args.quick else TASKS
    trials, tune_epochs = (30, 8) if args.quick else (TRIALS, TUNE_EPOCHS)
    start = time.perf_counter()
    records, sources = [], {}
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        if out.exists():  # a fresh run: the studies would otherwise resume
            shutil.rmtree(out)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        bank, src_acc = source_bank(seed)
        sources[seed] = {"accuracy": src_acc, "seconds": time.perf_counter() - t0}
        for task, spec in tasks.items():
            for per_class in BUDGETS:
                records.append(run_cell(bank, seed, task, spec, per_class, out, trials, tune_epochs))
        (out / "records.json").write_text(json.dumps([r for r in records if r["seed"] == seed], indent=2) + "\n")
    total = time.perf_counter() - start
    write_results(records, sources, seeds, tasks, total, Path(args.out) if args.quick else HERE)
    print(f"done in {total:.0f} s")


# --- the report -----------------------------------------------------------------------------
def write_results(records, sources, seeds, tasks, total, folder: Path) -> None:
    cells = [(task, b) for task in tasks for b in BUDGETS]
    lines = [
        "# Transfer by reordering frozen blocks (digits)",
        "",
        "Written by `.venv/bin/python studies/transfer/run.py` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} (ordersearch {ordersearch.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU "
        f"cores; {total:.0f} s in all).",
        "",
        "## Setup",
        "",
        f"Source bank `{ARCH}` trained on `{SOURCE}` for {SOURCE_EPOCHS} epochs per seed (AdamW, one thread); its "
        "source test accuracy: " + ", ".join(f"seed {s} {100 * sources[s]['accuracy']:.1f}" for s in seeds) + ". "
        "Tasks: " + ", ".join(f"{k} `{v}`" for k, v in tasks.items()) + ". Budgets: "
        + ", ".join("10 labelled images per class" if b else "the whole train split" for b in BUDGETS)
        + f" (train images, the same for every method; {records[0]['n_select']} val images choose among "
        f"finalists; {records[0]['n_test']} test images judge). Search: `SearchJob(searcher=\"evolution\", "
        f"objective=\"probe\")`, {TRIALS} trials, orders of 1-8 positions with each block at most twice, 10 "
        "finalists + the identity re-scored on val, verdict on test against the identity (paired bootstrap over "
        f"test images, 95%). Fine-tuning and training from scratch: AdamW, batch {TUNE_BATCH}, {TUNE_EPOCHS} epochs "
        f"and at least {TUNE_STEPS} steps (" + ", ".join(sorted({f"{r['tune_epochs']} epochs with {r['n_train']} "
                                                                  "images" for r in records}))
        + "). Probes: "
        "ridge on standardised pooled features, strength chosen by leave-one-out on the train images. Seeds "
        f"{list(seeds)} (seed of the source bank, data splits and subsets, searcher, training). Accuracy in %, "
        "mean ± sd over seeds.",
        "",
        "## Results",
        "",
        "| method | " + " | ".join(f"{t}, {f'{b}/class' if b else 'all'}" for t, b in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for m in METHODS:
        row = []
        for t, b in cells:
            rs = [r for r in records if r["task"] == t and r["per_class"] == b]
            row.append(pm([r["accuracy"][m] for r in rs]))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("| train images | " + " | ".join(
        str(next(r["n_train"] for r in records if r["task"] == t and r["per_class"] == b)) for t, b in cells) + " |")
    lines += ["", "Verdicts of the searched order against the identity (per seed: chosen order, gain on test with "
              "its 95% interval):", ""]
    for t, b in cells:
        rs = [r for r in records if r["task"] == t and r["per_class"] == b]
        lines.append(f"- {t}, {f'{b}/class' if b else 'all'}: " + "; ".join(
            f"seed {r['seed']} `{r['chosen']}` {100 * r['gain']:+.1f} ({100 * r['low']:+.1f}..{100 * r['high']:+.1f}) "
            f"{r['verdict']}" for r in rs))
    lines += ["", *_reading(records, cells), "", "![test accuracy per method](figures/accuracy.png)", "",
              "Per-cell records are in `runs/seed*/records.json`, the Optuna studies with each `SearchJob`'s result "
              "in `runs/seed*/study.db` (not committed).", ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "RESULTS.md").write_text("\n".join(lines))
    _figure(records, cells, folder)


def _diff(records, cells, a: str, b: str) -> list[tuple[str, float, float]]:
    """Per cell: mean over seeds of method a minus method b, and the seeds' sd of that difference."""
    out = []
    for t, bud in cells:
        d = [r["accuracy"][a] - r["accuracy"][b] for r in records if r["task"] == t and r["per_class"] == bud]
        out.append((f"{t}, {f'{bud}/class' if bud else 'all'}", statistics.mean(d),
                    statistics.stdev(d) if len(d) > 1 else math.nan))
    return out


def _say(label: str, diffs: list[tuple[str, float, float]]) -> str:
    parts = []
    for cell, m, s in diffs:
        within = math.isnan(s) or abs(m) <= s
        parts.append(f"{cell} {100 * m:+.1f} (sd {100 * s:.1f}{', within noise' if within else ''})")
    return f"- {label}: " + "; ".join(parts) + "."


def _reading(records, cells) -> list[str]:
    improved = sum(r["verdict"] == "improved" for r in records)
    return [
        "## Reading",
        "",
        "Differences in points, mean over seeds, with the seeds' standard deviation of the difference; a difference "
        "no larger than that is called within noise.",
        "",
        _say("Searched order probe minus identity probe", _diff(records, cells, "searched order probe", "identity probe")),
        f"- The held-out verdict called the searched order `improved` in {improved} of {len(records)} runs.",
        _say("Identity probe minus random-bank probe (what the trained blocks are worth)",
             _diff(records, cells, "identity probe", "random-bank probe")),
        _say("Identity probe minus stem-only probe (what running the blocks adds)",
             _diff(records, cells, "identity probe", "stem-only probe")),
        _say("Fine-tune from the searched order minus fine-tune from the identity",
             _diff(records, cells, "fine-tune from searched order", "fine-tune from identity")),
        _say("Searched order probe minus training from scratch",
             _diff(records, cells, "searched order probe", "from scratch")),
        _say("Fine-tune from the identity minus training from scratch",
             _diff(records, cells, "fine-tune from identity", "from scratch")),
    ]


def _figure(records, cells, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "figures").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        vals = [[100 * r["accuracy"][m] for r in records if r["task"] == t and r["per_class"] == b] for t, b in cells]
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(cells))]
        ax.bar(xs, [statistics.mean(v) for v in vals], width, label=m,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{t}\n{f'{b}/class' if b else 'all'}" for t, b in cells], fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title("Transfer of a digits 0-4 bank by reordering, probing, fine-tuning")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(folder / "figures" / "accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
