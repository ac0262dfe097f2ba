from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest

from ordersearch.search._study import counts_toward_budget
from ordersearch.testing import make_problem

optuna.logging.set_verbosity(optuna.logging.WARNING)

def test_a_worker_that_died_leaves_its_trials_to_others(tmp_path):
    """Trials left running by a dead worker are failed by the next run (heartbeat) and are
    not counted toward the budget."""
    from ordersearch.search import make_storage

    url = f"sqlite:///{tmp_path / 'stale.db'}"
    p = make_problem(60)
    p.run(lambda: "random", n_trials=3, storage=url, study_name="s", seed=0)
    storage = make_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.load_study(study_name="s", storage=storage)
    dead = study.ask()  # a worker asks, records a heartbeat once, and dies
    storage.record_heartbeat(dead._trial_id)
    import time

    time.sleep(2.5)
    result = p.run(lambda: "random", n_trials=5, storage=storage, study_name="s", seed=0)
    states = {t.number: t.state for t in result.study.get_trials()}
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    assert sum(counts_toward_budget(t) for t in result.study.get_trials()) == 5


def test_a_server_that_never_answers_fails_in_one_line_within_15_s():
    """A PostgreSQL URL whose server accepts the connection but never answers (a hung server,
    a wrong port behind a proxy) fails within the connect timeout instead of hanging."""
    import socket
    import threading
    import time

    from ordersearch.search import SearchError, make_storage

    pytest.importorskip("psycopg")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(SearchError, match="cannot open storage") as info:
        make_storage(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db")
    assert time.monotonic() - start < 15 and "\n" not in str(info.value) and ":p@" not in str(info.value)
    server.close()


def _reclaimed(reason: str) -> bool:
    return "is gone" in reason or "never leased" in reason


KILLED = """
import sys, time, torch, optuna
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
from ordersearch.testing import make_problem
p = make_problem(60)
engine = p.engine()
evaluate = engine.evaluate
def slow(*a, **k):  # slow enough to be killed mid-batch
    time.sleep(0.4)
    return evaluate(*a, **k)
engine.evaluate = slow
p.run(lambda: sys.argv[3], n_trials=int(sys.argv[2]), batch_size=4, storage=sys.argv[1], study_name="k",
      seed=0, engine=engine)
"""


@pytest.mark.parametrize("searcher", ["evolution", "tpe"])
def test_rerun_after_sigkill_completes_the_budget_at_once(tmp_path, searcher):
    """SIGKILL a search mid-batch and run it again at once: the dead worker's trials (its
    process is gone) are reclaimed at once, the budget is met exactly, finished trials kept."""
    import signal
    import time

    url = f"sqlite:///{tmp_path / 'k.db'}"
    n = 14
    proc = subprocess.Popen([sys.executable, "-c", KILLED, url, str(n), searcher],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    study, mid_batch = None, False
    while time.monotonic() < deadline and proc.poll() is None and not mid_batch:
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name="k", storage=url)
        except KeyError:
            continue
        states = [t.state for t in study.get_trials(deepcopy=False)]
        mid_batch = states.count(optuna.trial.TrialState.COMPLETE) >= 5 and optuna.trial.TrialState.RUNNING in states
    if not mid_batch:
        proc.kill()
        pytest.fail(f"the worker never reached the middle of a batch: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.user_attrs["order"], t.values) for t in study.get_trials()
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials())
    result = make_problem(60).run(lambda: searcher, n_trials=n, batch_size=4, storage=url, study_name="k", seed=0)
    trials = result.study.get_trials()
    assert sum(counts_toward_budget(t) for t in trials) == n
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    lost = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    # a kill between study.ask() and the lease (one storage round trip) leaves a trial with no
    # worker named: it is reclaimed once ORPHAN_SECONDS old, so the rerun then waits for it
    assert lost and all(_reclaimed(t.user_attrs.get("lost", "")) for t in lost), [t.user_attrs for t in lost]
    after = {t.number: (t.user_attrs["order"], t.values) for t in trials if t.number in before}
    assert after == before  # no finished trial lost or changed


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it up in a terminal (KeyboardInterrupt), also when the tests run
    in a background job or under nohup, which start processes with SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:  # in the child before exec: Python then installs KeyboardInterrupt
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_fails_the_trials_in_flight_and_exits_130(tmp_path):
    """SIGINT fails every trial the worker holds (asked but not scored) with the reason, and
    the CLI exits 130."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordersearch", "search", "--bank", "isoresnet:width=8,blocks=4,classes=10",
         "--data", "digits", "--n-images", "200", "--searcher", "tpe", "--trials", "400", "--batch-size", "8",
         "--no-progress", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    url = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            if len(optuna.load_study(study_name="search-probe-tpe", storage=url).get_trials(deepcopy=False)) >= 20:
                break
        except (KeyError, Exception):
            continue
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ordersearch: interrupted"
    trials = optuna.load_study(study_name="search-probe-tpe", storage=url).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs.get("lost") == "interrupted (SIGINT)" or "failed" in t.user_attrs


def test_a_trial_asked_but_never_leased_is_reclaimed_once_it_is_old(tmp_path, monkeypatch):
    """A worker killed between study.ask() and taking the lease leaves a running trial with
    no lease; a later run fails it (reason given) once it is ORPHAN_SECONDS old, and meets
    the budget instead of waiting for it forever."""
    from ordersearch.search import _lease

    url = f"sqlite:///{tmp_path / 'o.db'}"
    p = make_problem(60)
    p.run(lambda: "random", n_trials=3, storage=url, study_name="s", seed=0)
    orphan = optuna.load_study(study_name="s", storage=url).ask()
    monkeypatch.setattr(_lease, "ORPHAN_SECONDS", 0.0)
    result = p.run(lambda: "random", n_trials=6, storage=url, study_name="s", seed=0)
    trials = result.study.get_trials()
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert "never leased" in trials[orphan.number].user_attrs["lost"]
    assert sum(counts_toward_budget(t) for t in trials) == 6


def test_ctrl_c_while_the_study_is_written_stops_after_the_write(tmp_path, python_sigint):
    """SIGINT arriving while a worker writes the study (here: in a callback after a tell) is
    held until the write is done and raised at the next batch; nothing is left RUNNING and the
    database stays usable. SIGINT while blocks run interrupts at once."""
    import signal

    url = f"sqlite:///{tmp_path / 'i.db'}"
    p = make_problem(60)

    def ctrl_c(study, trial):
        if trial.number == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        p.run(lambda: "random", n_trials=30, batch_size=4, storage=url, study_name="s", seed=0, callbacks=[ctrl_c])
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert trials[3].state == optuna.trial.TrialState.COMPLETE
    assert max(t.number for t in trials) < 8 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    engine = p.engine()
    evaluate = engine.evaluate

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # never reached in full: the signal raises at once
        return evaluate(*a, **k)

    engine.evaluate = interrupted
    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        p.run(lambda: "random", n_trials=40, storage=url, study_name="s", seed=0, engine=engine)
    assert time.monotonic() - begin < 5
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert any(t.user_attrs.get("lost") == "interrupted (SIGINT)" for t in trials)
