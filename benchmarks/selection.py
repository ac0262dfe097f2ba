"""Selection benchmark: does held-out selection of finalists return better orders than the
argmax of the search score, and is the score it reports honest?

    python benchmarks/selection.py            # 4 targets x 3 seeds on the demo bank (~10 min on 2 cores)
    python benchmarks/selection.py --quick    # 2 targets x 2 seeds, fewer trials

The demo's source bank (an isometric ResNet trained on digits, reused from ``runs/demo`` or
trained there) is searched on each target with the demo's settings (``evolution``, lengths
1..8, each block at most twice) through :class:`ordersearch.search.SearchJob`. Afterwards
every order the search scored is also scored on the labelled *test* split with the job's
truth (``probe`` accuracy, or the source head's accuracy for the unsupervised ``infomax``
target) — numbers the job itself never sees. Per run:

- *selection regret*: the best test score among all orders the search scored minus the test
  score of the returned order, for the argmax of the search score and for the order chosen
  on *select* among the finalists;
- *winner's curse*: search minus test score of the argmax; select minus test score of the
  chosen order (how honest the reported score is).

Writes its section of ``benchmarks/RESULTS.md`` between the ``selection`` markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

import ordersearch  # noqa: E402
from ordersearch import EngineConfig, OrderSpace, SearchJob, SelectionConfig  # noqa: E402
from ordersearch.data import load  # noqa: E402
from ordersearch.demo import DemoConfig, source_bank  # noqa: E402
from ordersearch.engine import get_objective  # noqa: E402
from ordersearch.search import held_out  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- selection:begin -->", "<!-- selection:end -->"
# (data spec, objective, norm): the demo's two targets and two more strong shifts
TARGETS = [
    ("digits:rotate=60,noise=0.2", "probe", "source"),
    ("digits:invert,blur=1", "probe", "source"),
    ("digits:scale=0.6,rotate=-40", "probe", "source"),
    ("digits:rotate=30", "infomax", "target"),
]


def run_one(bank, target: str, objective: str, norm: str, seed: int, trials: int, config: DemoConfig) -> dict:
    data = load(target, bank.data_config, seed=config.seed)
    space = OrderSpace(bank.n_blocks, max_len=config.max_len, max_repeats=config.max_repeats)
    engine = EngineConfig(norm=norm)
    job = SearchJob(bank=bank, data=data, objective=objective, searcher=config.searcher, space=space, engine=engine,
                    n_trials=trials, batch_size=config.batch_size, seed=seed,
                    selection=SelectionConfig(reliability_orders=0))
    t0 = time.perf_counter()
    result = job.run()
    seconds = time.perf_counter() - t0
    # every scored order on test, with the truth (never seen by the job)
    splits = job.splits()
    truth = get_objective(result.truth)
    test_es = held_out(truth, splits.search, splits.test)
    done = [t for t in result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    search_score: dict = {}
    for t in done:
        o = ordersearch.Order.parse(t.user_attrs["order"])
        search_score[o] = max(search_score.get(o, -1e9), t.values[0])
    orders = list(search_score)
    test = {s.order: s.value for s in engine.build(bank, test_es, truth).evaluate(orders) if s.ok}
    argmax = max(orders, key=lambda o: (search_score[o], -len(o)))
    best_test = max(test.values())
    chosen = result.chosen
    return {
        "target": target, "objective": objective, "seed": seed, "orders": len(orders), "seconds": seconds,
        "regret_argmax": best_test - test[argmax], "regret_select": best_test - test[chosen.order],
        "curse_argmax": search_score[argmax] - test[argmax], "curse_select": chosen.select - test[chosen.order],
        "search_minus_select": chosen.search - chosen.select, "verdict": result.verdict,
        "summary": result.summary(), "identity_test": test.get(bank.identity), "truth": result.truth,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 targets x 2 seeds, 60 trials (a CI-sized run)")
    p.add_argument("--trials", type=int, help="trials per search (default: the demo's 150; 60 with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", help="searcher seeds (default 0 1 2)")
    p.add_argument("--bank-dir", default="runs/demo", help="where the demo's bank is (trained there if missing)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    config = DemoConfig()
    trials = args.trials or (60 if args.quick else config.trials)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    targets = TARGETS[:2] if args.quick else TARGETS
    start = time.perf_counter()
    bank, source_acc, reused = source_bank(config, Path(args.bank_dir))
    rows = []
    for target, objective, norm in targets:
        for seed in seeds:
            r = run_one(bank, target, objective, norm, seed, trials, config)
            rows.append(r)
            print(f"{target} {objective} seed {seed}: regret argmax {100 * r['regret_argmax']:.1f} pts, select "
                  f"{100 * r['regret_select']:.1f} pts; select-test {100 * r['curse_select']:+.1f} pts; "
                  f"{r['verdict']} ({r['seconds']:.0f} s)", flush=True)
    lines = report(rows, config, trials, seeds, source_acc, reused, time.perf_counter() - start, args)
    print("\n".join(lines))
    if not args.no_write:
        write_section(HERE / "RESULTS.md", MARK_BEGIN, MARK_END, lines)


def _gap(r: dict, key: str) -> str:
    return f"{100 * r[key]:+.1f}" if r["objective"] == r["truth"] else "n/a"


def _pts(v: float) -> str:
    return f"{100 * v:.1f}"


def report(rows: list[dict], config: DemoConfig, trials: int, seeds: list[int], source_acc: float, reused: bool,
           seconds: float, args: argparse.Namespace) -> list[str]:
    cmd = "python benchmarks/selection.py" + (" --quick" if args.quick else "")
    probe_rows = [r for r in rows if r["target"] == TARGETS[0][0]]
    med_a = statistics.median(r["regret_argmax"] for r in probe_rows)
    med_s = statistics.median(r["regret_select"] for r in probe_rows)
    # select and test are on one scale only where the objective is its own truth (probe accuracy); an
    # unsupervised objective (infomax, in nats) cannot be compared with head accuracy
    same_scale = [r for r in rows if r["objective"] == r["truth"]]
    bias = statistics.mean(r["curse_select"] for r in same_scale)
    abs_bias = statistics.mean(abs(r["curse_select"]) for r in same_scale)
    cut = "met" if med_s <= 0.5 * med_a else "missed"
    honest = "met" if abs(bias) <= 0.015 else "missed"
    lines = [
        "## Selection: argmax of the search score vs. held-out selection of finalists",
        "",
        f"Command: `{cmd}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, optuna {optuna.__version__} · date: "
        f"{dt.date.today().isoformat()} · {seconds:.0f} s.",
        "",
        f"Bank: the demo's `{config.bank}` trained on `{config.source}` ({config.epochs} epochs, source test accuracy "
        f"{source_acc:.3f}{', reused' if reused else ''}). Each run: `SearchJob` with `{config.searcher}`, {trials} "
        f"trials, batches of {config.batch_size}, lengths 1..{config.max_len}, each block at most "
        f"{config.max_repeats} times, 10 finalists + identity re-scored on *select*; data split seed {config.seed} "
        f"(search 1078 / select 359 / test 360 images), searcher seeds {seeds}. Afterwards every order the search "
        "scored is scored on *test* with the job's truth (probe accuracy; source-head accuracy for `infomax`). "
        "Regret = best test score among the scored orders minus the returned order's; points of accuracy. "
        "Score minus test is given only where the objective is its own truth (`probe`): an `infomax` score is "
        "not an accuracy.",
        "",
        "| target | objective | seed | orders scored | regret: argmax of search | regret: chosen on select | "
        "search - test (argmax) | select - test (chosen) | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['target']}` | {r['objective']} | {r['seed']} | {r['orders']} | {_pts(r['regret_argmax'])} | "
                     f"{_pts(r['regret_select'])} | {_gap(r, 'curse_argmax')} | {_gap(r, 'curse_select')} | "
                     f"{r['verdict']} |")
    all_a = statistics.median(r["regret_argmax"] for r in rows)
    all_s = statistics.median(r["regret_select"] for r in rows)
    lines += [
        "",
        f"- Demo task `{TARGETS[0][0]}`: median regret {_pts(med_a)} points for the argmax of the search score, "
        f"{_pts(med_s)} for the order chosen on *select* (target: at most half: **{cut}**).",
        f"- All runs: median regret {_pts(all_a)} (argmax) vs. {_pts(all_s)} (select); mean search - test of the "
        f"argmax {100 * statistics.mean(r['curse_argmax'] for r in same_scale):+.1f} points ({len(same_scale)} "
        "`probe` runs).",
        f"- Reported *select* score of the returned order minus its test score ({len(same_scale)} `probe` runs): mean "
        f"{100 * bias:+.1f} points, mean absolute {100 * abs_bias:.1f} (target: within 1.5 points on average: "
        f"**{honest}**).",
    ]
    worse = [r for r in rows if r["regret_select"] > r["regret_argmax"] + 1e-9]
    lines.append(f"- Runs where the order chosen on *select* is worse on test than the argmax of the search score: "
                 f"{len(worse)} of {len(rows)}" + (": " + ", ".join(f"`{r['target']}` {r['objective']} seed {r['seed']} "
                 f"(+{_pts(r['regret_select'] - r['regret_argmax'])} pts regret)" for r in worse) if worse else "") + ".")
    return lines


if __name__ == "__main__":
    main()
