"""Multi-source adaptation: choose or evolve a source order for an unlabelled held-out domain.

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) train one bank of K shared blocks on several
source domains, each with its own computation order, and adapt to an unlabelled target domain by
choosing among (or recombining) the frozen source orders with an unsupervised objective. This
study trains such a bank (``train_bank``: shared stem and head, BatchNorm statistics per domain
and position) on four digits domains (plain, rotated 30°, inverted, blurred) for each seed, then
for eight held-out target shifts (three of them composite) compares on the target's labelled
test split, which no choice ever sees:

- the unmodified ``plain`` model (its order with its own statistics);
- AdaBN: the ``plain`` order with statistics re-estimated on the target (the baseline of every
  verdict below), and every other source order the same way;
- the source order each unsupervised objective (``infomax``, ``bnm``, ``snd``, ``entropy``)
  chooses: a ``SearchJob`` with the ``sources`` searcher, its finalists re-scored on the
  target's *select* split, judged against AdaBN with a paired bootstrap interval and a verdict;
- orders searched by aging ``evolution`` (``infomax``, seeded with the source orders), through
  the same held-out selection and verdict;
- the oracle: the best source order, and the best of every scored order, by test labels
  (a reference, never a result).

It also reports each objective's rank correlation with test accuracy over every order scored.
Target labels only score.

The study runs on two block families: the isometric ResNet (``isoresnet``, BatchNorm: its report
is ``RESULTS.md`` and ``figures/`` next to this file) and timm's Vision Transformer blocks
(``vit``: ViT-Tiny's block layout narrowed to width 96, patch 4 at 16 px, trained from scratch by
the same ``train_bank``; LayerNorm keeps no statistics, so AdaBN does not apply and the
unmodified ``plain`` model is the baseline: ``vit/RESULTS.md`` and ``vit/figures/``). Each family
also writes a ``summary.json`` that the other's report puts beside its own.

Run (measured on 2 CPU cores: isoresnet 19-28 minutes, vit 14-19, as the machine's speed varied;
over the studies' 15-minute aim, hence --quick)::

    python studies/multisource_adaptation/run.py                   # both families, both reports
    python studies/multisource_adaptation/run.py --family vit      # one family, its report
    python studies/multisource_adaptation/run.py --quick           # 1 seed, 2 targets, short; report in --out
"""

from __future__ import annotations

import argparse
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

import ordersearch
from ordersearch import EngineConfig, Order, SearchJob, SelectionConfig
from ordersearch.adapters.compositional import task_bank
from ordersearch.data import load
from ordersearch.engine import Engine, Objective, get_objective
from ordersearch.search import held_out, sqlite_url
from ordersearch.train import TrainConfig, train_bank

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import n_params  # noqa: E402

N = 1000  # images per source domain over train/val/test (600 train); n=600 left `inv` near chance
SOURCES = [
    f"plain=digits:n={N}",
    f"rot=digits:rotate=30,n={N}",
    f"inv=digits:invert,n={N}",
    f"blur=digits:blur=1.5,n={N}",
]
#: Held-out target shifts (all of digits: 1078 search, 360 select and 359 test images). The
#: digits splits are nested: no target test image was a training image of any source domain.
TARGETS = [
    "digits:rotate=45",
    "digits:rotate=30,invert",
    "digits:blur=2.5",
    "digits:noise=0.3",
    "digits:thin=1",
    "digits:rotate=45,blur=1",
    "digits:invert,noise=0.2",
    "digits:rotate=-30,contrast=0.5",
]
ISORESNET = dict(
    arch="isoresnet:width=16",
    n_blocks=4,
    depth=6,
    stem="shared",
    head="shared",  # domains as tasks: one head, so any order can be read by it
    norm="auto",  # resolves to per-task-and-position statistics for several tasks
    mixing="weights",
    temperature={"start": 1.0, "end": 0.01, "shape": "exponential"},
    prune=0.05,
    epochs=12,
    harden_epochs=2,
    batch_size=32,
    lr=1e-2,
    order_lr=0.05,
    device="cpu",
    checkpoint_every=0,
    threads=1,  # the same bank on any machine (the searches are thread-invariant)
)
#: ViT-Tiny's block (3 heads, MLP ratio 4, timm's Block) at width 96 instead of 192, which costs
#: as much per image as the isoresnet block here (192 costs 3.4 times more). A ViT trained from
#: scratch on 600 images per domain needs more epochs, a lower learning rate and a warm-up: 2
#: epochs at lr 1e-3 stayed at chance; 20 at 2e-3 without warm-up reached 83-93% on the source
#: domains for seeds 0 and 2 but stayed at 28-51% for seed 1 (12 epochs at chance; the first full
#: run, 1117 s, is in the commit history); 2 warm-up epochs brought seed 1 to 92-95%.
VIT = dict(ISORESNET, arch="timm:vit_tiny_patch16_224,width=96", epochs=20, lr=2e-3, warmup_epochs=2,
           weight_decay=0.05)
OBJECTIVES = ("infomax", "bnm", "snd", "entropy")
EVOLUTION_TRIALS = 60  # the baseline and the source orders included
#: Target images the objectives and searchers see: a seeded half of the search split (1078),
#: which halves the study's time (the objectives' split-half reliability stays high; see RESULTS).
SEARCH_IMAGES = 540
BATCH = 10
#: Images per block forward: the whole split in one chunk, so target statistics take one pass per
#: block (measured afterwards: no faster than the default chunks of 64 on this bank, whose three
#: cache-resident passes beat one memory-bound one; kept so the committed figures reproduce).
ENGINE = EngineConfig(norm="target", batch_size=2048)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Family:
    """What differs between the block families: training, engine, report folder and words."""

    name: str
    train: dict[str, Any]
    engine: EngineConfig
    folder: Path  # where its committed report goes
    blocks: str  # "isometric ResNet blocks", ...
    norm: str  # how its blocks normalise, for the report
    base: str  # the verdicts' baseline, as a column label
    base_short: str  # the same, beside the other family's


FAMILIES = {
    "isoresnet": Family("isoresnet", ISORESNET, ENGINE, HERE, "isometric ResNet blocks",
                        "BatchNorm statistics per task and position; every order runs with statistics re-estimated "
                        "on the scored images (AdaBN per order, `norm=\"target\"`)", "AdaBN", "AdaBN"),
    "vit": Family("vit", VIT, EngineConfig(norm="source", batch_size=2048), HERE / "vit",
                  "timm Vision Transformer blocks", "LayerNorm, which keeps no statistics: nothing is re-estimated "
                  "(`norm=\"source\"`), AdaBN does not apply and the unmodified `plain` model is the baseline",
                  "baseline (= unmodified)", "= unmodified"),
}

log = logging.getLogger("multisource")


# --- statistics ---------------------------------------------------------------------------
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined."""
    if len(a) < 3:
        return math.nan
    with warnings.catch_warnings():  # constant input: undefined, NaN
        warnings.simplefilter("ignore")
        return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def mean(v: list[float]) -> float:
    v = [x for x in v if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def sd(v: list[float]) -> float:
    v = [x for x in v if x is not None and not math.isnan(x)]
    return statistics.stdev(v) if len(v) > 1 else math.nan


# --- one target -----------------------------------------------------------------------------
def adapt(bank: Any, seed: int, spec: str, out: Path, trials: int, engine: EngineConfig) -> dict[str, Any]:
    """Every comparison for one (seed, target) pair."""
    t0 = time.perf_counter()
    names = list(bank.source_orders)
    orders = dict(bank.source_orders)
    distinct = list(dict.fromkeys(orders.values()))
    data = load(spec, bank.data_config, seed=seed)
    storage, tag = sqlite_url(out / "study.db"), spec.split(":", 1)[1]
    common = dict(bank=bank, data=data, engine=engine, seed=seed, baseline=names[0], storage=storage,
                  batch_size=BATCH, n_images=SEARCH_IMAGES, selection=SelectionConfig(reliability_orders=0))
    picks = {obj: SearchJob(objective=obj, searcher="sources", n_trials=len(distinct) + 1,
                            study_name=f"sources-{obj}-{tag}", **common).run() for obj in OBJECTIVES}
    evolved = SearchJob(objective="infomax", searcher="evolution", n_trials=trials, study_name=f"evolution-{tag}",
                        **common).run()
    t_search = time.perf_counter() - t0

    # every order scored (identity, sources, evolution's): each objective on the unlabelled
    # *select* images (none of them chose it there), the accuracy on *test*
    splits = SearchJob(objective="infomax", **common).splits()
    scored = [Order.parse(t.user_attrs["order"]) for t in evolved.study.trials if "order" in t.user_attrs]
    candidates = list(dict.fromkeys([bank.identity, *distinct, *scored]))
    test_es = held_out(get_objective("head"), splits.search, splits.test)
    acc = {str(s.order): s.value for s in engine.build(bank, test_es, "head").evaluate(candidates) if s.ok}
    by_order = {str(s.order): s.metrics for s in engine.build(bank, splits.select, Several()).evaluate(candidates)
                if s.ok}
    values = {obj: {k: m[obj] for k, m in by_order.items()} for obj in OBJECTIVES}
    own = {k: Engine(task_bank(bank, k), test_es, "head", norm="source", batch_size=2048).evaluate([orders[k]])[0].value
           for k in names}
    src_keys = list(dict.fromkeys([str(bank.identity), *(str(o) for o in distinct)]))

    def rho(obj: str, keys: list[str]) -> float:
        keys = [k for k in keys if k in values[obj] and k in acc]
        return spearman([values[obj][k] for k in keys], [acc[k] for k in keys])

    oracle = max(names, key=lambda k: acc[str(orders[k])])
    rec = {
        "target": spec, "seed": seed, "sizes": evolved.sizes, "orders": {k: str(v) for k, v in orders.items()},
        "identity": str(bank.identity),
        # the unmodified model: the job measures it when it re-estimates statistics, else it is the baseline
        "unmodified": picks["infomax"].reference if engine.norm == "target" else acc[str(orders[names[0]])],
        "adabn": acc[str(orders[names[0]])], "own_stats": own,
        "target_stats": {k: acc[str(orders[k])] for k in names}, "identity_target_stats": acc[str(bank.identity)],
        "picks": {obj: _job_record(r, orders) for obj, r in picks.items()},
        "evolution": _job_record(evolved, orders),
        "oracle": oracle, "oracle_acc": acc[str(orders[oracle])],
        "oracle_all": max(acc, key=acc.get), "oracle_all_acc": max(acc.values()),
        "spearman_sources": {obj: rho(obj, src_keys) for obj in OBJECTIVES},
        "spearman_all": {obj: rho(obj, list(acc)) for obj in OBJECTIVES},
        "n_candidates": len(acc), "accuracy": acc, "values": values,
        "seconds_search": t_search, "seconds": time.perf_counter() - t0,
    }
    log.info("seed %d %s: adabn %.3f, infomax pick %s %.3f (%s), evolution %s %.3f (%s), oracle %s %.3f (%.0f s)",
             seed, spec, rec["adabn"], rec["picks"]["infomax"]["order"], rec["picks"]["infomax"]["test"],
             rec["picks"]["infomax"]["verdict"], rec["evolution"]["order"], rec["evolution"]["test"],
             rec["evolution"]["verdict"], oracle, rec["oracle_acc"], rec["seconds"])
    return rec


class Several(Objective):
    """Every objective of :data:`OBJECTIVES` from one pass of block forwards: the value is the
    first's, the metrics hold each one's."""

    name = "several"
    output = "logits"

    def __init__(self) -> None:
        self.parts = [get_objective(o) for o in OBJECTIVES]

    def prepare(self, evalset: Any) -> list[Any]:
        return [o.prepare(evalset) for o in self.parts]

    def score(self, outputs: torch.Tensor, evalset: Any, state: list[Any]) -> tuple[float, dict[str, float]]:
        values = {o.name: o.score(outputs, evalset, st)[0] for o, st in zip(self.parts, state)}
        return values[OBJECTIVES[0]], values


def _job_record(result: Any, orders: dict[str, Order]) -> dict[str, Any]:
    iv = result.deciding
    chosen = result.chosen.order
    return {"order": str(chosen), "source": next((k for k, o in orders.items() if o == chosen), None),
            "test": result.chosen.test, "baseline_test": result.baseline.test, "verdict": result.verdict,
            "gain": iv.diff, "low": iv.low, "high": iv.high, "select": result.chosen.select}


# --- main -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 targets, 2+1 epochs, 20 trials (smoke test)")
    parser.add_argument("--out", default=str(HERE / "runs"), help="run folders (ignored by git)")
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both",
                        help="block family: isoresnet, vit or both (default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("matplotlib", "ordersearch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    runs = [run_family(FAMILIES[name], args.quick, Path(args.out))
            for name in (FAMILIES if args.family == "both" else [args.family])]
    for run in runs:  # every summary first, so each report shows the others' of this run
        write_summary(*run)
    for run in runs:
        write_results(*run)


def run_family(fam: Family, quick: bool, runs: Path) -> tuple[Any, ...]:
    """Train and adapt one block family; what its summary and report are written from."""
    settings = dict(fam.train, epochs=2, harden_epochs=1) if quick else dict(fam.train)
    seeds = SEEDS[:1] if quick else SEEDS
    targets = TARGETS[:2] if quick else TARGETS
    trials = 20 if quick else EVOLUTION_TRIALS
    folders = {name: report_folder(f, quick, runs) for name, f in FAMILIES.items()}
    runs = runs / fam.name if fam.name != "isoresnet" else runs
    start = time.perf_counter()
    trained, records, train_seconds = {}, [], {}
    for seed in seeds:
        out = runs / f"seed{seed}"
        if out.exists():  # a fresh run every time: the studies would otherwise resume (and time nothing)
            shutil.rmtree(out)
        config = TrainConfig.from_dict({"tasks": SOURCES, **settings, "seed": seed})
        t0 = time.perf_counter()
        result = train_bank(config, out=out / "bank", resume=False)
        train_seconds[seed] = time.perf_counter() - t0
        log.info("%s seed %d: trained in %.0f s, orders %s", fam.name, seed, train_seconds[seed],
                 {k: str(v) for k, v in result.orders.items()})
        trained[seed] = result
        for spec in targets:
            records.append(adapt(result.bank, seed, spec, out, trials, fam.engine))
        (out / "records.json").write_text(json.dumps([r for r in records if r["seed"] == seed], indent=2) + "\n")
    total = time.perf_counter() - start
    folders[fam.name].mkdir(parents=True, exist_ok=True)
    print(f"{fam.name}: done in {total:.0f} s")
    return fam, trained, records, seeds, targets, train_seconds, total, folders


def report_folder(fam: Family, quick: bool, runs: Path) -> Path:
    """Where a family's report goes: next to this file, or (--quick) into the run folders,
    never over the committed one."""
    if not quick:
        return fam.folder
    return runs / fam.name if fam.name != "isoresnet" else runs


# --- the report -----------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def pm(v: list[float]) -> str:
    """Mean ± standard deviation over seeds, in points."""
    return f"{pct(mean(v))} ± {pct(sd(v))}" if len(v) > 1 else pct(mean(v))


def write_results(fam: Family, trained, records, seeds, targets, train_seconds, total,
                  folders: dict[str, Path]) -> None:
    folder = folders[fam.name]
    cfg = trained[seeds[0]].config
    base = fam.base
    names = [t.split("=", 1)[0] for t in SOURCES]
    by_target = {t: [r for r in records if r["target"] == t] for t in targets}
    n = len(records)
    lines = [
        f"# Multi-source adaptation by reordering frozen blocks (digits, {fam.blocks})",
        "",
        f"Written by `.venv/bin/python studies/multisource_adaptation/run.py --family {fam.name}` (or without "
        "`--family`: both families) on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} (ordersearch {ordersearch.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; {total:.0f} s in all, of which {sum(train_seconds.values()):.0f} s training "
        "on one thread).",
        "",
        "## Setup",
        "",
        "Source domains, trained jointly on one bank by `train_bank`: " + ", ".join(f"`{t}`" for t in SOURCES) + ". "
        f"K = {cfg.n_blocks} shared {fam.blocks} (`{cfg.arch}`), soft orders of depth "
        f"L = {cfg.resolved_depth}, {cfg.stem} stem and {cfg.head} head, mixing over block {cfg.mixing}; "
        f"temperature {cfg.temperature.start} → "
        f"{cfg.temperature.end} ({cfg.temperature.shape}) over {cfg.epochs} epochs, weights below {cfg.prune} pruned, "
        f"then {cfg.harden_epochs} epochs with the hardened orders; AdamW lr {cfg.lr} (orders {cfg.order_lr}, weight "
        f"decay {cfg.weight_decay}), batch "
        f"{cfg.batch_size} per domain; seeds {list(seeds)} (seed of training, data splits, shifts, searchers and "
        "bootstrap).",
        "",
        "Targets (held out, unlabelled): " + ", ".join(f"`{t}`" for t in targets) + ". Each target's data is split "
        f"as `SearchJob` does: *search* ({records[0]['sizes']['search']} images, a seeded half of the train split, "
        f"what the objectives and searchers see), *select* ({records[0]['sizes']['select']}, where finalists are "
        f"re-scored) and *test* ({records[0]['sizes']['test']}, labelled, used only to judge). Blocks normalise "
        f"with {fam.norm}. All orders are read by the shared head; accuracies in %.",
        "",
        "Rows: **unmodified** = the `plain` model (its order" + (", its own statistics" if fam.name == "isoresnet" else "")
        + "); "
        + ("**AdaBN** = the `plain` order with target statistics, the baseline of every verdict; **mean source** = "
           "the average of the four source orders with target statistics; " if fam.name == "isoresnet" else
           f"**{base}** = the same model (nothing to re-estimate), the baseline of every verdict; **mean source** = "
           "the average of the four source orders; ")
        + "**pick by X** = `SearchJob(searcher=\"sources\", objective=X)`: the identity "
        "and the source orders scored on *search*, re-scored on *select*, the best there returned and judged on "
        f"*test* against the {base} (paired bootstrap, 95%); **evolution** = `SearchJob(searcher=\"evolution\")`, "
        f"{EVOLUTION_TRIALS} trials of `infomax` seeded with the source orders, the same selection and verdict; "
        "**oracle source** / **oracle all** = the best source order / the best of every order scored (about "
        f"{round(mean([r['n_candidates'] for r in records]))} per pair), by test labels: references, not results.",
        "",
        "## Results",
        "",
        "Test accuracy, mean ± standard deviation over the seeds:",
        "",
        f"| target | unmodified | {base} | mean source | pick by infomax | evolution | oracle source | oracle all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, rs in by_target.items():
        lines.append(
            f"| `{t}` | {pm([r['unmodified'] for r in rs])} | {pm([r['adabn'] for r in rs])} | "
            f"{pm([mean(list(r['target_stats'].values())) for r in rs])} | "
            f"{pm([r['picks']['infomax']['test'] for r in rs])} | {pm([r['evolution']['test'] for r in rs])} | "
            f"{pm([r['oracle_acc'] for r in rs])} | {pm([r['oracle_all_acc'] for r in rs])} |")
    lines.append(
        f"| **all {n} pairs** | {pct(mean([r['unmodified'] for r in records]))} | "
        f"{pct(mean([r['adabn'] for r in records]))} | "
        f"{pct(mean([mean(list(r['target_stats'].values())) for r in records]))} | "
        f"{pct(mean([r['picks']['infomax']['test'] for r in records]))} | "
        f"{pct(mean([r['evolution']['test'] for r in records]))} | {pct(mean([r['oracle_acc'] for r in records]))} | "
        f"{pct(mean([r['oracle_all_acc'] for r in records]))} |")

    # --- each objective's choice
    lines += ["", "### Which objective chooses the source order", "",
              f"Over all (target, seed) pairs: the chosen order's test accuracy, its gain over the {base}, the verdicts "
              "(improved / within noise / worse: the 95% interval of the gain on test above zero, around it, below "
              "it), how often the choice was the oracle source order's accuracy, and the objective's Spearman rank "
              "correlation with test accuracy over the identity + source orders and over every order scored (the "
              "objective on the unlabelled *select* images, the accuracy on *test*).", "",
              f"| choice | test acc | gain over {base} | improved / within noise / worse | = oracle source | "
              "regret vs oracle source | Spearman (sources) | Spearman (all) |",
              "|---|---|---|---|---|---|---|---|"]
    for obj in [*OBJECTIVES, "evolution"]:
        recs = [r["evolution"] if obj == "evolution" else r["picks"][obj] for r in records]
        verdicts = [sum(x["verdict"] == v for x in recs) for v in ("improved", "within noise", "worse")]
        hits = sum(x["test"] >= r["oracle_acc"] - 1e-9 for x, r in zip(recs, records))
        regret = [r["oracle_acc"] - x["test"] for x, r in zip(recs, records)]
        src_rho = "" if obj == "evolution" else f"{mean([r['spearman_sources'][obj] for r in records]):+.2f}"
        all_rho = "" if obj == "evolution" else f"{mean([r['spearman_all'][obj] for r in records]):+.2f}"
        label = "evolution (infomax)" if obj == "evolution" else f"pick by {obj}"
        lines.append(f"| {label} | {pct(mean([x['test'] for x in recs]))} | "
                     f"{100 * mean([x['test'] - x['baseline_test'] for x in recs]):+.1f} | "
                     f"{' / '.join(map(str, verdicts))} | {hits} of {n} | {100 * mean(regret):.1f} | {src_rho} | {all_rho} |")

    # --- per seed, the banks
    lines += ["", "### The banks", ""]
    for seed in seeds:
        r = trained[seed]
        lines.append(f"- seed {seed} ({train_seconds[seed]:.0f} s): " + ", ".join(
            f"{k} `{r.orders[k]}` {pct(r.metrics[k]['final_test_accuracy'])}" for k in names)
            + " (source test accuracy of each domain with its own order and statistics).")

    # --- per pair
    lines += ["", "### Every pair", "",
              f"| target | seed | unmodified | {base} | rot | inv | blur | infomax pick | evolution | verdict "
              "(infomax pick, 95% CI of the gain) | verdict (evolution) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        p, e = r["picks"]["infomax"], r["evolution"]
        lines.append(
            f"| `{r['target']}` | {r['seed']} | {pct(r['unmodified'])} | {pct(r['adabn'])} | "
            + " | ".join(pct(r["target_stats"][k]) for k in names[1:])
            + f" | {pct(p['test'])} ({p['source'] or p['order']}) | {pct(e['test'])} (`{e['order']}`) | "
            f"{p['verdict']} ({100 * p['low']:+.1f}..{100 * p['high']:+.1f}) | {e['verdict']} |")
    runs = "runs/seed*" if fam.name == "isoresnet" else f"runs/{fam.name}/seed*"
    lines += ["", *_reading(fam, records, targets), "", *_beside(fam, folders), "",
              "![test accuracy per target](figures/accuracy.png)", "",
              f"Per-pair records (every scored order's objective values and accuracy) are in `{runs}/records.json`, "
              f"the Optuna studies with each `SearchJob`'s result in `{runs}/study.db`, each bank's training run in "
              f"`{runs}/bank/` (under `studies/multisource_adaptation/`, not committed).", ""]
    (folder / "RESULTS.md").write_text("\n".join(lines))
    _figure(fam, by_target, folder)


def _reading(fam: Family, records: list[dict[str, Any]], targets: list[str]) -> list[str]:
    """Plain-words findings computed from the records (written by the script, not by hand)."""
    n = len(records)
    pick = [r["picks"]["infomax"] for r in records]
    gain = [p["test"] - p["baseline_test"] for p in pick]
    improved = sum(p["verdict"] == "improved" for p in pick)
    worse = sum(p["verdict"] == "worse" for p in pick)
    adabn = [r["adabn"] - r["unmodified"] for r in records]
    evo = [r["evolution"]["test"] - p["test"] for r, p in zip(records, pick)]
    seed_sd = mean([sd([r["evolution"]["test"] - r["picks"]["infomax"]["test"] for r in records if r["target"] == t])
                    for t in targets])
    best_obj = max(OBJECTIVES, key=lambda o: mean([r["spearman_all"][o] for r in records]))
    ident = sum(p["order"] == records[0]["identity"] for p in pick)
    out = ["## Reading", ""]
    if fam.name == "isoresnet":
        out.append(f"- AdaBN alone moves the `plain` model by {100 * mean(adabn):+.1f} points on average (from "
                   f"{pct(mean([r['unmodified'] for r in records]))} to {pct(mean([r['adabn'] for r in records]))}).")
    else:
        out.append("- LayerNorm keeps no statistics: there is no AdaBN to compare with, and every gain below is over "
                   f"the unmodified `plain` model ({pct(mean([r['unmodified'] for r in records]))} on average).")
    out.append(f"- Choosing a source order by `infomax` gains {100 * mean(gain):+.1f} points over the {fam.base} on average; "
               f"the held-out verdict is `improved` in {improved} of {n} pairs and `worse` in {worse}; the rest are "
               f"within noise and reported as such. The choice was the identity order in {ident} of {n} pairs.")
    out.append(f"- Evolving new orders from the source orders changes the test accuracy by {100 * mean(evo):+.1f} "
               f"points against the infomax pick (mean over pairs; the seeds' spread of that difference per target "
               f"is {100 * seed_sd:.1f} points), "
               + ("so it is within noise." if abs(mean(evo)) <= seed_sd or math.isnan(seed_sd) else
                  "beyond the seeds' spread."))
    out.append(f"- Of the objectives, `{best_obj}` ranks orders closest to their test accuracy (mean Spearman "
               f"{mean([r['spearman_all'][best_obj] for r in records]):+.2f} over every scored order).")
    hard = [t for t in targets if mean([r["oracle_acc"] for r in records if r["target"] == t]) < 0.6]
    if hard:
        out.append("- Where no source domain is close to the target, reordering has little to choose from: the "
                   "oracle source order stays below 60% on " + ", ".join(f"`{t}`" for t in hard) + ".")
    out.append("- One test image is 0.28 points; a difference smaller than the seeds' standard deviation is within noise.")
    return out


def write_summary(fam: Family, trained, records, seeds, targets, train_seconds, total,
                  folders: dict[str, Path]) -> None:
    """This family's headline figures, as ``summary.json`` in its report folder."""
    pick = [r["picks"]["infomax"] for r in records]
    summary = {
        "family": fam.name, "blocks": fam.blocks, "arch": trained[seeds[0]].config.arch, "seeds": list(seeds),
        "pairs": len(records), "params": n_params(trained[seeds[0]].bank),
        "source_accuracy": mean([m["final_test_accuracy"] for t in trained.values() for m in t.metrics.values()]),
        "unmodified": mean([r["unmodified"] for r in records]), "baseline": mean([r["adabn"] for r in records]),
        "baseline_name": fam.base_short, "mean_source": mean([mean(list(r["target_stats"].values())) for r in records]),
        "infomax_pick": mean([p["test"] for p in pick]),
        "verdicts": [sum(p["verdict"] == v for p in pick) for v in ("improved", "within noise", "worse")],
        "evolution": mean([r["evolution"]["test"] for r in records]),
        "oracle_source": mean([r["oracle_acc"] for r in records]), "seconds": round(total),
    }
    (folders[fam.name] / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _beside(fam: Family, folders: dict[str, Path]) -> list[str]:
    """A table of this family's summary beside every other family's found in its report folder
    (written by this run, or by that family's own last run)."""
    rows = [json.loads(p.read_text()) for p in (folders[name] / "summary.json" for name in FAMILIES) if p.is_file()]
    if len(rows) < 2:
        return []
    out = ["## Beside the other block family", "",
           "All pairs, test accuracy in % (each family's figures from its own run of this script, read from its "
           "`summary.json`: " + ", ".join(f"{r['family']} on seeds {r['seeds']}, {r['pairs']} pairs" for r in rows)
           + "):", "",
           "| blocks | weights | source domains (own order) | unmodified | baseline of the verdicts | mean source | "
           "pick by infomax | improved / within noise / worse | evolution | oracle source |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['blocks']} (`{r['arch']}`) | {r['params'] / 1000:.0f}k | {pct(r['source_accuracy'])} | "
                   f"{pct(r['unmodified'])} | {pct(r['baseline'])} ({r['baseline_name']}) | {pct(r['mean_source'])} | "
                   f"{pct(r['infomax_pick'])} | {' / '.join(map(str, r['verdicts']))} | {pct(r['evolution'])} | "
                   f"{pct(r['oracle_source'])} |")
    return out


def _figure(fam: Family, by_target: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "figures").mkdir(exist_ok=True)
    series = {
        "unmodified plain": lambda r: r["unmodified"],
        **({"AdaBN (plain)": lambda r: r["adabn"]} if fam.name == "isoresnet" else {}),
        "pick by infomax": lambda r: r["picks"]["infomax"]["test"],
        "evolution": lambda r: r["evolution"]["test"],
        "oracle source": lambda r: r["oracle_acc"],
    }
    targets = list(by_target)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(series)
    for i, (label, get) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(targets))]
        vals = [[100 * get(r) for r in by_target[t]] for t in targets]
        ax.bar(xs, [statistics.mean(v) for v in vals], width, label=label,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels([t.split(":", 1)[1] for t in targets], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title(f"Multi-source adaptation by reordering frozen {fam.blocks} (digits, held-out targets)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(folder / "figures" / "accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
