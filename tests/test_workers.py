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
if slow == "1":  # slow enough for a worker to be killed in the middle of a batch
    evaluate = engine.evaluate
    def slowly(*a, **k):
        time.sleep(0.3)
        return evaluate(*a, **k)
    engine.evaluate = slowly
import os, pathlib  # start together: the first worker up could otherwise take every trial
pathlib.Path(barrier, str(os.getpid())).touch()
deadline = time.monotonic() + 120
while len(os.listdir(barrier)) < int(n_workers) and time.monotonic() < deadline:
    time.sleep(0.01)
result = p.run(lambda: searcher, n_trials=int(n), batch_size=3, storage=url, study_name=name, seed=0, engine=engine)
print("candidates", int(result.engine_stats["candidates"]), "best", repr(result.best_score))
"""


def _start(url: str, name: str, n: int, searcher: str, barrier: Path, n_workers: int = 3,
           slow: bool = False) -> list[subprocess.Popen]:
    barrier.mkdir(exist_ok=True)
    args = [url, name, str(n), searcher, str(barrier), str(n_workers), "1" if slow else "0"]
    return [subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(n_workers)]


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


def _kill_one_of_three(url: str, tmp_path: Path) -> None:
    n = 20
    procs = _start(url, "k", n, "evolution", tmp_path / "barrier", slow=True)
    victim = procs[0]
    deadline = time.monotonic() + 240
    held = False
    while time.monotonic() < deadline and not held:
        time.sleep(0.1)
        # stopped while we look, so the trial it holds is still held when it is killed (a
        # worker seen holding one could otherwise finish it before the kill arrives)
        victim.send_signal(signal.SIGSTOP)
        try:
            trials = optuna.load_study(study_name="k", storage=url).get_trials(deepcopy=False)
        except Exception:  # no study yet, or (SQLite) stopped inside a write: look again
            trials = []
        held = sum(t.state == TrialState.COMPLETE for t in trials) >= 4 and any(
            t.state == TrialState.RUNNING and (t.user_attrs.get("lease") or {}).get("pid") == victim.pid for t in trials)
        if not held:
            victim.send_signal(signal.SIGCONT)
    if not held:
        for p in procs:
            p.kill()
        pytest.fail("the first worker never held a running trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {t.number: (t.user_attrs["order"], t.values) for t in trials if t.state == TrialState.COMPLETE}
    results = _finish(procs[1:])
    _check(url, "k", n, results)
    study = optuna.load_study(study_name="k", storage=url)
    failed = [t.user_attrs.get("lost", "") for t in study.get_trials()
              if (t.user_attrs.get("lease") or {}).get("pid") == victim.pid and t.state == TrialState.FAIL]
    # the victim's own refusals (a repeat it gave back before it died) are not losses
    lost = [reason for reason in failed if not reason.startswith("refused:")]
    assert lost and all("is gone" in reason or "never leased" in reason for reason in lost), failed
    after = {t.number: (t.user_attrs["order"], t.values) for t in study.get_trials() if t.number in before}
    assert after == before


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trials_to_two_others_sqlite(tmp_path):
    _kill_one_of_three(f"sqlite:///{tmp_path / 'k.db'}", tmp_path)


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trials_to_two_others_postgres(postgres_url, tmp_path):
    _kill_one_of_three(postgres_url, tmp_path)


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
