"""The ``ordersearch`` command line.

Bad input exits with code 2 and one line on stderr (no traceback); success exits with 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from .errors import OrderSearchError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ordersearch",
        description="Adapt pretrained isometric networks by searching the order of their frozen blocks.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train digits banks and reorder them for a new task and a held-out domain")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    from .demo import DemoConfig

    for f in fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                          help=f"default: {f.default}")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    info = sub.add_parser("info", help="blocks, shapes, parameters and fingerprint of a bank")
    info.add_argument("bank", help="bank file or folder, timm:<name>, or isoresnet:...")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights")
    info.add_argument("--checkpoint", help="local weights file for the model")
    info.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="timm: a model argument, e.g. --model-arg img_size=64 (repeatable)")

    from .cli_search import add_bank_options, add_commands

    show = sub.add_parser("show", help="print an order spec")
    show.add_argument("spec", help="order spec JSON file")
    add_bank_options(show, required=False)
    show.add_argument("--rebuild", action="store_true",
                      help="also rebuild the model the spec names (its bank file, or source and weights)")
    show.add_argument("--json", action="store_true", help="print the spec as JSON")

    train = sub.add_parser("train", help="train a bank the paper's way: shared blocks, per-task soft orders",
                           epilog=_train_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="JSON or YAML file of training settings (format below)")
    train.add_argument("--task", action="append", default=[], metavar="[NAME=]DATA",
                       help="a task's data spec (repeat for several tasks), e.g. rot=digits:rotate=30")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set epochs=5 --set temperature.end=0.01")
    train.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    train.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sub.add_parser("adapters", help="list the model families ordersearch can turn into banks")

    add_commands(sub)
    return p


_TRAIN_CONFIG_HELP = """\
--config FILE (.yaml/.yml read as YAML, anything else as JSON) is a mapping of settings;
unknown keys are errors, --task and --set override it. For example:

  tasks:                      # [name=]data-spec, or {name: .., data: .., order: ..}
    - digits
    - rot=digits:rotate=30
  n_blocks: 4                 # K shared blocks
  depth: 6                    # L positions per order (> K reuses blocks)
  epochs: 10
  temperature: {start: 1.0, end: 0.05, shape: cosine}
  threads: 1                  # torch threads: the weights a seed gives depend on it

Keys: %s.
Their meaning: the README's "Train banks the paper's way", or help(ordersearch.train.TrainConfig)."""


def _train_config_help() -> str:
    from .train import TrainConfig

    return _TRAIN_CONFIG_HELP % ", ".join(f.name for f in fields(TrainConfig))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ordersearch`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        handlers = {"demo": _demo, "info": _info, "show": _show, "adapters": _adapters, "train": _train}
        handler = getattr(args, "handler", None) or handlers[args.command]
        return handler(args)
    except OrderSearchError as exc:
        print(f"ordersearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ordersearch: interrupted", file=sys.stderr)
        return 130


def _progress_bar(enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}
    finished: set[str] = set()

    def update(stage: str, done: int, total: int) -> None:
        key = stage.split(" (")[0]
        if key in finished:  # later updates of a finished stage are ignored
            return
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(total=total, desc=key, leave=True, dynamic_ncols=True)
        bar.total = total
        bar.set_postfix_str(stage[len(key):].strip(" ()"), refresh=False)
        bar.update(done - bar.n)
        if done >= total:  # finished stages leave their final line and free the screen row
            bar.close()
            finished.add(key)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
    config = replace(DemoConfig(), **overrides)
    update, close = _progress_bar(not args.no_progress)
    try:
        result = run_demo(config, args.out, progress=update)
    finally:
        close()
    print(f"\ntransfer bank: {config.bank} trained on {config.source} (test accuracy {result.source_accuracy:.3f}); "
          "multi-source bank: " + ", ".join(f"{k} {v['order']} ({v['test_accuracy']:.3f})"
                                             for k, v in result.sources.items())
          + (" (both reused)" if result.bank_reused else ""))
    rows = []
    for name, p in result.parts.items():
        rows.append([name, p.settings.get("data"), f"test {p.truth}", str(p.baseline.order), _fmt(p.baseline.test),
                     str(p.chosen.order), _fmt(p.chosen.test)])
    print(_table(["part", "data", "metric", "baseline", "score", "chosen order", "score"], rows))
    a = result.parts["adapt"]
    if result.comparison:
        first = next(iter(result.sources), "?")
        print(f"\nadapt, test accuracy on {a.settings.get('data')} (labels used for this table only):")
        rows = [[f"unmodified {first} model", str(a.baseline.order), _fmt(a.reference)],
                [f"AdaBN ({first} order, target statistics)", str(a.baseline.order), _fmt(a.baseline.test)]]
        rows += [[f"source order {r['name']}" if r["kind"] == "source" else r["name"], r["order"],
                  _fmt(r["test"])] for r in result.comparison]
        print(_table(["model", "order", "test accuracy"], rows))
    for name, p in result.parts.items():
        print(f"{name} verdict: {p.summary()}")
    print(f"\nwrote {result.files['report']}, {result.files['search/spec']}, {result.files['adapt/spec']} "
          f"in {result.seconds:.0f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import load_train_config, train_bank

    overrides = list(args.set)
    if args.task:
        overrides.append("tasks=" + json.dumps(args.task))
    config = load_train_config(args.config, overrides)
    if not config.tasks:
        raise OrderSearchError("no tasks: pass --task DATA (one or more) or a --config file with tasks")
    update, close = _progress_bar(not args.no_progress)
    try:
        result = train_bank(config, out=args.out, progress=update, resume=not args.restart)
    finally:
        close()
    rows = []
    for name, order in result.orders.items():
        m = result.metrics.get(name, {})
        rows.append([name, str(order), _fmt(m.get("soft_test_accuracy")), _fmt(m.get("final_test_accuracy")),
                     _fmt(m.get("top_weight"))])
    print()
    print(_table(["task", "hardened order", "soft test acc", "final test acc", "top weight"], rows))
    print(f"\nwrote {result.out}/bank.safetensors, orders/, report.md in {result.seconds:.0f} s")
    return 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _info(args: argparse.Namespace) -> int:
    from .adapters import load_bank, parse_model_args

    bank = load_bank(args.bank, pretrained=args.pretrained, checkpoint=args.checkpoint,
                     **parse_model_args(args.model_arg))
    info = bank.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ["source", info["source"]],
        ["adapter", info["adapter"]],
        ["blocks (K)", info["n_blocks"]],
        ["block shape", " x ".join(map(str, info["block_shape"] or []))],
        ["input size", " x ".join(map(str, info["input_size"]))],
        ["parameters per block", f"{info['block_parameters']:,}"],
        ["parameters in blocks", f"{info['blocks_parameters']:,}"],
        ["parameters in total", f"{info['total_parameters']:,}"],
        ["classes (source head)", info["num_classes"]],
        ["fingerprint", info["fingerprint"]],
    ]
    for name, order in info["source_orders"].items():
        rows.append([f"source order {name!r}", order])
    print(_table(["", ""], rows, header=False))
    return 0


def _show(args: argparse.Namespace) -> int:
    from .cli_search import bank_from_args
    from .spec import load_order

    bank = bank_from_args(args) if args.bank else None
    spec = load_order(args.spec, bank)
    if args.rebuild and bank is None:
        bank = spec.load_bank()
    if args.json:
        print(json.dumps(spec.to_json(), indent=2))
        return 0
    rows = [
        ["order", f"{spec.order}  (depth {len(spec.order)})"],
        ["bank", spec.bank.get("path") or spec.bank.get("source") or spec.bank.get("adapter")],
        ["bank fingerprint", spec.bank["fingerprint"][:16] + ("  (matches the bank)" if bank is not None else "")],
        ["objective", spec.objective],
        ["score", "-" if spec.score is None else f"{spec.score:.4f}"],
        ["searcher", spec.searcher],
        ["study", spec.study],
        ["data", spec.data if isinstance(spec.data, str) else json.dumps(spec.data)],
        ["created", spec.created],
    ]
    for key, value in sorted(spec.metrics.items()):
        rows.append([f"  {key}", f"{value:.4f}" if isinstance(value, float) else value])
    summary = (spec.metadata.get("evidence") or {}).get("summary")
    if summary:
        rows.append(["verdict", summary])
    print(_table(["", ""], [r for r in rows if r[1] is not None], header=False))
    return 0


def _adapters(args: argparse.Namespace) -> int:
    from .adapters import list_adapters

    print(_table(["adapter", "models"], [[a.name, a.description] for a in list_adapters()]))
    return 0


def _table(head: list[str], rows: list[list[Any]], *, header: bool = True) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(head)]
    lines = []
    if header:
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
