"""Studies: opening (or resuming) the Optuna study a search records into.

Storage is any Optuna storage: an RDB URL (``sqlite:///run/study.db``, PostgreSQL, MySQL), a
storage object, or None for an in-memory study. RDB storages get a heartbeat, so that trials
left running by a killed worker are failed when a search resumes (they do not count toward
the budget and are proposed again) while other workers' live trials are left alone.

The study remembers what it searches (user attribute ``ordersearch``: searcher, space,
objective, bank digest, data digest, engine dtype and norm); resuming it with anything that
changes a score different is refused in one line naming the difference.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ..errors import one_line
from ._base import SearchError

__all__ = ["STUDY_META", "counts_toward_budget", "fail_stale", "make_storage", "open_study", "sqlite_url"]

log = logging.getLogger("ordersearch")

#: Study user attribute holding what the study searches.
STUDY_META = "ordersearch"

#: Tries at creating a storage whose schema other workers are creating at the same moment.
_SCHEMA_ATTEMPTS = 6
#: Seconds a PostgreSQL connection may take to be established.
CONNECT_TIMEOUT = 10

#: What a resume must match (each changes the scores), and how a difference is named.
_CHECKED = {
    "searcher": "another searcher",
    "space": "another order space",
    "objective": "another objective",
    "fingerprint": "another bank (block weights)",
    "bank_digest": "another bank (weights or data config)",
    "data_digest": "other data (images, labels or split)",
    "engine": "other engine settings",
}


def sqlite_url(path: Any) -> str:
    """The Optuna URL of a SQLite file."""
    return f"sqlite:///{path}"


def make_storage(
    storage: str | BaseStorage | None, *, heartbeat_interval: int = 60, grace_period: int | None = None
) -> BaseStorage | str | None:
    """An Optuna storage for ``storage`` (URLs become heartbeat-enabled RDB storages)."""
    if storage is None or isinstance(storage, BaseStorage):
        return storage
    if not isinstance(storage, str) or "://" not in storage:
        raise SearchError(f"storage must be an Optuna storage URL such as sqlite:///study.db, got {storage!r}")
    kwargs: dict[str, Any] = {}
    if storage.startswith("postgresql"):
        # a server that accepts connections but never answers must not hang a worker: libpq's
        # connect_timeout bounds the whole handshake
        kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}
    if storage.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}  # several worker processes share one file
        path = storage.split(":///", 1)[1] if ":///" in storage else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # a new run folder
    try:
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(storage, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period)
            except Exception as exc:
                # workers started together on a fresh database race to create its schema; the
                # losers see a unique-constraint error, and the schema is there on a retry
                if attempt + 1 == _SCHEMA_ATTEMPTS or not _lost_schema_race(exc):
                    raise
                log.debug("storage schema created by another worker meanwhile (%s); retrying", type(exc).__name__)
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
        raise AssertionError("unreachable")
    except ImportError as exc:
        raise SearchError(f"storage {storage.split('://')[0]}: a database driver is missing ({exc})") from None
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise SearchError(f"cannot open storage {_redact(storage)}: {type(exc).__name__}: "
                          f"{one_line(exc)}") from None


def _lost_schema_race(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("UNIQUE constraint", "UniqueViolation", "IntegrityError", "already exists"))


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def open_study(
    storage: BaseStorage | str | None,
    study_name: str | None,
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner | None,
    directions: tuple[str, ...],
    meta: dict[str, Any],
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when ``study_name`` exists in ``storage`` (the worker
    *joins* it), and check that an existing study searched the same thing.

    Returns:
        The study, and True when it existed already (a resume, or another worker's study).
    """
    try:
        try:
            study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=study_name,
                                        directions=list(directions))
            joined = False
        except optuna.exceptions.DuplicatedStudyError:  # creation is atomic: one worker creates
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
            joined = True
    except (ValueError, KeyError, optuna.exceptions.OptunaError) as exc:
        raise SearchError(f"cannot open study {study_name!r}: {one_line(exc)}") from None
    old = study.user_attrs.get(STUDY_META)
    if old is None:
        study.set_user_attr(STUDY_META, meta)
        return study, joined
    for key, what in _CHECKED.items():
        if key not in old:
            continue  # a study made before this key was recorded: nothing to compare
        if old.get(key) != meta.get(key):
            was, now = old.get(key), meta.get(key)
            if key == "data_digest":  # digests say nothing to a user: name the data instead
                was, now = (old.get("data") or {}).get("name", was), (meta.get("data") or {}).get("name", now)
                was, now = (f"{was} (other images, labels or split)", now) if was == now else (was, now)
            raise SearchError(
                f"study {study.study_name!r} was made with {what}: {_short(was)}, not {_short(now)}; "
                "resume it with the same settings, or start afresh with another --study name or --force-new"
            )
    if [d.name.lower() for d in study.directions] != list(directions):
        raise SearchError(f"study {study.study_name!r} has directions {study.directions}, not {directions}")
    if meta.get("run") is not None and old.get("run") != meta["run"]:  # the latest command's, for new workers
        study.set_user_attr(STUDY_META, {**old, "run": meta["run"]})
    return study, joined


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials count; failures count only when the evaluation itself failed (a trial
    failed because its worker was interrupted or died is proposed again)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "failed" in trial.user_attrs


def fail_stale(study: optuna.Study) -> int:
    """Fail trials whose worker stopped sending heartbeats; returns how many."""
    storage = study._storage  # the public helper below needs the heartbeat-enabled storage
    if not hasattr(storage, "get_heartbeat_interval") or storage.get_heartbeat_interval() is None:
        return 0
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    n = len(before - after)
    if n:
        log.warning("study %s: %d trials left running by a stopped worker were failed and will be "
                    "proposed again", study.study_name, n)
    return n
