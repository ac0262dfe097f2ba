"""Block reuse: K blocks run deeper, against networks with as many blocks as positions.

Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) note that a bank's blocks can be reused:
an order longer than the bank makes a deeper network at no parameter cost. This study trains,
on one digits task and for three seeds, with ``train_bank`` and the same epochs:

- **3 blocks, depth 3** (``0-1-2``): the K-block network;
- **6 blocks, depth 6** (``0-1-2-3-4-5``): as deep as the reuse orders, twice the block parameters;
- **6 narrow blocks, depth 6**: width 11 instead of 16, about the K-block network's parameters;
- **3 blocks, depth 6** run ``cyclic`` (``0-1-2-0-1-2``), ``paired`` (``0-0-1-1-2-2``) and in a
  **learned** order (a soft order over the 3 blocks at each of 6 positions, hardened), each
  with BatchNorm statistics ``shared`` by a block wherever it runs or kept per ``position``;
- **post-hoc reuse**: the trained 3-block network's blocks reordered deeper *without training*
  (``SearchJob``, ``evolution``, the head's accuracy as objective, orders of up to 6 positions,
  each block at most twice), judged on test against its own order.

It writes ``RESULTS.md`` and ``figures/`` next to itself: test accuracy (mean ± sd over seeds)
and parameter count of each network.

Run (about 10 minutes on 2 CPU cores)::

    python studies/block_reuse/run.py            # writes RESULTS.md and figures/
    python studies/block_reuse/run.py --quick    # 1 seed, 2 epochs; report in --out
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

import ordersearch
from ordersearch import OrderSpace, SearchJob, SelectionConfig
from ordersearch.data import load
from ordersearch.search import sqlite_url
from ordersearch.train import TrainConfig, train_bank

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import n_params, pm  # noqa: E402

#: A task hard enough that depth could matter: on digits:rotate=30,noise=0.2 (1078 train images)
#: every network here reached 98-99% and no difference could show (first run of this study).
TASK = "digits:rotate=45,noise=0.4,n=600"
COMMON = dict(arch="isoresnet:width=16", stem="task", head="task", batch_size=32, lr=1e-2, device="cpu",
              checkpoint_every=0, threads=1)
EPOCHS = 14  # every network: fixed orders train all 14; the learned order 12 soft + 2 hardened
NETWORKS: dict[str, dict[str, Any]] = {
    "3 blocks, depth 3 (0-1-2)": dict(n_blocks=3, order="0-1-2", norm="shared"),
    "6 blocks, depth 6 (0-1-2-3-4-5)": dict(n_blocks=6, order="0-1-2-3-4-5", norm="shared"),
    "6 narrow blocks (width 11), depth 6": dict(n_blocks=6, order="0-1-2-3-4-5", norm="shared",
                                                arch="isoresnet:width=11"),
    "3 blocks cyclic 0-1-2-0-1-2, shared statistics": dict(n_blocks=3, order="0-1-2-0-1-2", norm="shared"),
    "3 blocks cyclic 0-1-2-0-1-2, per-position statistics": dict(n_blocks=3, order="0-1-2-0-1-2", norm="position"),
    "3 blocks paired 0-0-1-1-2-2, shared statistics": dict(n_blocks=3, order="0-0-1-1-2-2", norm="shared"),
    "3 blocks paired 0-0-1-1-2-2, per-position statistics": dict(n_blocks=3, order="0-0-1-1-2-2", norm="position"),
    "3 blocks, learned order of depth 6, shared statistics": dict(n_blocks=3, depth=6, norm="shared"),
    "3 blocks, learned order of depth 6, per-position statistics": dict(n_blocks=3, depth=6, norm="position"),
}
LEARNED = dict(mixing="weights", temperature={"start": 1.0, "end": 0.01, "shape": "exponential"}, prune=0.05,
               epochs=EPOCHS - 2, harden_epochs=2, order_lr=0.05)
POST_HOC_TRIALS = 60
SEEDS = (0, 1, 2)

log = logging.getLogger("block_reuse")


def run_seed(seed: int, out: Path, epochs: int, trials: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"seed": seed, "accuracy": {}, "params": {}, "orders": {}, "seconds": {}}
    first = None
    for name, settings in NETWORKS.items():
        t0 = time.perf_counter()
        extra = dict(LEARNED, epochs=max(1, epochs - 2)) if "order" not in settings else dict(epochs=epochs,
                                                                                              harden_epochs=0)
        config = TrainConfig.from_dict({"tasks": [f"task={TASK}"], **COMMON, **extra, **settings, "seed": seed})
        r = train_bank(config, out=out / name.split(",")[0].replace(" ", "_") / str(len(rec["accuracy"])),
                       resume=False)
        rec["accuracy"][name] = r.metrics["task"]["final_test_accuracy"]
        rec["params"][name] = n_params(r.bank)
        rec["orders"][name] = str(r.orders["task"])
        rec["seconds"][name] = time.perf_counter() - t0
        log.info("seed %d %s: %s %.3f (%d params, %.0f s)", seed, name, rec["orders"][name],
                 rec["accuracy"][name], rec["params"][name], rec["seconds"][name])
        first = first or r
    # post-hoc: the 3-block network's blocks run deeper without training
    bank = first.bank
    data = load(TASK, bank.data_config, seed=seed)
    job = SearchJob(bank=bank, data=data, objective="head", searcher="evolution", n_trials=trials, batch_size=10,
                    space=OrderSpace(bank.n_blocks, max_len=6, max_repeats=2), storage=sqlite_url(out / "study.db"),
                    study_name="post-hoc", seed=seed, selection=SelectionConfig(reliability_orders=0))
    result = job.run()
    iv = result.deciding
    rec["post_hoc"] = {"order": str(result.chosen.order), "test": result.chosen.test, "baseline": result.baseline.test,
                       "verdict": result.verdict, "gain": iv.diff, "low": iv.low, "high": iv.high}
    log.info("seed %d post-hoc: %s", seed, result.summary())
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 20 trials (smoke test)")
    parser.add_argument("--out", default=str(HERE / "runs"), help="run folders (ignored by git)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("matplotlib", "ordersearch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = SEEDS[:1] if args.quick else SEEDS
    epochs, trials = (3, 20) if args.quick else (EPOCHS, POST_HOC_TRIALS)
    start = time.perf_counter()
    records = []
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        records.append(run_seed(seed, out, epochs, trials))
        (out / "record.json").write_text(json.dumps(records[-1], indent=2) + "\n")
    total = time.perf_counter() - start
    write_results(records, seeds, epochs, total, Path(args.out) if args.quick else HERE)
    print(f"done in {total:.0f} s")


def write_results(records, seeds, epochs, total, folder: Path) -> None:
    names = list(NETWORKS)
    acc = {n: [r["accuracy"][n] for r in records] for n in names}
    base = names[0]
    lines = [
        "# Block reuse: K blocks run deeper (digits)",
        "",
        "Written by `.venv/bin/python studies/block_reuse/run.py` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} (ordersearch {ordersearch.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU "
        f"cores, training on one thread; {total:.0f} s in all).",
        "",
        "## Setup",
        "",
        f"Task `{TASK}` (digits rotated 45° with strong noise, 600 images: 360 train, 120 val, 120 test; on "
        "`digits:rotate=30,noise=0.2` with all images every network reached 98-99%). Every network is "
        f"trained by `train_bank` for {epochs} epochs (AdamW lr {COMMON['lr']}, cosine, batch {COMMON['batch_size']}; "
        f"learned orders: {epochs - 2} epochs of soft orders, temperature 1 → 0.01, then 2 with the hardened "
        "order), isometric ResNet blocks of width 16 unless stated, its own stem and head. **shared statistics**: "
        "a block keeps one set of BatchNorm statistics wherever it runs; **per-position**: one set per position "
        "(the affine parameters stay the block's). Seeds " + str(list(seeds)) + " (initialisation, batches, data "
        "split and shift). Test accuracy in %, mean ± sd over seeds; the last column is the difference to the "
        "3-block network per seed, called within noise when no larger than its sd.",
        "",
        "## Results",
        "",
        "| network | parameters | test accuracy | minus 3 blocks, depth 3 | orders (per seed) |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        d = [a - b for a, b in zip(acc[n], acc[base])]
        noise = len(d) > 1 and abs(statistics.mean(d)) <= statistics.stdev(d)
        diff = "" if n == base else f"{100 * statistics.mean(d):+.1f}" + (" (within noise)" if noise else "")
        orders = ", ".join(f"`{r['orders'][n]}`" for r in records)
        lines.append(f"| {n} | {records[0]['params'][n]:,} | {pm(acc[n])} | {diff} | {orders} |")
    ph = [r["post_hoc"] for r in records]
    lines += [
        "",
        f"Post-hoc reuse (no training): the 3-block network's blocks reordered by `SearchJob` (evolution, "
        f"{POST_HOC_TRIALS} trials, objective = the head's accuracy on the train images, finalists re-scored on val, "
        "judged on test against `0-1-2`): " + "; ".join(
            f"seed {r['seed']} `{p['order']}` {100 * p['test']:.1f} vs {100 * p['baseline']:.1f}, "
            f"{100 * p['gain']:+.1f} ({100 * p['low']:+.1f}..{100 * p['high']:+.1f}) {p['verdict']}"
            for r, p in zip(records, ph)) + ".",
        "",
        *_reading(acc, records, names),
        "",
        "![test accuracy per network](figures/accuracy.png)",
        "",
        "Each network's training run (bank, order spec, report) is under `runs/seed*/` (not committed).",
        "",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "RESULTS.md").write_text("\n".join(lines))
    _figure(acc, records, names, folder)


def _reading(acc, records, names) -> list[str]:
    def diff(a: str, b: str) -> str:
        d = [x - y for x, y in zip(acc[a], acc[b])]
        m = statistics.mean(d)
        s = statistics.stdev(d) if len(d) > 1 else float("nan")
        return f"{100 * m:+.1f} (sd {100 * s:.1f}{', within noise' if not s == s or abs(m) <= s else ''})"

    best_reuse = max(names[3:], key=lambda n: statistics.mean(acc[n]))
    shared = [n for n in names if n.endswith("shared statistics")]
    position = [n for n in names if n.endswith("per-position statistics")]
    pos_minus_shared = [statistics.mean(acc[p]) - statistics.mean(acc[s]) for s, p in zip(shared, position)]
    return [
        "## Reading",
        "",
        f"- Deeper by reuse: the best 3-block depth-6 network ({best_reuse}) minus the 3-block depth-3 network: "
        f"{diff(best_reuse, names[0])}; minus the 6-block network with twice the block parameters: "
        f"{diff(best_reuse, names[1])}; minus the parameter-matched narrow 6-block network: "
        f"{diff(best_reuse, names[2])}.",
        "- Per-position minus shared statistics, for cyclic, paired and learned orders: "
        + ", ".join(f"{100 * x:+.1f}" for x in pos_minus_shared) + " points (means over seeds).",
        f"- Post-hoc reuse without training was `improved` in {sum(r['post_hoc']['verdict'] == 'improved' for r in records)}"
        f" of {len(records)} seeds.",
        "- One test image is 0.83 points.",
    ]


def _figure(acc, records, names, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "figures").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in names:
        xs = [r["params"][n] / 1000 for r in records]
        ax.errorbar(statistics.mean(xs), 100 * statistics.mean(acc[n]),
                    yerr=100 * statistics.stdev(acc[n]) if len(acc[n]) > 1 else 0, fmt="o", capsize=3, label=n)
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title(f"Block reuse on {TASK}")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "figures" / "accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
