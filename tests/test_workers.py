"""Several workers, one study: budget met exactly, few repeats, every worker's answer the best
of all trials, a killed worker's trials taken over, schema and study creation races; on SQLite
and on a real PostgreSQL (``postgres_url``, see conftest), and through the command line
(``--jobs`` and ``ordersearch worker``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ordersearch.search._study import counts_toward_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: One worker process: ``url name n_trials searcher barrier n_workers slow``. All workers run
#: the same command (seed 0), as a user starting it N times would.
WORKER = """
import sys, time, torch, optuna
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
from ordersearch.testing import make_problem
url, name, n, searcher, barrier, n_workers, slow = sys.argv[1:8]
p = make_problem(60)
engine = p.engine()
import os, pathlib
held = pathlib.Path(barrier).parent / "held"
if slow == "1":  # the kill tests: one worker (HANG_AT set) stops inside a batch, the others wait for it
    evaluate, calls, hang_at = engine.evaluate, [], int(os.environ.get("HANG_AT", "0"))
    def gated(*a, **k):
        calls.append(1)
        if len(calls) == hang_at:  # the trials of this batch are asked and leased: killed here
            held.write_text(str(os.getpid()))
            time.sleep(3600)
        deadline = time.monotonic() + 120
        while not hang_at and not held.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return evaluate(*a, **k)
    engine.evaluate = gated
if os.environ.get("AFTER_HELD"):  # start once the first worker holds the baseline
    while not held.exists():
        time.sleep(0.01)
# start together: the first worker up could otherwise take every trial
pathlib.Path(barrier, str(os.getpid())).touch()
deadline = time.monotonic() + 120
while len(os.listdir(barrier)) < int(n_workers) and time.monotonic() < deadline:
    time.sleep(0.01)
result = p.run(lambda: searcher, n_trials=int(n), batch_size=3, storage=url, study_name=name, seed=0, engine=engine)
print("candidates", int(result.engine_stats["candidates"]), "best", repr(result.best_score))
"""


def _start(url: str, name: str, n: int, searcher: str, barrier: Path, n_workers: int = 3,
           slow: bool = False, env: list[dict[str, str]] | None = None) -> list[subprocess.Popen]:
    barrier.mkdir(exist_ok=True)
    args = [url, name, str(n), searcher, str(barrier), str(n_workers), "1" if slow else "0"]
    env = env or [{}] * n_workers
    return [subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env[i]})
            for i in range(n_workers)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, float]]:
    out = []
    for p in procs:
        stdout, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        words = stdout.split()
        out.append((int(words[words.index("candidates") + 1]), float(words[words.index("best") + 1])))
    return out


def _check(url: str, name: str, n: int, results: list[tuple[int, float]]) -> None:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == n, f"{len(counted)} trials count toward a budget of {n}"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    orders = [t.user_attrs["order"] for t in counted]
    repeats = len(orders) - len(set(orders))
    assert repeats <= 0.05 * n, f"{repeats} repeated orders among {n}"
    assert sum(bool(t.user_attrs.get("baseline")) for t in counted) == 1
    best = max(t.values[0] for t in counted if t.state == TrialState.COMPLETE)
    for candidates, found in results:  # each worker waited for the others: its answer covers all trials
        assert candidates > 0, f"a worker scored nothing: {results}"
        assert found == best


def _cooperate(url: str, tmp_path: Path, searcher: str) -> None:
    """Three workers start together on a fresh database: schema, study and identity races."""
    procs = _start(url, "shared", 24, searcher, tmp_path / "barrier")
    _check(url, "shared", 24, _finish(procs))


@pytest.mark.slow
def test_three_workers_share_a_sqlite_study(tmp_path):
    _cooperate(f"sqlite:///{tmp_path / 'shared.db'}", tmp_path, "tpe")


@pytest.mark.slow
@pytest.mark.parametrize("searcher", ["tpe", "evolution"])
def test_three_workers_share_a_postgres_study(postgres_url, tmp_path, searcher):
    _cooperate(postgres_url, tmp_path, searcher)


def _kill_one_of_three(url: str, tmp_path: Path, *, holding: str = "batch") -> None:
    """SIGKILL the first worker while it holds leased trials: inside its second batch (the
    others wait for it there), or (``holding="baseline"``) inside the baseline, the others
    started only once it holds it. The two others finish the budget without it."""
    n = 20
    if holding == "batch":
        env = [{"HANG_AT": "2"}, {}, {}]
    else:
        env = [{"HANG_AT": "1"}, {"AFTER_HELD": "1"}, {"AFTER_HELD": "1"}]
    procs = _start(url, "k", n, "evolution", tmp_path / "barrier", slow=True, env=env)
    victim, held = procs[0], tmp_path / "held"
    if holding == "baseline":  # alone at the barrier until it holds the baseline
        (tmp_path / "barrier" / "0").touch()
        (tmp_path / "barrier" / "1").touch()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not held.exists() and victim.poll() is None:
        time.sleep(0.05)
    if not held.exists():
        for p in procs:
            p.kill()
        pytest.fail(f"the first worker never reached its batch: {victim.communicate()[1][-2000:]}")
    # read while it sleeps inside the batch (after the kill, the others reclaim its trials at once)
    trials = optuna.load_study(study_name="k", storage=url).get_trials()
    mine = [t for t in trials if t.state == TrialState.RUNNING and (t.user_attrs.get("lease") or {}).get("pid") == victim.pid]
    assert mine, "the first worker held no running trial inside its batch"
    if holding == "baseline":
        assert [bool(t.user_attrs.get("baseline")) for t in mine] == [True]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {t.number: (t.user_attrs["order"], t.values) for t in trials if t.state == TrialState.COMPLETE}
    results = _finish(procs[1:])
    _check(url, "k", n, results)
    study = optuna.load_study(study_name="k", storage=url)
    failed = {t.number: t.user_attrs.get("lost", "") for t in study.get_trials()
              if (t.user_attrs.get("lease") or {}).get("pid") == victim.pid and t.state == TrialState.FAIL}
    assert {t.number for t in mine} <= set(failed), failed
    # the victim's own refusals (a repeat it gave back before it died) are not losses
    lost = [reason for reason in failed.values() if not reason.startswith("refused:")]
    assert lost and all("is gone" in reason for reason in lost), failed
    after = {t.number: (t.user_attrs["order"], t.values) for t in study.get_trials() if t.number in before}
    assert after == before


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trials_to_two_others_sqlite(tmp_path):
    _kill_one_of_three(f"sqlite:///{tmp_path / 'k.db'}", tmp_path)


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trials_to_two_others_postgres(postgres_url, tmp_path):
    _kill_one_of_three(postgres_url, tmp_path)


@pytest.mark.slow
def test_the_baseline_of_a_killed_worker_is_scored_by_another(tmp_path):
    """The worker holding the identity trial dies: another scores it again, so the study still
    holds "do nothing" once (it was lost for good before)."""
    _kill_one_of_three(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, holding="baseline")


SCHEMA = """
import os, sys, time, pathlib
from ordersearch.search import make_storage
import optuna
barrier, n = sys.argv[2], int(sys.argv[3])
pathlib.Path(barrier, str(os.getpid())).touch()
while len(os.listdir(barrier)) < n:
    time.sleep(0.001)
storage = make_storage(sys.argv[1])
optuna.create_study(storage=storage, study_name="fresh", load_if_exists=True)
print("ok")
"""


def _schema_race(url: str, barrier: Path) -> None:
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", SCHEMA, url, str(barrier), "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-1500:]


def test_workers_started_together_on_a_fresh_sqlite_database_all_start(tmp_path):
    """Schema creation races (SQLite: UNIQUE constraint failed: alembic_version) are retried."""
    for round_ in range(2):
        _schema_race(f"sqlite:///{tmp_path / f'fresh{round_}.db'}", tmp_path / f"barrier{round_}")


def test_workers_started_together_on_a_fresh_postgres_database_all_start(postgres_url, tmp_path):
    """PostgreSQL: UniqueViolation on pg_type while several workers create the schema."""
    _schema_race(postgres_url, tmp_path / "barrier")


# --- the command line ------------------------------------------------------------------------

BANK = "isoresnet:width=16,blocks=6,classes=10"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ordersearch", *args]


@pytest.mark.slow
def test_jobs_runs_local_workers_that_meet_the_budget_together(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(_cli("search", "--bank", BANK, "--data", "digits", "--n-images", "300", "--trials", "30",
                               "--batch-size", "4", "--jobs", "2", "--no-progress", "--reliability-orders", "0",
                               "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verdict:" in proc.stdout and (out / "report.md").is_file()
    trials = optuna.load_study(study_name="search-probe-tpe", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == 30 and len({t.user_attrs["order"] for t in counted}) == 30
    assert len({t.user_attrs["lease"]["pid"] for t in counted}) == 2  # both workers scored


@pytest.mark.slow
def test_a_worker_joins_a_running_search_with_its_settings(tmp_path):
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    main = subprocess.Popen(_cli("search", "--bank", BANK, "--data", "digits", "--n-images", "600", "--trials", "200",
                                 "--no-progress", "--reliability-orders", "0", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and main.poll() is None:
        time.sleep(0.2)
        try:
            if optuna.load_study(study_name="search-probe-tpe", storage=url).get_trials(deepcopy=False):
                break
        except Exception:  # the database or the study is not there yet
            continue
    worker = subprocess.run(_cli("worker", "--storage", url, "--study", "search-probe-tpe", "--no-progress"),
                            capture_output=True, text=True, timeout=600)
    stdout, err = main.communicate(timeout=600)
    assert main.returncode == 0, err[-2000:]
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "of its 200 trials" in worker.stdout
    scored = int(worker.stdout.split("worker scored ")[1].split()[0])
    trials = optuna.load_study(study_name="search-probe-tpe", storage=url).get_trials()
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == 200 and scored > 0
    assert len({t.user_attrs["lease"]["pid"] for t in counted}) == 2
    assert "verdict:" in stdout
