"""The ``search``, ``adapt`` and ``export`` subcommands of the ``ordersearch`` command line.

``ordersearch search`` finds an order for a new labelled dataset (``probe`` by default);
``ordersearch adapt`` adapts to an unlabelled target domain (``infomax`` by default, labels
never used for the search). Both are thin callers of :class:`~ordersearch.search.SearchJob`:
the searcher sees the data's *search* split only, the finalists are re-scored on *select*,
and the answer ends with a verdict measured on held-out images. Every trial is recorded in an
Optuna study (a SQLite file in ``--out`` unless ``--storage`` says otherwise; the same
``--study`` resumes) and ``best_order.json``, ``trials.csv``, ``report.md`` and PNG plots are
written. ``ordersearch export`` renders the same files from a finished study.

``cli.py`` registers them with :func:`add_commands` and calls ``args.handler(args)``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .engine import DEFAULT_LABELLED, DEFAULT_UNLABELLED

__all__ = ["RunConfig", "add_bank_options", "add_commands", "bank_from_args"]

log = logging.getLogger("ordersearch")

_DEFAULTS = {
    "search": {"objective": DEFAULT_LABELLED, "searcher": "tpe", "norm": "source",
               "help": "search an order of a bank's blocks for a new labelled dataset"},
    "adapt": {"objective": DEFAULT_UNLABELLED, "searcher": "evolution", "norm": "target",
              "help": "adapt a bank to an unlabelled target domain by reordering its blocks"},
}


@dataclass(frozen=True)
class RunConfig:
    """Resolved settings of a ``search``/``adapt`` run (written to ``<out>/config.json``)."""

    command: str
    bank: str
    data: str
    objective: str
    searcher: str
    trials: int = 100
    batch_size: int = 8
    storage: str | None = None
    study: str | None = None
    seed: int = 0
    out: str = "runs/search"
    splits: str | None = None
    n_images: int | None = None
    min_len: int = 1
    max_len: int | None = None
    max_repeats: int | None = None  # None: 1, or what the bank's source orders need; 0: unlimited
    no_skip: bool = False
    prefix: str = ""
    fidelities: str | None = None
    timeout: float | None = None
    device: str | None = None
    cache_mb: int = 512
    dtype: str | None = None
    norm: str = "source"
    finalists: int = 10
    resamples: int = 2000
    reliability_orders: int = 30
    jobs: int = 1
    pretrained: bool = False
    checkpoint: str | None = None
    model_arg: tuple[str, ...] = ()
    baseline: str | None = None


def add_bank_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--bank`` and the options that say how its weights load (search, adapt, show, export)."""
    p.add_argument("--bank", required=required, help="bank file or folder, timm:<name>, or isoresnet:...")
    p.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights")
    p.add_argument("--checkpoint", help="local weights file for the model")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm: a model argument, e.g. --model-arg img_size=64 (repeatable)")


def bank_from_args(args: argparse.Namespace) -> Any:
    """The bank ``--bank``, ``--pretrained``, ``--checkpoint`` and ``--model-arg`` name."""
    from .adapters import load_bank, parse_model_args

    return load_bank(args.bank, pretrained=args.pretrained, checkpoint=args.checkpoint,
                     **parse_model_args(args.model_arg))


def add_commands(subparsers: Any) -> None:
    """Add ``search``, ``adapt`` and ``export`` to an argparse subparsers object; each sets
    ``handler`` (call ``args.handler(args)``)."""
    from .engine import list_objectives
    from .search import list_searchers

    for command, d in _DEFAULTS.items():
        p = subparsers.add_parser(command, help=d["help"], description=d["help"])
        add_bank_options(p, required=True)
        p.add_argument("--data", required=True, help="data spec, e.g. digits:rotate=30 or a folder")
        p.add_argument("--searcher", default=d["searcher"], choices=list_searchers(), help=f"default: {d['searcher']}")
        p.add_argument("--objective", default=d["objective"], type=_objective_arg,
                       help=f"one of {', '.join(list_objectives())}, with options (knn:k=20) or an ensemble "
                            f"(ensemble:infomax+snd); default: {d['objective']}")
        p.add_argument("--trials", type=int, default=100, help="trial budget of the study, identity included (100)")
        p.add_argument("--batch-size", type=int, default=8, help="orders asked and scored together (8)")
        p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out>/study.db)")
        p.add_argument("--study", help="study name; an existing study resumes (default: <command>-<objective>-<searcher>)")
        p.add_argument("--force-new", action="store_true",
                       help="delete the study of that name, if any, and start afresh (instead of resuming)")
        p.add_argument("--seed", type=int, default=0, help="seed of data splits, searcher and bootstrap (0)")
        p.add_argument("--out", default=f"runs/{command}", help=f"run folder (default: runs/{command})")
        p.add_argument("--splits", metavar="SEARCH/SELECT/TEST",
                       help="shares of the search, select and test parts when the data is not pre-split "
                            "(default 60/20/20: train, val and test of the data spec)")
        p.add_argument("--n-images", type=int, help="search on a seeded subset of this many search images")
        p.add_argument("--finalists", type=int, default=10,
                       help="best orders by search score re-scored on the select part (10; the identity always is)")
        p.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples over images (2000)")
        p.add_argument("--min-len", type=int, default=1, help="shortest order (1)")
        p.add_argument("--max-len", type=int, help="longest order (default: the number of blocks)")
        p.add_argument("--max-repeats", type=int,
                       help="times one block may run; 0: unlimited (default: 1, or what the bank's source orders need)")
        p.add_argument("--no-skip", action="store_true", help="orders always have --max-len positions")
        p.add_argument("--prefix", default="", help="pinned first blocks, e.g. 0 or 0-1")
        p.add_argument("--fidelities", help="image counts to prune on first, e.g. 64,256 (successive halving)")
        p.add_argument("--timeout", type=float, help="stop asking new orders after this many seconds")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="block precision (default: float32 on cpu, bfloat16 on cuda)")
        p.add_argument("--cache-mb", type=int, default=512, help="prefix activation cache budget in MiB (512)")
        p.add_argument("--norm", choices=("source", "target"), default=d["norm"],
                       help=f"BatchNorm statistics: the bank's (source) or re-estimated on the data per order "
                            f"(target, AdaBN; default: {d['norm']})")
        p.add_argument("--baseline", metavar="ORDER|SOURCE",
                       help="the order gains are measured against: an order (1-0-2) or a source order's name "
                            "(a multi-source bank's `plain`: the unmodified model of that domain); default: identity")
        p.add_argument("--reliability-orders", type=int, default=30,
                       help="orders re-scored on two halves of the search part for the report's reliability (30; 0: skip)")
        p.add_argument("--jobs", type=int, default=1,
                       help="local worker processes sharing the search (1); more machines join with `ordersearch worker`")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.set_defaults(handler=_run, command=command)

    w = subparsers.add_parser(
        "worker", help="join a search or adapt study as one more worker (e.g. on another machine)",
        description="Score trials of a study that `ordersearch search` or `adapt` started, with the settings it "
                    "recorded, until its budget is met; the bank and data must be reachable here under the same "
                    "names (or give --bank/--data: their digests must match). The held-out selection and the "
                    "report stay with the command that started the study (or run it again to resume).")
    w.add_argument("--storage", required=True, help="Optuna storage URL the study lives in, e.g. postgresql://...")
    w.add_argument("--study", required=True, help="study name")
    w.add_argument("--bank", help="the bank here, when its path differs from the recorded one")
    w.add_argument("--data", help="the data here, when its path differs from the recorded one")
    w.add_argument("--device", help="cpu or cuda (default: the recorded one, else cuda when available)")
    w.add_argument("--timeout", type=float, help="stop asking new orders after this many seconds")
    w.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    w.set_defaults(handler=_worker)

    e = subparsers.add_parser("export", help="write the order spec(s), trials table, report and plots of a study")
    e.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///runs/search/study.db")
    e.add_argument("--study", required=True, help="study name")
    e.add_argument("--top", type=int, default=1, help="also export the N best orders to orders/rank<i>.json")
    e.add_argument("--out", help="output folder (default: export-<study>)")
    add_bank_options(e, required=False)
    e.set_defaults(handler=_export)


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["model_arg"] = tuple(values.get("model_arg") or ())
    return RunConfig(**values)


def _objective_arg(text: str) -> str:
    """argparse type of ``--objective``: the string if it names an objective (else exit 2)."""
    from .engine import get_objective
    from .errors import ObjectiveError

    try:
        get_objective(text)
    except ObjectiveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _run(args: argparse.Namespace) -> int:
    import optuna

    from .report import write_outputs
    from .search import SearchError, sqlite_url

    cfg = _config(args)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out {out} is a file, not a folder")
    _check(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bank = bank_from_args(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"cannot create --out {out}: {exc.strerror}") from None
    storage = cfg.storage or sqlite_url(out / "study.db")
    study_name = cfg.study or f"{cfg.command}-{cfg.objective}-{cfg.searcher}"
    from .spec import write_atomic

    if args.force_new:
        from .search import make_storage

        try:
            optuna.delete_study(study_name=study_name, storage=make_storage(storage))
            log.warning("deleted study %r in %s (--force-new)", study_name, storage)
        except KeyError:
            pass  # nothing to delete
    cfg = replace(cfg, storage=storage, study=study_name)
    write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    job = _job(cfg, bank, progress=not args.no_progress)
    result = job.run()
    files = write_outputs(result, out, bank=bank)
    print(render_result(result))
    print(f"wrote {files['spec']}, {files['trials']}, {files['report']} and plots in {out}")
    return 0


def _check(cfg: RunConfig) -> None:
    """Refuse settings that cannot run, before anything loads."""
    from .engine import get_objective, list_objectives
    from .search import SearchError

    if cfg.command == "adapt" and get_objective(cfg.objective).needs_labels:
        raise SearchError(f"adapt uses no labels, but objective {cfg.objective!r} needs them: use "
                          f"`ordersearch search` for a labelled dataset, or an unlabelled objective "
                          f"({', '.join(n for n in list_objectives() if n != 'ensemble' and not get_objective(n).needs_labels)})")
    if cfg.trials < 1 or cfg.batch_size < 1:
        raise SearchError("--trials and --batch-size must be >= 1")
    if cfg.cache_mb < 0:
        raise SearchError(f"--cache-mb must be 0 or more, got {cfg.cache_mb}")
    if cfg.jobs < 1:
        raise SearchError(f"--jobs must be >= 1, got {cfg.jobs}")


def _job(cfg: RunConfig, bank: Any, *, progress: bool, record: bool = True) -> Any:
    """The :class:`~ordersearch.search.SearchJob` of resolved settings (storage and study set);
    ``record``: the settings are recorded with the study for workers that join it later."""
    from . import data as osdata
    from .cli import _progress_bar
    from .engine import EngineConfig
    from .order import Order
    from .search import SearchError, SearchJob, SelectionConfig
    from .space import OrderSpace

    engine = EngineConfig(device=cfg.device, dtype=cfg.dtype, norm=cfg.norm, cache_bytes=cfg.cache_mb * 2**20)
    selection = SelectionConfig(finalists=cfg.finalists, resamples=cfg.resamples,
                                reliability_orders=cfg.reliability_orders)
    spec = osdata.parse_spec(cfg.data)
    if cfg.splits:
        spec = replace(spec, split=osdata.parse_split(cfg.splits, "--splits"))
    update, close = _progress_bar(progress)  # a large image folder is streamed to disk first
    try:
        data = osdata.load(spec, bank.data_config, seed=cfg.seed, progress=update)
    finally:
        close()
    space_kwargs: dict[str, Any] = {}
    if cfg.max_repeats is not None:
        space_kwargs["max_repeats"] = cfg.max_repeats or None  # 0: unlimited
    space = OrderSpace.covering(bank.n_blocks, list(bank.source_orders.values()), min_len=cfg.min_len,
                                max_len=cfg.max_len, allow_skip=not cfg.no_skip,
                                prefix=tuple(Order.parse(cfg.prefix)), **space_kwargs)
    fidelities = None
    if cfg.fidelities:
        try:
            fidelities = [int(x) for x in cfg.fidelities.split(",") if x.strip()]
        except ValueError:
            raise SearchError(f"--fidelities must be image counts such as 64,256, got {cfg.fidelities!r}") from None
    return SearchJob(bank=bank, data=data, objective=cfg.objective, searcher=cfg.searcher, space=space,
                     engine=engine, n_trials=cfg.trials, batch_size=cfg.batch_size, storage=cfg.storage,
                     study_name=cfg.study, selection=selection, seed=cfg.seed, timeout=cfg.timeout,
                     fidelities=fidelities, n_images=cfg.n_images, progress=progress, jobs=cfg.jobs,
                     run_settings=asdict(replace(cfg, storage=None)) if record else None,  # no password kept
                     baseline=cfg.baseline)


def _worker(args: argparse.Namespace) -> int:
    import optuna

    from .search import SearchError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(args.storage, args.study)
    run = (study.user_attrs.get("ordersearch") or {}).get("run")
    if not run:
        raise SearchError(f"study {args.study!r} was not started by `ordersearch search` or `adapt` (it records no "
                          "run settings); join it from Python with search(..., storage=..., study_name=...)")
    names = {f.name for f in fields(RunConfig)}
    overrides = {k: getattr(args, k) for k in ("bank", "data", "device", "timeout") if getattr(args, k) is not None}
    cfg = replace(RunConfig(**{k: v for k, v in run.items() if k in names}), storage=args.storage, study=args.study,
                  model_arg=tuple(run.get("model_arg") or ()), jobs=1, **overrides)
    from .adapters import load_bank, parse_model_args

    bank = load_bank(cfg.bank, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **parse_model_args(cfg.model_arg))
    found = _job(cfg, bank, progress=not args.no_progress, record=False).work()
    trials = found.study.get_trials(deepcopy=False)
    from .search._study import counts_toward_budget

    print(f"worker scored {int(found.engine_stats['candidates'])} orders; study {args.study!r} has "
          f"{sum(map(counts_toward_budget, trials))} of its {cfg.trials} trials; best so far "
          f"{found.best_order} ({found.best_score:.4f} on search)")
    return 0


def render_result(result: Any) -> str:
    """What ``search``/``adapt`` print: the finalists that matter, then the verdict line."""
    from .cli import _table

    truth = result.truth or "-"
    rows = []
    for label, f in (("baseline", result.baseline), ("chosen", result.chosen)):
        rows.append([label, str(f.order), len(f.order), _num(f.search), _num(f.select), _num(f.test)])
    head = ["", "order", "depth", f"search {result.objective}", f"select {result.objective}", f"test {truth}"]
    lines = [_table(head, rows)]
    if result.reference is not None:
        lines.append(f"(unmodified source model on test: {truth} {result.reference:.3f})")
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.winners_curse is not None and result.chosen.order != result.baseline.order:
        lines.append(f"winner's curse: the chosen order's search score overstates its select score by "
                     f"{result.winners_curse:+.3f}")
    lines.append(f"verdict: {result.summary()}")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _load_study(url: str, name: str) -> Any:
    """An existing study (a one-line error names the studies there when it is not)."""
    import optuna

    from .search import SearchError, make_storage

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise SearchError(f"no study database at {url.removeprefix('sqlite:///')}")  # not an empty new one
    storage = make_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"no study {name!r} in {url}; studies there: {', '.join(names) or 'none'}") from None


def _export(args: argparse.Namespace) -> int:
    import optuna

    from .report import write_outputs
    from .search import JobResult, SearchError

    if args.top < 1:
        raise SearchError("--top must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(args.storage, args.study)
    result = JobResult.from_study(study)
    bank = None
    if args.bank:
        bank = bank_from_args(args)
        if bank.fingerprint != result.bank.get("fingerprint"):
            raise SearchError(f"bank {args.bank} is not the bank study {args.study!r} searched (fingerprint differs)")
    out = Path(args.out or f"export-{args.study}")
    files = write_outputs(result, out, bank=bank, top=args.top)
    print(f"verdict: {result.summary()}")
    print(f"wrote {files['spec']}, {files['trials']}, {files['report']} and plots in {out}")
    return 0
