"""Load benchmark: trials per second against the number of local workers sharing one study,
on SQLite and on PostgreSQL.

    python benchmarks/workers.py                          # SQLite; PostgreSQL too if a URL is given
    python benchmarks/workers.py --postgres postgresql+psycopg://user:pw@127.0.0.1/db
    python benchmarks/workers.py --quick                  # 1 and 2 workers, fewer trials

Every worker is a process running :func:`ordersearch.search.search` (``random`` searcher, the
trial loop as users run it: ask, claim, lease, score, tell) against one study. The objective
is cheap so that the study's storage is what is measured: ``0 ms`` scores instantly (the loop's
own throughput ceiling), ``50 ms`` waits 50 ms per candidate as if a device scored it (the
wait leaves the 2 cores free, so workers could overlap perfectly). Throughput = trials that
count toward the budget / (last tell - first ask across workers); process start-up is not
counted. Each configuration also checks the budget is met exactly.

PostgreSQL defaults to ``$ORDERSEARCH_TEST_POSTGRES_URL`` (set by ``.ci/run``). Writes its
section of ``benchmarks/RESULTS.md`` between the ``workers`` markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import optuna  # noqa: E402
from _results import write_section  # noqa: E402  (benchmarks/_results.py)

MARK_BEGIN, MARK_END = "<!-- workers:begin -->", "<!-- workers:end -->"


class CheapEngine:
    """Stands in for the engine: scores an order in ``cost`` seconds of waiting."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.objective = SimpleNamespace(name="cheap")
        self.dtype, self.norm, self.n_images = "float32", "source", 100
        self.stats = SimpleNamespace(candidates=0)

    def evaluate(self, orders, n_images=None, retain=None):
        time.sleep(self.cost * len(orders))
        self.stats.candidates += len(orders)
        return [SimpleNamespace(ok=True, value=(hash(str(o)) % 1000) / 1000, n_images=100, metrics={}, failed=None)
                for o in orders]


def worker(url: str, study: str, n_trials: int, cost: float, barrier, out) -> None:
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ordersearch.search import search
    from ordersearch.testing import make_problem

    p = make_problem(20, max_len=8, max_repeats=2)
    barrier.wait()
    start = time.time()
    search(p.bank, p.evalset, searcher="random", space=p.space, n_trials=n_trials, batch_size=4, storage=url,
           study_name=study, seed=0, engine=CheapEngine(cost))
    out.put((start, time.time()))


def measure(url: str, n_workers: int, n_trials: int, cost: float) -> dict:
    from ordersearch.search._study import counts_toward_budget

    ctx = mp.get_context("spawn")
    study = f"load-{uuid.uuid4().hex[:8]}"
    barrier, out = ctx.Barrier(n_workers), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, study, n_trials, cost, barrier, out)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"a worker failed (exit {p.exitcode})"
    trials = [t for t in optuna.load_study(study_name=study, storage=url).get_trials() if counts_toward_budget(t)]
    counted, orders = len(trials), [t.user_attrs.get("order") for t in trials]
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"workers": n_workers, "cost_ms": cost * 1000, "trials": counted, "budget": n_trials,
            "repeats": len(orders) - len(set(orders)), "seconds": seconds, "per_second": counted / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--postgres", default=os.environ.get("ORDERSEARCH_TEST_POSTGRES_URL"),
                   help="PostgreSQL URL (default: $ORDERSEARCH_TEST_POSTGRES_URL; none: SQLite only)")
    p.add_argument("--workers", default="1,2,4,8", help="worker counts (1,2,4,8)")
    p.add_argument("--trials", type=int, default=240, help="trial budget per configuration (240)")
    p.add_argument("--work", default="runs/bench-workers", help="folder of the SQLite files and rows.json")
    p.add_argument("--quick", action="store_true", help="1 and 2 workers, 60 trials")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    counts = [1, 2] if args.quick else [int(x) for x in args.workers.split(",")]
    n_trials = 60 if args.quick else args.trials
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    storages = [("SQLite", None)] + ([("PostgreSQL", args.postgres)] if args.postgres else [])
    rows, begin = [], time.time()
    for name, url in storages:
        for cost in (0.0, 0.05):
            for n in counts:
                target = url or f"sqlite:///{work / f'load-{uuid.uuid4().hex[:8]}.db'}"
                row = {"storage": name, **measure(target, n, n_trials, cost)}
                rows.append(row)
                print(f"{name:10s} {row['cost_ms']:4.0f} ms  {n} workers  {row['per_second']:7.1f} trials/s  "
                      f"({row['trials']}/{row['budget']} trials in {row['seconds']:.1f} s, {row['repeats']} repeats)", flush=True)
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    lines = report(rows, time.time() - begin, args, n_trials, bool(args.postgres))
    print("\n".join(lines))
    if not args.no_write:
        write_section(HERE / "RESULTS.md", MARK_BEGIN, MARK_END, lines)


def report(rows: list[dict], seconds: float, args: argparse.Namespace, n_trials: int, postgres: bool) -> list[str]:
    import torch

    cmd = "python benchmarks/workers.py" + (" --quick" if args.quick else "") + (
        " --postgres $ORDERSEARCH_TEST_POSTGRES_URL" if postgres else "")
    lines = [
        "## Workers: trials per second against local workers sharing one study",
        "",
        f"Command: `{cmd}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
        f"torch {torch.__version__}, optuna {optuna.__version__}"
        + (", PostgreSQL on loopback (Debian's package, default settings)" if postgres else "")
        + f" · date: {dt.date.today().isoformat()} · {seconds:.0f} s.",
        "",
        f"`random` searcher, batches of 4, {n_trials} trials per configuration; the objective only waits "
        "(0 or 50 ms per candidate), so the storage and the trial loop are what is measured. "
        "Speed-up is against 1 worker on the same storage and objective in this run.",
        "",
        "| storage | objective | workers | trials/s | speed-up vs 1 worker | budget met | repeated orders |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "yes" if r["trials"] == r["budget"] else f"NO ({r['trials']})"
        base = next(b for b in rows if b["storage"] == r["storage"] and b["cost_ms"] == r["cost_ms"]
                    and b["workers"] == min(x["workers"] for x in rows))
        lines.append(f"| {r['storage']} | {r['cost_ms']:.0f} ms | {r['workers']} | {r['per_second']:.1f} | "
                     f"{r['per_second'] / base['per_second']:.2f}x | "
                     f"{met} | {r['repeats']} |")
    return lines


if __name__ == "__main__":
    main()
