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
Target labels only score. Writes ``RESULTS.md`` and ``figures/`` next to itself.

Run (about 10 minutes on 2 CPU cores)::

    python studies/multisource_adaptation/run.py            # writes RESULTS.md and figures/
    python studies/multisource_adaptation/run.py --quick    # 1 seed, 2 targets, short; report in --out
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
import time
import warnings
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
BASE = dict(
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
def adapt(bank: Any, seed: int, spec: str, out: Path, trials: int) -> dict[str, Any]:
    """Every comparison for one (seed, target) pair."""
    t0 = time.perf_counter()
    names = list(bank.source_orders)
    orders = dict(bank.source_orders)
    distinct = list(dict.fromkeys(orders.values()))
    data = load(spec, bank.data_config, seed=seed)
    storage, tag = sqlite_url(out / "study.db"), spec.split(":", 1)[1]
    common = dict(bank=bank, data=data, engine=ENGINE, seed=seed, baseline=names[0], storage=storage,
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
    acc = {str(s.order): s.value for s in ENGINE.build(bank, test_es, "head").evaluate(candidates) if s.ok}
    by_order = {str(s.order): s.metrics for s in ENGINE.build(bank, splits.select, Several()).evaluate(candidates)
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
        "identity": str(bank.identity), "unmodified": picks["infomax"].reference,
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("matplotlib", "ordersearch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    settings = dict(BASE, epochs=2, harden_epochs=1) if args.quick else dict(BASE)
    seeds = SEEDS[:1] if args.quick else SEEDS
    targets = TARGETS[:2] if args.quick else TARGETS
    trials = 20 if args.quick else EVOLUTION_TRIALS
    start = time.perf_counter()
    trained, records, train_seconds = {}, [], {}
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        if out.exists():  # a fresh run every time: the studies would otherwise resume (and time nothing)
            shutil.rmtree(out)
        config = TrainConfig.from_dict({"tasks": SOURCES, **settings, "seed": seed})
        t0 = time.perf_counter()
        result = train_bank(config, out=out / "bank", resume=False)
        train_seconds[seed] = time.perf_counter() - t0
        log.info("seed %d: trained in %.0f s, orders %s", seed, train_seconds[seed],
                 {k: str(v) for k, v in result.orders.items()})
        trained[seed] = result
        for spec in targets:
            records.append(adapt(result.bank, seed, spec, out, trials))
        (out / "records.json").write_text(json.dumps([r for r in records if r["seed"] == seed], indent=2) + "\n")
    total = time.perf_counter() - start
    # --quick writes its report into --out, never over the committed one
    write_results(trained, records, seeds, targets, train_seconds, total, Path(args.out) if args.quick else HERE)
    print(f"done in {total:.0f} s")


# --- the report -----------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def pm(v: list[float]) -> str:
    """Mean ± standard deviation over seeds, in points."""
    return f"{pct(mean(v))} ± {pct(sd(v))}" if len(v) > 1 else pct(mean(v))


def write_results(trained, records, seeds, targets, train_seconds, total, folder: Path) -> None:
    cfg = trained[seeds[0]].config
    names = [t.split("=", 1)[0] for t in SOURCES]
    by_target = {t: [r for r in records if r["target"] == t] for t in targets}
    n = len(records)
    lines = [
        "# Multi-source adaptation by reordering frozen blocks (digits)",
        "",
        "Written by `.venv/bin/python studies/multisource_adaptation/run.py` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} (ordersearch {ordersearch.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; {total:.0f} s in all, of which {sum(train_seconds.values()):.0f} s training "
        "on one thread).",
        "",
        "## Setup",
        "",
        "Source domains, trained jointly on one bank by `train_bank`: " + ", ".join(f"`{t}`" for t in SOURCES) + ". "
        f"K = {cfg.n_blocks} shared isometric ResNet blocks (`{cfg.arch}`), soft orders of depth "
        f"L = {cfg.resolved_depth}, {cfg.stem} stem and {cfg.head} head, mixing over block {cfg.mixing}, "
        f"BatchNorm statistics per {cfg.resolved_norm} and position; temperature {cfg.temperature.start} → "
        f"{cfg.temperature.end} ({cfg.temperature.shape}) over {cfg.epochs} epochs, weights below {cfg.prune} pruned, "
        f"then {cfg.harden_epochs} epochs with the hardened orders; AdamW lr {cfg.lr} (orders {cfg.order_lr}), batch "
        f"{cfg.batch_size} per domain; seeds {list(seeds)} (seed of training, data splits, shifts, searchers and "
        "bootstrap).",
        "",
        "Targets (held out, unlabelled): " + ", ".join(f"`{t}`" for t in targets) + ". Each target's data is split "
        f"as `SearchJob` does: *search* ({records[0]['sizes']['search']} images, a seeded half of the train split, "
        "what the objectives and searchers see), *select* ({records[0]['sizes']['select']}, where finalists are re-scored) and *test* "
        f"({records[0]['sizes']['test']}, labelled, used only to judge). All orders run with BatchNorm statistics "
        "re-estimated on the scored images (AdaBN per order, `norm=\"target\"`) and the shared head; accuracies in %.",
        "",
        "Rows: **unmodified** = the `plain` model (its order, its own statistics); **AdaBN** = the `plain` order "
        "with target statistics, the baseline of every verdict; **mean source** = the average of the four source "
        "orders with target statistics; **pick by X** = `SearchJob(searcher=\"sources\", objective=X)`: the identity "
        "and the source orders scored on *search*, re-scored on *select*, the best there returned and judged on "
        f"*test* against AdaBN (paired bootstrap, 95%); **evolution** = `SearchJob(searcher=\"evolution\")`, "
        f"{EVOLUTION_TRIALS} trials of `infomax` seeded with the source orders, the same selection and verdict; "
        "**oracle source** / **oracle all** = the best source order / the best of every order scored (about "
        f"{round(mean([r['n_candidates'] for r in records]))} per pair), by test labels: references, not results.",
        "",
        "## Results",
        "",
        "Test accuracy, mean ± standard deviation over the seeds:",
        "",
        "| target | unmodified | AdaBN | mean source | pick by infomax | evolution | oracle source | oracle all |",
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
              "Over all (target, seed) pairs: the chosen order's test accuracy, its gain over AdaBN, the verdicts "
              "(improved / within noise / worse: the 95% interval of the gain on test above zero, around it, below "
              "it), how often the choice was the oracle source order's accuracy, and the objective's Spearman rank "
              "correlation with test accuracy over the identity + source orders and over every order scored (the "
              "objective on the unlabelled *select* images, the accuracy on *test*).", "",
              "| choice | test acc | gain over AdaBN | improved / within noise / worse | = oracle source | "
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
              "| target | seed | unmodified | AdaBN | rot | inv | blur | infomax pick | evolution | verdict "
              "(infomax pick, 95% CI of the gain) | verdict (evolution) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        p, e = r["picks"]["infomax"], r["evolution"]
        lines.append(
            f"| `{r['target']}` | {r['seed']} | {pct(r['unmodified'])} | {pct(r['adabn'])} | "
            + " | ".join(pct(r["target_stats"][k]) for k in names[1:])
            + f" | {pct(p['test'])} ({p['source'] or p['order']}) | {pct(e['test'])} (`{e['order']}`) | "
            f"{p['verdict']} ({100 * p['low']:+.1f}..{100 * p['high']:+.1f}) | {e['verdict']} |")
    lines += ["", *_reading(records, targets), "",
              "![test accuracy per target](figures/accuracy.png)", "",
              "Per-pair records (every scored order's objective values and accuracy) are in `runs/seed*/records.json`, "
              "the Optuna studies with each `SearchJob`'s result in `runs/seed*/study.db`, each bank's training run in "
              "`runs/seed*/bank/` (not committed).", ""]
    (folder / "RESULTS.md").write_text("\n".join(lines))
    _figure(by_target, folder)


def _reading(records: list[dict[str, Any]], targets: list[str]) -> list[str]:
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
    out.append(f"- AdaBN alone moves the `plain` model by {100 * mean(adabn):+.1f} points on average "
               f"(from {pct(mean([r['unmodified'] for r in records]))} to {pct(mean([r['adabn'] for r in records]))}).")
    out.append(f"- Choosing a source order by `infomax` gains {100 * mean(gain):+.1f} points over AdaBN on average; "
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


def _figure(by_target: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "figures").mkdir(exist_ok=True)
    series = {
        "unmodified plain": lambda r: r["unmodified"],
        "AdaBN (plain)": lambda r: r["adabn"],
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
    ax.set_title("Multi-source adaptation by reordering frozen blocks (digits, held-out targets)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(folder / "figures" / "accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
