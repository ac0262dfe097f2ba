"""Searcher benchmark: sample efficiency on an exhaustive order benchmark.

    python benchmarks/searchers.py --build     # train the bank and score every order once (~1-3 min)
    python benchmarks/searchers.py             # run the searchers on the stored table (a few minutes)
    python benchmarks/searchers.py --quick     # 3 seeds, fewer searchers

A small space (K=6 blocks, orders of length 1..6 without repeats: 1,956 orders) is scored
exhaustively once with the engine: an isometric ResNet trained on digits, scored on
``digits:rotate=60,noise=0.2`` by the ridge probe (fit on half of the target's train+val
images, accuracy on the other half: a new labelled dataset). The
scores are stored in ``benchmarks/data/order_benchmark_k6.json.gz`` (orders in the space's
enumeration order; a few KiB). Searchers then run through ``ordersearch.search`` against a
table-lookup engine, so their scores are the true ones and runs are cheap and deterministic.

Reported per searcher (median over seeds): the best true score after N evaluations (the
identity trial included), the number of evaluations until the global optimum was first
proposed, and the distinct prefixes proposed per evaluation (the block forwards an
unlimited prefix cache would run, per trial; the naive cost is the mean depth, about 4.9).
Writes its section of ``benchmarks/RESULTS.md`` between the ``searchers`` markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import optuna  # noqa: E402
from _results import write_section  # noqa: E402  (benchmarks/_results.py)

from ordersearch import Order, OrderSpace  # noqa: E402
from ordersearch.engine import Score, get_objective  # noqa: E402
from ordersearch.search import search  # noqa: E402

TABLE = HERE / "data" / "order_benchmark_k6.json.gz"
MARK_BEGIN, MARK_END = "<!-- searchers:begin -->", "<!-- searchers:end -->"
SPACE = OrderSpace(6, max_len=6, max_repeats=1)
BANK = "isoresnet:width=16,blocks=6,classes=10"
TARGET = "digits:rotate=60,noise=0.2"
OBJECTIVE = "probe"
CHECKPOINTS = (25, 50, 100, 150)

SEARCHERS = {
    "random": ("random", {}),
    "tpe": ("tpe", {}),
    "gp": ("gp", {}),
    "nsga2": ("nsga2", {}),
    "evolution": ("evolution", {}),
    "evolution, late bias 2": ("evolution", {"late_bias": 2.0}),
    "local": ("local", {}),
    "beam (W=4)": ("beam", {"width": 4}),
    "beam (W=8)": ("beam", {"width": 8}),
    "exhaustive": ("exhaustive", {}),
}


# --- building the table ------------------------------------------------------------------


def build(epochs: int, seed: int) -> None:
    from ordersearch import bank_from_model, data
    from ordersearch.engine import Engine
    from ordersearch.isoresnet import IsoResNet, parse_isoresnet_source
    from ordersearch.train import FitConfig, fit_classifier

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    arch = parse_isoresnet_source(BANK)
    model = IsoResNet(arch)
    cfg = {"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.5,)}
    src = data.load("digits", cfg, seed=seed)
    fit_classifier(model, *src.train, FitConfig(epochs=epochs, seed=seed), val=src.val)
    bank = bank_from_model(model, source=arch.source())
    target = data.load(TARGET, bank.data_config, seed=seed).evalset("train+val")
    engine = Engine(bank, target, OBJECTIVE, cache_bytes=2**30)
    orders = list(SPACE.enumerate())
    scores = engine.evaluate(orders)
    doc = {
        "space": SPACE.describe(), "bank": BANK, "train": {"data": "digits", "epochs": epochs, "seed": seed},
        "objective": OBJECTIVE, "data": target.name, "n_val": len(target.val_idx), "n_images": len(target),
        "orders": " ".join(str(o) for o in orders),
        "correct": [round(s.value * len(target.val_idx)) for s in scores],
    }
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(TABLE, "wt") as f:
        json.dump(doc, f)
    print(f"scored {len(orders)} orders in {time.perf_counter() - t0:.0f} s; block forwards "
          f"{engine.stats.block_evals} (naive {engine.stats.naive_block_evals}); wrote {TABLE}")


# --- replaying searches against the table --------------------------------------------------


class TableBank:
    """Just what ``search`` reads from a bank."""

    def __init__(self, doc: dict) -> None:
        self.n_blocks = doc["space"]["n_blocks"]
        self.identity = Order.identity(self.n_blocks)
        self.source, self.adapter, self.path = doc["bank"], "table", None
        self.fingerprint = "table:" + doc["bank"]
        self.source_orders: dict[str, Order] = {}


class TableEngine:
    """Looks scores up; counts distinct prefixes proposed (an unlimited cache's forwards)."""

    def __init__(self, doc: dict) -> None:
        self.n_images = doc["n_images"]
        self.table = {Order.parse(t): c / doc["n_val"] for t, c in zip(doc["orders"].split(), doc["correct"])}
        self.objective = get_objective(doc["objective"])
        self.prefixes: set[tuple[int, ...]] = set()
        self.trace: list[float] = []

    def evaluate(self, orders, *, retain=None, n_images=None):
        out = []
        for o in orders:
            o = Order.parse(o)
            self.prefixes.update(o.ids[:i] for i in range(1, len(o) + 1))
            value = self.table[o]
            self.trace.append(value)
            out.append(Score(o, value, {}, None, self.n_images))
        return out


def run_one(doc: dict, searcher: str, options: dict, seed: int, budget: int) -> dict:
    engine, bank = TableEngine(doc), TableBank(doc)
    search(bank, None, searcher=searcher, searcher_options=options, space=SPACE, n_trials=budget,
           batch_size=8, seed=seed, engine=engine)
    best_so_far = [max(engine.trace[: i + 1]) for i in range(len(engine.trace))]
    optimum = max(engine.table.values())
    hit = next((i + 1 for i, v in enumerate(best_so_far) if v >= optimum), None)
    return {"best": {n: best_so_far[min(n, len(best_so_far)) - 1] for n in CHECKPOINTS if n <= budget},
            "to_optimum": hit, "prefixes_per_eval": len(engine.prefixes) / len(engine.trace)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="(re)build the order table")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=150)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--searchers", help="comma-separated subset of the rows")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    if args.build or not TABLE.exists():
        build(args.epochs, 0)
    with gzip.open(TABLE, "rt") as f:
        doc = json.load(f)
    seeds = range(3 if args.quick else args.seeds)
    rows = {k: v for k, v in SEARCHERS.items() if not args.quick or k in ("random", "tpe", "evolution", "beam (W=4)")}
    if args.searchers:
        rows = {k: v for k, v in SEARCHERS.items() if k in args.searchers.split(",")}
    values = sorted(doc["correct"], reverse=True)
    n = doc["n_val"]
    identity = doc["correct"][list(map(str, SPACE.enumerate())).index("0-1-2-3-4-5")] / n
    results = {}
    t_all = time.perf_counter()
    for label, (name, options) in rows.items():
        t0 = time.perf_counter()
        runs = [run_one(doc, name, options, s, args.budget) for s in seeds]
        results[label] = (runs, time.perf_counter() - t0)
        print(f"{label}: {time.perf_counter() - t0:.1f} s", flush=True)
    lines = _section(doc, results, args, identity, values[0] / n, statistics.median(values) / n, len(values),
                     time.perf_counter() - t_all, len(seeds))
    print("\n".join(lines))
    _write(args.out, lines)


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _section(doc, results, args, identity, optimum, median, n_orders, seconds, n_seeds) -> list[str]:
    cmd = "python benchmarks/searchers.py" + (" --quick" if args.quick else "")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, torch {torch.__version__}, optuna {optuna.__version__}"
    lines = [
        MARK_BEGIN, "## Searchers: sample efficiency on an exhaustive order benchmark", "",
        f"Command: `{cmd}` · machine: {machine} · date: {dt.date.today().isoformat()} · {seconds:.0f} s.", "",
        f"Every order of a K=6 space (lengths 1..6, no repeats: {n_orders:,} orders) was scored once "
        f"(`{doc['bank']}` trained {doc['train']['epochs']} epochs on digits; objective `{doc['objective']}` on "
        f"`{doc['data']}`, {doc['n_images']} images, probe accuracy on {doc['n_val']}) and stored in `benchmarks/data/{TABLE.name}`. "
        f"Global optimum {optimum:.4f}, identity {identity:.4f}, median order {median:.4f}. "
        f"Searchers run through `ordersearch.search` (batches of 8) against the table; medians over {n_seeds} seeds.", "",
        "| searcher | " + " | ".join(f"best @{c}" for c in CHECKPOINTS if c <= args.budget)
        + " | evals to optimum (runs reaching it) | distinct prefixes / eval |",
        "|---|" + "---|" * (sum(c <= args.budget for c in CHECKPOINTS) + 2),
    ]
    for label, (runs, _) in results.items():
        bests = [_med([r["best"].get(c) for r in runs]) for c in CHECKPOINTS if c <= args.budget]
        hits = [r["to_optimum"] for r in runs]
        reached = sum(h is not None for h in hits)
        to_opt = _med(hits)
        cells = [f"{b:.4f}" if b is not None else "—" for b in bests]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {'—' if to_opt is None else f'{to_opt:.0f}'} ({reached}/{len(runs)})"
                     + f" | {_med([r['prefixes_per_eval'] for r in runs]):.2f} |")
    lines += ["", "A searcher that stops early (beam reaching full depth, exhaustive) keeps its last best. "
              "“Distinct prefixes / eval” is the block forwards per trial that an unlimited prefix cache would "
              "run (naive: the mean depth); lower means more sharing.", MARK_END]
    return lines


def _write(path: Path, lines: list[str]) -> None:
    # the section's lines already carry the markers
    write_section(path, MARK_BEGIN, MARK_END, lines[1:-1])


if __name__ == "__main__":
    main()
