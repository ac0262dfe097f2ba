"""The ``search``, ``adapt`` and ``export`` subcommands of the ``ordersearch`` command line.

``ordersearch search`` finds an order for a new labelled dataset (``probe`` by default);
``ordersearch adapt`` adapts to an unlabelled target domain (``infomax`` by default, labels
never used for the search). Both record every trial in an Optuna study (a SQLite file in
``--out`` unless ``--storage`` says otherwise; the same ``--study`` resumes) and write
``best_order.json``, ``trials.csv``, ``report.md`` and PNG plots. ``ordersearch export``
writes the same files for an existing study.

``cli.py`` registers them with :func:`add_commands` and calls ``args.handler(args)``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import OrderSearchError

__all__ = ["RunConfig", "add_commands"]

log = logging.getLogger("ordersearch")

_DEFAULTS = {
    "search": {"objective": "probe", "searcher": "tpe", "help": "search an order of a bank's blocks for a new labelled dataset"},
    "adapt": {"objective": "infomax", "searcher": "evolution",
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
    split: str = "train+val"
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
    norm: str = "source"
    reliability_orders: int = 30
    pretrained: bool = False
    checkpoint: str | None = None
    model_arg: tuple[str, ...] = ()


def add_commands(subparsers: Any) -> None:
    """Add ``search``, ``adapt`` and ``export`` to an argparse subparsers object; each sets
    ``handler`` (call ``args.handler(args)``)."""
    from .engine import list_objectives
    from .search import list_searchers

    for command, d in _DEFAULTS.items():
        p = subparsers.add_parser(command, help=d["help"], description=d["help"])
        p.add_argument("--bank", required=True, help="bank file or folder, timm:<name>, or isoresnet:...")
        p.add_argument("--data", required=True, help="data spec, e.g. digits:rotate=30 or a folder")
        p.add_argument("--searcher", default=d["searcher"], choices=list_searchers(), help=f"default: {d['searcher']}")
        p.add_argument("--objective", default=d["objective"], choices=list_objectives(), help=f"default: {d['objective']}")
        p.add_argument("--trials", type=int, default=100, help="trial budget of the study, identity included (100)")
        p.add_argument("--batch-size", type=int, default=8, help="orders asked and scored together (8)")
        p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out>/study.db)")
        p.add_argument("--study", help="study name; an existing study resumes (default: <command>-<objective>-<searcher>)")
        p.add_argument("--seed", type=int, default=0, help="seed of data splits and searcher (0)")
        p.add_argument("--out", default=f"runs/{command}", help=f"run folder (default: runs/{command})")
        p.add_argument("--split", default="train+val", help="data split(s) searched on (train+val); test is held out")
        p.add_argument("--n-images", type=int, help="score on a seeded subset of this many images")
        p.add_argument("--min-len", type=int, default=1, help="shortest order (1)")
        p.add_argument("--max-len", type=int, help="longest order (default: the number of blocks)")
        p.add_argument("--max-repeats", type=int,
                       help="times one block may run; 0: unlimited (default: 1, or what the bank's source orders need)")
        p.add_argument("--no-skip", action="store_true", help="orders always have --max-len positions")
        p.add_argument("--prefix", default="", help="pinned first blocks, e.g. 0 or 0-1")
        p.add_argument("--fidelities", help="image counts to prune on first, e.g. 64,256 (successive halving)")
        p.add_argument("--timeout", type=float, help="stop asking new orders after this many seconds")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--cache-mb", type=int, default=512, help="prefix activation cache budget in MiB (512)")
        p.add_argument("--norm", choices=("source", "target"), default="source", help="BatchNorm statistics (source)")
        p.add_argument("--reliability-orders", type=int, default=30,
                       help="orders re-scored on two data halves for the report's reliability (30; 0: skip)")
        p.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights")
        p.add_argument("--checkpoint", help="local weights file for the model")
        p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="timm: a model argument, e.g. --model-arg img_size=64 (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.set_defaults(handler=_run, command=command)

    e = subparsers.add_parser("export", help="write the order spec(s), trials table, report and plots of a study")
    e.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///runs/search/study.db")
    e.add_argument("--study", required=True, help="study name")
    e.add_argument("--top", type=int, default=1, help="also export the N best orders to orders/rank<i>.json")
    e.add_argument("--out", help="output folder (default: export-<study>)")
    e.add_argument("--bank", help="write specs through this bank (checked against the study's fingerprint)")
    e.set_defaults(handler=_export)


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["model_arg"] = tuple(values.get("model_arg") or ())
    return RunConfig(**values)


def _run(args: argparse.Namespace) -> int:
    import optuna

    from . import data as osdata
    from .adapters import load_bank, parse_model_args
    from .engine import get_objective
    from .order import Order
    from .report import held_out_scores, split_half_reliability, write_outputs
    from .search import SearchError, search, sqlite_url
    from .space import OrderSpace

    cfg = _config(args)
    if cfg.trials < 1 or cfg.batch_size < 1:
        raise SearchError("--trials and --batch-size must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = load_bank(cfg.bank, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                     **parse_model_args(cfg.model_arg))
    objective = get_objective(cfg.objective)
    data = osdata.load(cfg.data, bank.data_config, seed=cfg.seed)
    evalset = data.evalset(cfg.split, labelled=objective.needs_labels, seed=cfg.seed)
    if cfg.n_images is not None and cfg.n_images < len(evalset):
        evalset = evalset.subset(cfg.n_images, seed=cfg.seed)
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
    storage = cfg.storage or sqlite_url(out / "study.db")
    study_name = cfg.study or f"{cfg.command}-{cfg.objective}-{cfg.searcher}"
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "storage": storage, "study": study_name}, indent=2) + "\n")
    engine_kwargs: dict[str, Any] = {"cache_bytes": cfg.cache_mb * 2**20, "norm": cfg.norm}
    if cfg.device:
        engine_kwargs["device"] = cfg.device
    result = search(bank, evalset, objective, searcher=cfg.searcher, space=space, n_trials=cfg.trials,
                    batch_size=cfg.batch_size, storage=storage, study_name=study_name, seed=cfg.seed,
                    timeout=cfg.timeout, engine_kwargs=engine_kwargs, fidelities=fidelities,
                    progress=not args.no_progress)
    study = result.study
    if cfg.reliability_orders > 0:
        orders = [bank.identity] + [o for o, _ in result.top(cfg.reliability_orders)]
        study.set_user_attr("reliability", split_half_reliability(bank, evalset, objective, orders, **engine_kwargs))
    try:
        test = data.evalset("test", labelled=True, seed=cfg.seed)
        if objective.needs_labels and not test.has_labels:
            raise OrderSearchError("unlabelled test split")
        study.set_user_attr("held_out", held_out_scores(bank, test, objective, [bank.identity, result.best_order],
                                                        **engine_kwargs))
    except OrderSearchError as exc:
        log.info("no held-out scores: %s", exc)
    files = write_outputs(study, out, bank=bank)
    ident = "-" if result.identity_score is None else f"{result.identity_score:.4f}"
    print(f"best order {result.best_order} (depth {len(result.best_order)}): {cfg.objective} "
          f"{result.best_score:.4f} vs identity {ident}; {len(result.trials)} trials in study {study_name!r}")
    print(f"wrote {files['spec']}, {files['trials']}, {files['report']} and plots in {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import optuna

    from .report import write_outputs
    from .search import SearchError, make_storage

    if args.top < 1:
        raise SearchError("--top must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(args.storage)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"no study {args.study!r} in {args.storage}; studies there: {', '.join(names) or 'none'}") from None
    bank = None
    if args.bank:
        from .adapters import load_bank

        bank = load_bank(args.bank)
        fp = (study.user_attrs.get("ordersearch") or {}).get("fingerprint")
        if fp and fp != bank.fingerprint:
            raise SearchError(f"bank {args.bank} is not the bank study {args.study!r} searched (fingerprint differs)")
    out = Path(args.out or f"export-{args.study}")
    files = write_outputs(study, out, bank=bank, top=args.top)
    print(f"wrote {files['spec']}, {files['trials']}, {files['report']} and plots in {out}")
    return 0
