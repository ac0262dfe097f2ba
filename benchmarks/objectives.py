"""Validator benchmark: how well does each objective rank orders by the accuracy the user wants?

    python benchmarks/objectives.py            # both settings, 3 seeds (about an hour on 2 cores)
    python benchmarks/objectives.py --quick    # 1 seed, 2 targets per setting, 60 orders
    python benchmarks/objectives.py --report-only   # the report again from the last run's saved rows

A search maximises an objective measured on a few hundred images; what the user wants is
accuracy on images the search never saw. For every target below, a population of distinct
orders (the identity, the bank's source orders, uniform samples of the order space, and the
single-mutation neighbours of the best of those, so the population holds many good orders,
where a validator must discriminate) is scored by every objective on the target's *search*
part and by the truth on its held-out part (the data's val+test splits, never seen by the
objectives). Per objective and target: Spearman and Kendall correlation with the truth, top-1
regret (best truth in the population minus the truth of the objective's argmax) and top-5
regret (best truth minus the best truth among the objective's top 5), in accuracy points, and
the objective's cost per candidate (its scoring time, after the block forwards) relative to
``probe`` in the same run.

Settings:

(a) *unsupervised adaptation*: a compositional bank trained with ``ordersearch.train`` on four
    digits domains (plain, rotated 30 degrees, inverted, blurred), adapted to held-out shifts
    that no source used, single and composite, with BatchNorm statistics re-estimated on the
    target per order (``norm="target"``). Truth: the source head's accuracy on the held-out
    part (target statistics). ``head`` on the labelled search part is listed as a reference
    (it uses labels the unsupervised objectives do not have).
(b) *transfer*: an isometric ResNet trained on digits 0-4 (the demo's recipe) and scored on new
    labelled tasks (the other five classes, and strong shifts of all ten). Truth: a ridge
    probe fitted on the search part and scored on the held-out part.

Each seed retrains the banks and redraws the data splits and the population. Writes its
section of ``benchmarks/RESULTS.md`` between the ``objectives`` markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import optuna  # noqa: E402
from _results import write_section  # noqa: E402  (benchmarks/_results.py)
from scipy import stats  # noqa: E402

from ordersearch import OrderSpace  # noqa: E402
from ordersearch.data import load  # noqa: E402
from ordersearch.demo import DemoConfig, source_bank  # noqa: E402
from ordersearch.engine import Engine, get_objective  # noqa: E402
from ordersearch.evalset import EvalSet  # noqa: E402
from ordersearch.search import held_out, make_splits, neighbours  # noqa: E402
from ordersearch.train import TrainConfig, train_bank  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- objectives:begin -->", "<!-- objectives:end -->"

SOURCES = ["plain=digits:n=1000", "rot=digits:rotate=30,n=1000", "inv=digits:invert,n=1000",
           "blur=digits:blur=1.5,n=1000"]
MULTISOURCE = dict(arch="isoresnet:width=16", n_blocks=4, depth=6, stem="shared", head="shared", norm="auto",
                   mixing="weights", temperature={"start": 1.0, "end": 0.01, "shape": "exponential"}, prune=0.05,
                   epochs=12, harden_epochs=2, batch_size=32, lr=1e-2, order_lr=0.05, device="cpu",
                   checkpoint_every=0)
SHIFTS = ["digits:rotate=45", "digits:blur=2.5", "digits:noise=0.3", "digits:scale=0.7",
          "digits:rotate=30,invert", "digits:rotate=-45,noise=0.2"]
UNSUPERVISED = ["infomax", "entropy", "snd", "bnm", "ensemble:infomax+snd", "ensemble:infomax+bnm",
                "ensemble:snd+bnm", "head"]
TRANSFER_BANK = "isoresnet:width=16,blocks=6,classes=5"
TASKS = ["digits:classes=5-9", "digits:classes=5-9,rotate=60", "digits:rotate=60,noise=0.2", "digits:invert,blur=1"]
LABELLED = ["probe", "knn", "logme", "ensemble:knn+logme"]
REFERENCE = {"head"}  # labelled references in the unsupervised setting: not candidates for its default
#: Never a default whatever it measures: entropy alone is maximised by constant predictions.
NEVER_DEFAULT = {"entropy"}
#: Regret differences (points) below this are ties: within the spread of targets and seeds.
TIE_POINTS = 1.0
#: A default runs on every trial: objectives costing more than this (x probe) lose ties.
CHEAP = 5.0
#: Images per block forward. Larger chunks need fewer passes for target statistics, but a
#: chunk's temporaries above the allocator's 4 MiB threshold are mapped and faulted in anew at
#: every forward, a cost that dominates on these tiny blocks; 192 images of 16x16x16 floats
#: stay under it.
ENGINE_BATCH = 192

log = logging.getLogger("objectives")


@dataclass
class Setting:
    key: str
    title: str
    objectives: list[str]
    targets: list[str]
    truth: str
    norm: str


def population(bank: Any, space: OrderSpace, rng: random.Random, truth_of: Any, n_uniform: int,
               n_total: int) -> dict:
    """Order -> truth for the identity, the source orders, ``n_uniform`` uniform samples and the
    neighbours of the best (by truth) up to ``n_total`` distinct orders."""
    orders = list(dict.fromkeys([bank.identity, *(o for o in bank.source_orders.values() if space.contains(o))]))
    wanted = min(n_total, len(orders) + n_uniform)
    seen = set(orders)
    for _ in range(50 * n_uniform):
        if len(orders) >= wanted:
            break
        o = space.sample(rng)
        if o not in seen:
            seen.add(o)
            orders.append(o)
    truth = truth_of(orders)
    for best in sorted(truth, key=lambda o: -truth[o]):
        if len(truth) >= n_total:
            break
        new = [nb for nb in neighbours(best, space) if nb not in truth][: n_total - len(truth)]
        truth.update(truth_of(new))
    return truth


def score_target(bank: Any, setting: Setting, spec: str, seed: int, n_orders: int) -> dict:
    data = load(spec, bank.data_config, seed=seed)
    splits = make_splits(data, labelled=True, seed=seed)
    held = EvalSet(torch.cat([splits.select.x, splits.test.x]), torch.cat([splits.select.y, splits.test.y]),
                   seed=seed, name="held-out")
    truth_obj = get_objective(setting.truth)
    truth_es = held_out(truth_obj, splits.search, held)
    truth_engine = Engine(bank, truth_es, truth_obj, norm=setting.norm, batch_size=ENGINE_BATCH)

    def truth_of(orders: list) -> dict:
        return {s.order: s.value for s in truth_engine.evaluate(orders) if s.ok}

    space = OrderSpace.covering(bank.n_blocks, list(bank.source_orders.values()), max_len=8, max_repeats=2)
    t0 = time.perf_counter()
    truth = population(bank, space, random.Random(seed), truth_of, n_uniform=int(0.7 * n_orders), n_total=n_orders)
    orders = list(truth)
    engines: dict[str, Engine] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    results = {}
    for name in setting.objectives:
        obj = get_objective(name)
        if obj.output not in engines:
            engines[obj.output] = Engine(bank, splits.search, obj, norm=setting.norm, batch_size=ENGINE_BATCH)
            outputs[obj.output] = [engines[obj.output].outputs(o) for o in orders]
        obj.calibrate(engines[obj.output])
        state = obj.prepare(splits.search)
        outs = outputs[obj.output]
        t1 = time.perf_counter()
        scored = [s for i in range(0, len(outs), 10) for s in obj.score_many(outs[i : i + 10], splits.search, state)]
        seconds = time.perf_counter() - t1
        values = {o: v for o, (v, _) in zip(orders, scored) if torch.isfinite(torch.tensor(v))}
        results[name] = measure(values, truth) | {"seconds_per_candidate": seconds / len(orders)}
    # free the caches before the next target
    for engine in [truth_engine, *engines.values()]:
        engine.clear()
    outputs.clear()
    gc.collect()
    best = max(truth.values())
    log.info("%s seed %d: %d orders, best truth %.3f, identity %.3f (%.0f s)", spec, seed, len(orders), best,
             truth.get(bank.identity, float("nan")), time.perf_counter() - t0)
    return {"target": spec, "seed": seed, "orders": len(orders), "best": best,
            "identity": truth.get(bank.identity), "objectives": results}


def _target(setting: Setting, spec: str, seed: int, n_orders: int, root: str, quick: bool) -> dict:
    """One target in a worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("ordersearch", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    make = multisource_bank if setting.key == "unsupervised" else transfer_bank
    row = score_target(make(seed, Path(root), quick), setting, spec, seed, n_orders)
    return row | {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(values: dict, truth: dict) -> dict:
    common = [o for o in values if o in truth]
    v = [values[o] for o in common]
    t = [truth[o] for o in common]
    best = max(truth.values())
    ranked = sorted(common, key=lambda o: -values[o])
    return {
        "spearman": float(stats.spearmanr(v, t).statistic),
        "kendall": float(stats.kendalltau(v, t).statistic),
        "top1_regret": best - truth[ranked[0]],
        "top5_regret": best - max(truth[o] for o in ranked[:5]),
        "failed": len(truth) - len(common),
    }


def multisource_bank(seed: int, root: Path, quick: bool) -> Any:
    settings = dict(MULTISOURCE, epochs=2, harden_epochs=1) if quick else dict(MULTISOURCE)
    config = TrainConfig.from_dict({"tasks": SOURCES, **settings, "seed": seed})
    return train_bank(config, out=root / f"multisource-seed{seed}", resume=True).bank


def transfer_bank(seed: int, root: Path, quick: bool) -> Any:
    config = DemoConfig(bank=TRANSFER_BANK, source="digits:classes=0-4", epochs=3 if quick else 15, seed=seed)
    bank, _, _ = source_bank(config, root / f"transfer-seed{seed}")
    return bank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 targets per setting, 60 orders (a CI-sized run)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--orders", type=int, help="orders per target (default 220; 60 with --quick)")
    p.add_argument("--work", default="runs/bench-objectives", help="where the banks are trained (reused)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the rows the last full run saved in --work")
    p.add_argument("--jobs", type=int, default=2, help="targets scored at once, one torch thread each (default 2)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("ordersearch", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    n_orders = args.orders or (60 if args.quick else 220)
    if n_orders < 10:
        p.error("--orders must be at least 10")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    root = Path(args.work)
    settings = [
        Setting("unsupervised", "(a) unsupervised adaptation to held-out shifts", UNSUPERVISED,
                SHIFTS[:2] if args.quick else SHIFTS, "head", "target"),
        Setting("transfer", "(b) transfer to new labelled tasks", LABELLED,
                TASKS[:2] if args.quick else TASKS, "probe", "source"),
    ]
    saved = root / ("rows-quick.json" if args.quick else "rows.json")
    if args.report_only:
        if not saved.is_file():
            p.error(f"--report-only: no saved rows at {saved}; run without it first")
        state = json.loads(saved.read_text())
        lines = report(settings, state["rows"], state["seeds"], state["orders"], state["seconds"], args)
        print("\n".join(lines))
        if not args.no_write:
            write_section(HERE / "RESULTS.md", MARK_BEGIN, MARK_END, lines)
        return
    start = time.perf_counter()
    for seed in seeds:  # train (or reuse) every bank first; the workers only load them
        multisource_bank(seed, root, args.quick)
        transfer_bank(seed, root, args.quick)
    work = [(setting, spec, seed) for seed in seeds for setting in settings for spec in setting.targets]
    rows: dict[str, list[dict]] = {s.key: [] for s in settings}
    # targets in worker processes (one torch thread each, so --jobs 2 fills 2 cores); a process
    # per target also gives each target's memory back to the system
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_target, setting, spec, seed, n_orders, str(root), args.quick)
                   for setting, spec, seed in work]
        for (setting, _, _), future in zip(work, futures):
            rows[setting.key].append(future.result())
    seconds = time.perf_counter() - start
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"rows": rows, "seeds": seeds, "orders": n_orders, "seconds": seconds}) + "\n")
    lines = report(settings, rows, seeds, n_orders, seconds, args)
    print("\n".join(lines))
    if not args.no_write:
        write_section(HERE / "RESULTS.md", MARK_BEGIN, MARK_END, lines)


# --- report ------------------------------------------------------------------------------------


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}"


def summary(setting: Setting, rows: list[dict], probe_cost: float) -> list[dict]:
    out = []
    for name in setting.objectives:
        r = [row["objectives"][name] for row in rows]
        out.append({
            "objective": name,
            "spearman": [x["spearman"] for x in r], "kendall": [x["kendall"] for x in r],
            "top1": [100 * x["top1_regret"] for x in r], "top5": [100 * x["top5_regret"] for x in r],
            "cost": statistics.mean(x["seconds_per_candidate"] for x in r) / probe_cost,
            "failed": sum(x["failed"] for x in r),
        })
    return out


def report(settings: list[Setting], rows: dict[str, list[dict]], seeds: list[int], n_orders: int, seconds: float,
           args: argparse.Namespace) -> list[str]:
    cmd = "python benchmarks/objectives.py" + (" --quick" if args.quick else "")
    probe_rows = [row["objectives"]["probe"]["seconds_per_candidate"] for row in rows["transfer"]]
    probe_cost = statistics.mean(probe_rows)
    lines = [
        "## Objectives: which validator ranks orders by held-out accuracy",
        "",
        f"Command: `{cmd}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, torch "
        f"{torch.__version__}, {args.jobs} targets at once on one torch thread each, optuna {optuna.__version__} · date: "
        f"{dt.date.today().isoformat()} · {seconds:.0f} s.",
        "",
        f"Per target and seed, {n_orders} distinct orders (identity, source orders, uniform samples of lengths 1..8 "
        "with each block at most twice, then single-mutation neighbours of the best by truth), each scored by every "
        "objective on the *search* part (the data's train split) and by the truth on the held-out part (val + test "
        f"splits). Seeds {seeds}: each retrains the banks and redraws splits and population. Regrets in accuracy "
        "points; correlations mean ± std over targets x seeds; cost = scoring time per candidate (after the block "
        f"forwards) relative to `probe` on the transfer tasks ({1e3 * probe_cost:.2f} ms per candidate). Peak "
        f"memory of a target's process: {max(r['peak_rss_gb'] for rs in rows.values() for r in rs):.1f} GB.",
    ]
    chosen: dict[str, str] = {}
    for setting in settings:
        summ = summary(setting, rows[setting.key], probe_cost)
        lines += ["", f"### {setting.title}", ""]
        if setting.key == "unsupervised":
            lines.append(f"Bank: `{MULTISOURCE['arch']}`, K={MULTISOURCE['n_blocks']}, trained by `ordersearch.train` "
                         f"on {', '.join(f'`{s}`' for s in SOURCES)} ({MULTISOURCE['epochs']} epochs). Truth: source "
                         "head accuracy with target statistics. `head` is a labelled reference.")
        else:
            lines.append(f"Bank: `{TRANSFER_BANK}` trained on `digits:classes=0-4` (demo recipe). Truth: ridge probe "
                         "fitted on the search part, accuracy on the held-out part.")
        lines += ["", "| objective | Spearman | Kendall | top-1 regret median (mean) | top-5 regret median | "
                  "cost vs probe | failed |", "|---|---|---|---:|---:|---:|---:|"]
        for s in summ:
            lines.append(f"| `{s['objective']}` | {_ms(s['spearman'])} | {_ms(s['kendall'])} | "
                         f"{statistics.median(s['top1']):.1f} ({statistics.mean(s['top1']):.1f}) | "
                         f"{statistics.median(s['top5']):.1f} | {s['cost']:.1f}x | {s['failed']} |")
        # per target: mean top-1 regret over seeds
        names = setting.objectives
        lines += ["", "Top-1 regret per target (mean over seeds; best truth and identity in accuracy %):", "",
                  "| target | best | identity | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|---:|---:|" + "---:|" * len(names)]
        for spec in setting.targets:
            rs = [r for r in rows[setting.key] if r["target"] == spec]
            cells = [f"{statistics.mean(100 * r['objectives'][n]['top1_regret'] for r in rs):.1f}" for n in names]
            ident = [100 * r["identity"] for r in rs if r["identity"] is not None]
            lines.append(f"| `{spec}` | {100 * statistics.mean(r['best'] for r in rs):.1f} | "
                         f"{statistics.mean(ident) if ident else float('nan'):.1f} | " + " | ".join(cells) + " |")
        best, tied = choose_default(summ)
        chosen[setting.key] = best["objective"]
        med, rho = statistics.median(best["top1"]), statistics.mean(best["spearman"])
        if setting.key == "unsupervised":
            met = "met" if rho >= 0.80 and med <= 3.0 else "missed"
            target = "mean Spearman >= 0.80 and median top-1 regret <= 3 points"
        else:
            met = "met" if med <= 2.0 else "missed"
            target = "median top-1 regret <= 2 points"
        lines += ["", f"Default: `{best['objective']}`, median top-1 regret {med:.1f} points (mean "
                  f"{statistics.mean(best['top1']):.1f}), mean Spearman {rho:.2f} (target: {target}: **{met}**). "
                  f"Tied within {TIE_POINTS:.0f} point of the lowest median and mean top-1 regret: "
                  f"{', '.join(f'`{t}`' for t in tied)}; among them the default is the cheapest (cost <= {CHEAP:.0f}x "
                  "probe, no ensemble, which scores 32 extra reference orders per run), then the highest mean "
                  f"Spearman. Never a default: {', '.join(f'`{n}`' for n in sorted(NEVER_DEFAULT))} (constant "
                  "predictions maximise it)."]
    return lines


def choose_default(summ: list[dict]) -> tuple[dict, list[str]]:
    """The default objective of a setting and the objectives tied with the best: ties are
    within TIE_POINTS of the lowest median and of the lowest mean top-1 regret; ties go to
    cheap single objectives, then to the highest mean Spearman."""
    candidates = [s for s in summ if s["objective"] not in REFERENCE | NEVER_DEFAULT]
    low_med = min(statistics.median(s["top1"]) for s in candidates)
    low_mean = min(statistics.mean(s["top1"]) for s in candidates)
    tied = [s for s in candidates if statistics.median(s["top1"]) <= low_med + TIE_POINTS
            and statistics.mean(s["top1"]) <= low_mean + TIE_POINTS]
    best = min(tied, key=lambda s: (s["cost"] > CHEAP, s["objective"].startswith("ensemble"),
                                    -statistics.mean(s["spearman"])))
    return best, [s["objective"] for s in tied]


if __name__ == "__main__":
    main()
