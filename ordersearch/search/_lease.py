"""Leases: which worker holds a RUNNING trial, and until when.

Every trial a worker asks for carries a lease from the moment it is asked (user attribute
``lease``: the worker's host, pid and process start time, and an expiry). A thread renews the
leases of the trials the worker holds while it lives. Before each batch a worker reclaims
trials whose lease lapsed, and, on its own host, trials of a worker whose process is gone (at
once: a search run again right after a SIGKILL finds its predecessor's trials reclaimable).
A reclaimed trial is failed with the reason in user attribute ``lost``: it does not count
toward the budget and its order may be proposed again (see ``is_live``). A worker stopping
for any reason (SIGINT, an exception) fails the trials it still holds the same way.

A running trial without a lease (its worker was killed between ``study.ask()`` and taking the
lease) is reclaimed once it is :data:`ORPHAN_SECONDS` old.

Optuna's RDB heartbeat does not serve here: it starts with the first heartbeat, which an
asked trial does not get until it is scored, and its stale check skips trials without one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["LEASE_KEY", "LOST_KEY", "Leases"]

log = logging.getLogger("ordersearch")

LEASE_KEY = "lease"
LOST_KEY = "lost"
#: Seconds a lease lasts without renewal (a worker on another host that stopped answering
#: loses its trials after this long).
LEASE_SECONDS = 120.0
#: Seconds between renewals.
RENEW_SECONDS = 20.0
#: Seconds after which a running trial that never got a lease is taken for orphaned (its
#: worker died between asking for it and leasing it, a window of a few storage round trips).
ORPHAN_SECONDS = 60.0


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux) or None: with the pid, it
    names a process even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid
        pass
    return start is None or _start_time(pid) in (None, start)


def _worker() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


class Leases:
    """The leases this worker holds in ``study``, renewed by a daemon thread."""

    def __init__(self, study: optuna.Study, *, seconds: float = LEASE_SECONDS, renew: float = RENEW_SECONDS) -> None:
        self.study, self.seconds, self.renew_every = study, seconds, renew
        self.worker = _worker()
        self._held: dict[int, int] = {}  # trial number -> trial id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _lease(self) -> dict[str, Any]:
        return {**self.worker, "expires": time.time() + self.seconds}

    def take(self, trial: optuna.Trial) -> None:
        """Lease a trial just asked for."""
        trial.set_user_attr(LEASE_KEY, self._lease())
        with self._lock:
            self._held[trial.number] = trial._trial_id
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ordersearch-leases", daemon=True)
            self._thread.start()

    def give_back(self, trial: optuna.Trial, reason: str) -> None:
        """Fail a trial this worker asked for but will not score (see ``claim`` in
        :mod:`._search`), with ``reason``; like a lost trial it does not count."""
        self.done(trial.number)
        _fail(self.study, trial.number, trial._trial_id, reason)

    def seed(self, seed: int) -> int:
        """A seed derived from ``seed`` and this worker's identity (host, pid, start time)."""
        key = f"{seed}:{self.worker['host']}:{self.worker['pid']}:{self.worker['start']}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") >> 1

    def done(self, number: int) -> None:
        """The trial was told: its lease ends with it."""
        with self._lock:
            self._held.pop(number, None)

    def renew(self) -> None:
        storage = self.study._storage  # the public storage API; the study holds no other handle
        with self._lock:
            held = dict(self._held)
        lease = self._lease()
        for number, trial_id in held.items():
            try:
                storage.set_trial_user_attr(trial_id, LEASE_KEY, lease)
            except Exception:  # finished meanwhile (told, or reclaimed by another worker)
                self.done(number)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: the next renewal tries again
                log.debug("lease renewal failed: %s", exc)

    def close(self, reason: str) -> int:
        """Stop renewing; fail the trials still held (never scored) with ``reason``."""
        self._stop.set()
        with self._lock:
            held, self._held = sorted(self._held.items()), {}
        failed = 0
        for number, trial_id in held:
            try:
                _fail(self.study, number, trial_id, reason)
                failed += 1
            except Exception:  # the storage itself may be what failed
                log.debug("could not fail trial %d", number)
        return failed

    def reclaim(self, trials: list[FrozenTrial]) -> int:
        """Fail the RUNNING trials among ``trials`` of workers that are gone or whose lease
        lapsed; returns how many."""
        now, n = time.time(), 0
        for t in trials:
            why = _why_lost(t, self.worker, now) if t.state == TrialState.RUNNING else None
            if why is None:
                continue
            try:
                _fail(self.study, t.number, t._trial_id, f"reclaimed: {why}")
                n += 1
            except Exception:  # another worker reclaimed it first
                log.debug("trial %d was reclaimed elsewhere", t.number)
        if n:
            log.warning("study %s: %d trials of stopped workers were failed and will be proposed again",
                        self.study.study_name, n)
        return n


def _fail(study: optuna.Study, number: int, trial_id: int, reason: str) -> None:
    study._storage.set_trial_user_attr(trial_id, LOST_KEY, reason)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def _why_lost(trial: FrozenTrial, me: dict[str, Any], now: float) -> str | None:
    lease = trial.user_attrs.get(LEASE_KEY)
    if not isinstance(lease, dict):
        # a worker takes the lease right after ``study.ask()`` returns; one killed in between
        # leaves a trial without a lease, which nobody else will ever finish
        start = trial.datetime_start.timestamp() if trial.datetime_start else now
        return "asked but never leased (its worker stopped at once)" if now - start > ORPHAN_SECONDS else None
    if (lease.get("host"), lease.get("pid")) == (me["host"], me["pid"]):
        return None  # this worker's own
    who = f"worker {lease.get('host')}:{lease.get('pid')}"
    if lease.get("host") == me["host"] and not _alive(int(lease.get("pid", -1)), lease.get("start")):
        return f"{who} is gone"
    if float(lease.get("expires", 0)) < now:
        return f"{who} stopped renewing its lease"
    return None
