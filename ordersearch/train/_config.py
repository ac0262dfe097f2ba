"""Typed settings of bank training, loadable from JSON/YAML files plus ``key=value`` overrides."""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..adapters.compositional import CompositionalConfig, parse_block_arch
from ..errors import OrderSearchError, one_line
from ..order import Order
from ._mixing import TemperatureSchedule

__all__ = ["TaskSpec", "TrainConfig", "load_train_config"]

_NAME = re.compile(r"[A-Za-z_][\w.]*\Z")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task bank.

    Args:
        name: Short name (used for order specs, plots and ``bank.source_orders``).
        data: Data spec (``digits:rotate=30``, ``digits:classes=0-4``, a folder, ...).
        order: A fixed order for this task (no soft search), e.g. ``0-1-0-1``.
    """

    name: str
    data: str
    order: str | None = None

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | TaskSpec) -> TaskSpec:
        """``"digits:rotate=30"``, ``"rot=digits:rotate=30"``, or a dict with the fields."""
        if isinstance(value, TaskSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "data", "order"}
            if unknown or "data" not in value:
                raise OrderSearchError(f"task {dict(value)}: needs 'data' (and optional 'name', 'order'); "
                                       f"unknown keys {sorted(unknown)}")
            return cls(str(value.get("name") or _default_name(value["data"])), str(value["data"]),
                       None if value.get("order") is None else str(Order.parse(value["order"])))
        text = str(value).strip()
        head, sep, rest = text.partition("=")
        if sep and _NAME.match(head) and rest:
            return cls(head, rest)
        return cls(_default_name(text), text)


def _default_name(data: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "_", str(data)).strip("_")
    return name or "task"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`ordersearch.train.train_bank` (written resolved to ``config.json``).

    Args:
        tasks: The tasks, trained jointly (strings ``[name=]data-spec`` or :class:`TaskSpec`).
        arch: Block architecture: ``isoresnet[:width=..,in_chans=..,input_size=..]``, timm ViT
            blocks ``vit[:width=..,heads=..,patch=..,mlp_ratio=..]`` or a timm ViT's shape
            ``timm:vit_tiny_patch16_224[,patch=4,input_size=16,width=..]`` (see
            :func:`~ordersearch.adapters.compositional.parse_block_arch`).
        n_blocks: K, the number of shared blocks.
        depth: L, positions per order (default: ``len(order)`` or K); ``depth > K`` reuses blocks.
        order: A fixed order for every task (no soft search): ``order="0-1-0-1"`` with
            ``n_blocks=2`` is a 4-deep network of 2 blocks.
        stem: ``task`` (one stem per task) or ``shared``.
        head: ``task`` (one head per task) or ``shared`` (domains as tasks: same classes).
        norm: BatchNorm statistics per ``position``, per ``task`` and position, ``shared``,
            or ``auto``: ``task`` for several tasks, else ``position`` unless the order is
            fixed and uses each block once (then ``shared``). A bank runs task 0's
            statistics (``task_bank`` gives another task's view). ViT blocks normalise with
            LayerNorm, which keeps no statistics: ``auto`` is ``shared`` for them.
        affine: ``shared`` or ``slot`` (BatchNorm affine parameters per statistics slot too).
        mixing: ``outputs`` (weighted sum of block outputs) or ``weights`` (one block with
            mixed parameters).
        skip: Add a "skip this position" choice to the mixing logits.
        temperature: Softmax temperature schedule of the soft phase.
        gumbel: Add Gumbel noise to the logits while training.
        entropy: Weight of the mean mixing entropy in the loss (pushes towards hard orders).
        prune: Mixing weights below this are zeroed (and the rest renormalised).
        harden_epochs: Extra epochs with the hardened (argmax) orders, logits frozen.
        recalibrate: Re-estimate the per-position statistics under the hardened orders.
        epochs: Epochs of the soft phase.
        batch_size: Images per task per step.
        lr: Peak AdamW learning rate of blocks, stems and heads (cosine decay).
        warmup_epochs: Epochs over which that learning rate first rises linearly from zero
            (Vision Transformers trained from scratch want a few; 0: none).
        order_lr: AdamW learning rate of the mixing logits (no weight decay).
        weight_decay: AdamW weight decay of blocks, stems and heads.
        label_smoothing: Cross-entropy label smoothing.
        seed: Seed of initialisation, batch order, Gumbel noise and data shifts.
        device: ``cpu``, ``cuda`` or ``auto``.
        checkpoint_every: Save a resumable checkpoint every this many epochs (0: never).
        warm_start: An order spec to fine-tune (transfer): its bank, its order as the
            starting point of every task's order.
        finetune: With ``warm_start``: ``order`` (blocks frozen; order logits and head
            trained) or ``all`` (everything trained).
        threads: torch threads while training (default: as they are; recorded resolved in
            ``config.json``, as the weights a seed gives depend on it).

    Attributes:
        block_arch: ``arch`` parsed (:class:`~ordersearch.adapters.compositional.BlockArch`).

    Example:
        >>> cfg = TrainConfig.from_dict({"tasks": ["digits", "digits:invert"], "head": "shared"})
        >>> [t.name for t in cfg.tasks], cfg.resolved_norm
        (['digits', 'digits_invert'], 'task')
    """

    tasks: tuple[TaskSpec, ...] = ()
    arch: str = "isoresnet:width=16"
    n_blocks: int = 4
    depth: int | None = None
    order: str | None = None
    stem: str = "task"
    head: str = "task"
    norm: str = "auto"
    affine: str = "shared"
    mixing: str = "outputs"
    skip: bool = False
    temperature: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    gumbel: bool = False
    entropy: float = 0.0
    prune: float = 0.0
    harden_epochs: int = 0
    recalibrate: bool = True
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    warmup_epochs: float = 0.0
    order_lr: float = 0.05
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 1
    warm_start: str | None = None
    finetune: str = "order"
    threads: int | None = None

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, (str, Mapping, TaskSpec)):
            tasks = (tasks,)
        set_ = object.__setattr__
        set_(self, "tasks", tuple(TaskSpec.parse(t) for t in tasks))
        if isinstance(self.temperature, Mapping):
            set_(self, "temperature", TemperatureSchedule(**self.temperature))
        elif isinstance(self.temperature, (int, float)):
            set_(self, "temperature", TemperatureSchedule(float(self.temperature), float(self.temperature), "constant"))
        if self.order is not None:
            set_(self, "order", str(Order.parse(self.order)))
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise OrderSearchError(f"task names must be unique, got {names}")
        choices = {"stem": ("task", "shared"), "head": ("task", "shared"), "norm": ("auto", "shared", "position", "task"),
                   "affine": ("shared", "slot"), "mixing": ("outputs", "weights"), "finetune": ("order", "all")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise OrderSearchError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.threads is not None and self.threads < 1:
            raise OrderSearchError(f"threads must be >= 1, got {self.threads}")
        if self.warmup_epochs < 0:
            raise OrderSearchError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.n_blocks < 1 or self.epochs < 0 or self.harden_epochs < 0 or self.batch_size < 1:
            raise OrderSearchError("n_blocks and batch_size must be >= 1; epochs and harden_epochs >= 0")
        set_(self, "block_arch", parse_block_arch(self.arch))
        # the architecture's own rules (e.g. no statistics slots for LayerNorm blocks), before any data is read
        CompositionalConfig(**asdict(self.block_arch), norm=self.resolved_norm, affine=self.affine)
        for o in self.fixed_orders().values():
            if o is not None:
                o.validate(self.n_blocks)
                if len(o) != self.resolved_depth:
                    raise OrderSearchError(f"fixed order {o} has length {len(o)}, but depth is {self.resolved_depth}")

    # --- derived settings ---------------------------------------------------------------
    @property
    def resolved_depth(self) -> int:
        """L: ``depth``, else the fixed order's length, else K."""
        if self.depth is not None:
            return int(self.depth)
        fixed = [o for o in self.fixed_orders().values() if o is not None]
        return len(fixed[0]) if fixed else self.n_blocks

    def fixed_orders(self) -> dict[str, Order | None]:
        """Task name -> fixed order (None for tasks whose order is learned)."""
        out: dict[str, Order | None] = {}
        for t in self.tasks:
            text = t.order if t.order is not None else self.order
            out[t.name] = None if text is None else Order.parse(text)
        return out

    @property
    def resolved_norm(self) -> str:
        """``norm`` with ``auto`` resolved: ``task`` for several tasks (each task's batches
        are normalised on their own in training, so statistics shared across tasks would not
        match any of them), else ``position``, or ``shared`` when every order is fixed and
        runs each block once."""
        if self.norm != "auto":
            return self.norm
        if self.block_arch.family == "vit":
            return "shared"
        if len(self.tasks) > 1:
            return "task"
        fixed = list(self.fixed_orders().values())
        if fixed and all(o is not None and len(set(o)) == len(o) for o in fixed):
            return "shared"
        return "position"

    @property
    def soft(self) -> bool:
        """Whether any task learns its order."""
        return any(o is None for o in self.fixed_orders().values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (what ``config.json`` holds); ``from_dict`` reads it back."""
        d = asdict(self)
        d["tasks"] = [asdict(t) for t in self.tasks]
        return d

    def resolved(self) -> dict[str, Any]:
        """``to_dict`` plus the derived depth and norm, and the torch thread count training
        runs with (the weights a seed gives depend on it)."""
        return {**self.to_dict(), "resolved": {"depth": self.resolved_depth, "norm": self.resolved_norm,
                                               "threads": self.threads or torch.get_num_threads()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (as read from JSON/YAML); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k != "resolved"}
        unknown = set(data) - known
        if unknown:
            import difflib

            close = {k: difflib.get_close_matches(k, known, n=1) for k in sorted(unknown)}
            hint = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise OrderSearchError(f"unknown training settings {sorted(unknown)}" + (f" ({hint})" if hint else "")
                                   + f"; known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str]) -> TrainConfig:
        """A copy with ``{"epochs": 3}`` or ``["epochs=3", "temperature.end=0.01"]`` applied."""
        d = self.to_dict()
        for key, value in _override_items(overrides):
            target = d
            *path, last = key.split(".")
            for part in path:
                if not isinstance(target.get(part), dict):
                    raise OrderSearchError(f"override {key!r}: {part!r} is not a group of settings")
                target = target[part]
            if last not in target and target is d:
                raise OrderSearchError(f"override {key!r}: unknown setting")
            target[last] = value
        return TrainConfig.from_dict(d)


def load_train_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()
) -> TrainConfig:
    """Read a JSON or YAML file of :class:`TrainConfig` settings and apply overrides.

    Args:
        path: ``.json``, ``.yaml`` or ``.yml`` file, or None for the defaults.
        overrides: ``{"epochs": 3}`` or ``["epochs=3", "tasks=[digits,digits:invert=1]"]``
            (values are read as YAML, so lists and numbers work).
    """
    base: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OrderSearchError(f"training config {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise OrderSearchError(f"training config {path} is not text (byte {exc.start} is not UTF-8)") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                base = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise OrderSearchError(f"training config {path} is not valid YAML ({one_line(exc)})") from None
        else:
            try:
                base = json.loads(text)
            except json.JSONDecodeError as exc:
                raise OrderSearchError(f"training config {path} is not valid JSON (line {exc.lineno}, column "
                                       f"{exc.colno}); .yaml and .yml files are read as YAML") from None
        if not isinstance(base, dict):
            raise OrderSearchError(f"{path}: expected a mapping of settings")
    config = TrainConfig.from_dict(base) if base else TrainConfig()
    return config.with_overrides(overrides) if overrides else config


def _override_items(overrides: Mapping[str, Any] | Iterable[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    import yaml

    items = []
    for text in overrides:
        key, sep, value = str(text).partition("=")
        if not sep:
            raise OrderSearchError(f"override {text!r}: expected key=value")
        key = key.strip()
        if key == "tasks" and not value.strip().startswith("["):
            items.append((key, [v for v in value.split(";") if v.strip()]))
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        # data specs and orders stay text ("0-1-0-1" is not a date, "digits:invert" not a mapping)
        if key in ("order", "arch", "warm_start") or isinstance(parsed, dict):
            parsed = value.strip()
        items.append((key, parsed))
    return items


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if key == "tasks":
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if key == "temperature":
        return value
    origin = typing.get_args(hint)
    base = next((a for a in origin if a is not type(None)), hint) if origin else hint
    try:
        if base is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value) if not isinstance(value, Sequence) or isinstance(value, str) else str(Order(value))
    except (TypeError, ValueError):
        raise OrderSearchError(f"setting {key}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value

