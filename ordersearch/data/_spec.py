"""Data specs: one string that names a dataset, its domain shifts and its subset.

Grammar::

    spec    := source [":" item ("," item)*]
    source  := "digits" | PATH          a folder (ImageFolder) or a .npz / .pt / .pth file
    item    := SHIFT "=" NUMBER         a domain shift; shifts apply in the written order
             | SHIFT                    a shift that has a default value (invert, thicken, thin)
             | OPTION "=" VALUE         classes, n, seed, split, norm (each at most once)
             | VALUE                    continues the list of the preceding classes=

    digits:rotate=25,noise=0.3          rotate, then add noise
    digits:classes=5-9,n=500            digits 5..9 only, 500 images over the three splits
    digits:classes=0,2,4,invert         a class list runs until the next NAME=... or shift
    photos/:classes=cat,dog             class names of a folder
    x.npz:norm=none                     x is already normalised for the bank
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from ..errors import DataError
from ._shifts import SHIFTS, _fmt, get_shift

__all__ = ["DataSpec", "parse_spec", "parse_shifts", "parse_split", "OPTIONS", "TENSOR_SUFFIXES"]

OPTIONS: dict[str, str] = {
    "classes": "class subset: names or indices, ranges a-b (e.g. classes=5-9 or classes=0,2,4)",
    "n": "number of images kept over train+val+test, stratified (e.g. n=500)",
    "seed": "seed of the random shifts such as noise (default: the seed given to load)",
    "split": "train/val/test proportions when the source is not pre-split (default split=60/20/20)",
    "norm": "norm=none: a tensor file that is already normalised for the bank (resized only)",
}
TENSOR_SUFFIXES = (".npz", ".pt", ".pth")
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
_NAME = re.compile(r"[A-Za-z_]\w*\Z")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec; ``str(spec)`` is its canonical text.

    Attributes:
        source: ``"digits"`` or the path as written.
        kind: ``"digits"``, ``"folder"`` or ``"tensors"``.
        shifts: ``(name, value)`` pairs in the order they apply.
        classes: Class tokens as written (names, indices or ``a-b`` ranges), or None for all.
        n: Number of images to keep over all splits, or None for all.
        seed: Seed of the random shifts, or None to use the seed given to ``load``.
        split: Train/val/test proportions (summing to 1), or None for the default.
        norm: False when a tensor file is already normalised for the bank.
    """

    source: str
    kind: str
    shifts: tuple[tuple[str, float], ...] = ()
    classes: tuple[str, ...] | None = None
    n: int | None = None
    seed: int | None = None
    split: tuple[float, float, float] | None = None
    norm: bool = True

    @property
    def is_random(self) -> bool:
        """Whether a shift draws random numbers (so the seed is part of the domain)."""
        return any(SHIFTS[name].random for name, _ in self.shifts)

    def with_seed(self, seed: int) -> DataSpec:
        """This spec with its shift seed filled in when it matters and is not given."""
        if self.seed is None and self.is_random:
            return replace(self, seed=int(seed))
        return self

    def __str__(self) -> str:
        items = [f"{name}={_fmt(value)}" for name, value in self.shifts]
        if self.classes is not None:
            items.append("classes=" + ",".join(self.classes))
        if self.n is not None:
            items.append(f"n={self.n}")
        if self.split is not None:
            items.append("split=" + "/".join(_fmt(round(100 * f, 9)) for f in self.split))
        if not self.norm:
            items.append("norm=none")
        if self.seed is not None:
            items.append(f"seed={self.seed}")
        return self.source + (":" + ",".join(items) if items else "")


def parse_spec(text: str | os.PathLike[str] | DataSpec) -> DataSpec:
    """Parse a data spec (see the module docstring for the grammar).

    Only the text is checked here; paths are opened by :func:`ordersearch.data.load`.

    Args:
        text: ``digits[:items]``, ``PATH[:items]`` (a ``pathlib.Path`` too), or a parsed DataSpec.

    Returns:
        The parsed spec; ``str()`` of it is the canonical form (numbers normalised, options
        after the shifts).

    Raises:
        DataError: Unknown shift or option, a value out of range, or a malformed item; the
            message lists the allowed choices.

    Example:
        >>> str(parse_spec("digits:rotate=25.0,noise=.3"))
        'digits:rotate=25,noise=0.3'
        >>> parse_spec("digits:classes=0,2,4,invert").classes
        ('0', '2', '4')
    """
    if isinstance(text, DataSpec):
        return text
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str) or not text.strip():
        raise DataError("empty data spec; give 'digits[:shifts]', a folder, or a .npz/.pt file")
    text = text.strip()
    head, _, tail = text.partition(":")
    if head.strip().lower() == "digits":
        source, kind, options = "digits", "digits", tail
    else:
        source, options = text, ""
        path, sep, rest = text.rpartition(":")
        if sep and path and (not rest.strip() or _looks_like_options(rest)):
            source, options = path, rest
        kind = "tensors" if source.lower().endswith(TENSOR_SUFFIXES) else "folder"
    return _parse_items(source, kind, options, text)


def parse_shifts(text: str) -> tuple[tuple[str, float], ...]:
    """Parse ``"rotate=30,noise=0.2"`` into ``(("rotate", 30.0), ("noise", 0.2))``."""
    spec = _parse_items("digits", "digits", text, text)
    if spec != DataSpec("digits", "digits", spec.shifts):
        raise DataError(f"{text!r} has options other than shifts; shifts: {', '.join(SHIFTS)}")
    return spec.shifts


def _looks_like_options(rest: str) -> bool:
    first = rest.split(",")[0].strip()
    return "=" in rest or first in SHIFTS


def _parse_items(source: str, kind: str, options: str, text: str) -> DataSpec:
    shifts: list[tuple[str, float]] = []
    found: dict[str, object] = {}
    in_classes = False
    for raw in options.split(",") if options.strip() else []:
        item = raw.strip()
        if not item:
            raise DataError(f"empty item in data spec {text!r}")
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq and in_classes and name not in SHIFTS:
            found["classes"].append(_class_token(name, text))  # type: ignore[union-attr]
            continue
        in_classes = False
        if not _NAME.match(name):
            raise DataError(f"malformed item {item!r} in data spec {text!r}; write NAME=VALUE")
        if name in SHIFTS:
            shifts.append((name, _shift_value(name, value if eq else None, text)))
            continue
        if name not in OPTIONS:
            raise DataError(
                f"unknown shift or option {name!r} in data spec {text!r}; "
                f"shifts: {', '.join(SHIFTS)}; options: {', '.join(OPTIONS)}"
            )
        if name in found:
            raise DataError(f"option {name!r} is given twice in data spec {text!r}")
        if not eq or not value:
            raise DataError(f"option {name!r} needs a value in data spec {text!r}: {OPTIONS[name]}")
        if name == "classes":
            found[name] = [_class_token(value, text)]
            in_classes = True
        elif name in ("n", "seed"):
            found[name] = _int(name, value, text, low=1 if name == "n" else 0)
        elif name == "split":
            split = _split(value, text)
            # the default written out is the default: one domain, one canonical spec
            found[name] = None if all(abs(a - b) < 1e-9 for a, b in zip(split, DEFAULT_SPLIT)) else split
        else:  # norm
            if value.lower() not in ("none", "data_config"):
                raise DataError(f"norm={value} in {text!r}: norm takes none or data_config")
            if value.lower() == "none" and kind != "tensors":
                raise DataError(f"norm=none in {text!r} is for .npz/.pt tensor files only")
            found[name] = value.lower() != "none"
    if "norm" in found and not found["norm"] and shifts:
        raise DataError(f"data spec {text!r}: shifts need images in [0, 1] and cannot follow norm=none")
    classes = found.get("classes")
    return DataSpec(
        source=source,
        kind=kind,
        shifts=tuple(shifts),
        classes=None if classes is None else tuple(classes),  # type: ignore[arg-type]
        n=found.get("n"),  # type: ignore[arg-type]
        seed=found.get("seed"),  # type: ignore[arg-type]
        split=found.get("split"),  # type: ignore[arg-type]
        norm=found.get("norm", True),  # type: ignore[arg-type]
    )


def _shift_value(name: str, value: str | None, text: str) -> float:
    shift = get_shift(name)
    if value is None or value == "":
        if shift.default is None:
            raise DataError(f"shift {name!r} needs a value in {text!r}: {name}=<{shift.param}>")
        return shift.default
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{name}={value} in {text!r} is not a number; {shift.usage()}") from None
    return shift.check(number)


def _int(name: str, value: str, text: str, *, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DataError(f"{name}={value} in {text!r} is not an integer; {name}: {OPTIONS[name]}") from None
    if number < low:
        raise DataError(f"{name}={value} in {text!r} must be at least {low}")
    return number


def parse_split(value: str, where: str = "split") -> tuple[float, float, float]:
    """``"60/20/20"`` -> ``(0.6, 0.2, 0.2)``: train (search), val (select) and test shares."""
    return _split(value, where)


def _split(value: str, text: str) -> tuple[float, float, float]:
    parts = value.split("/")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or any(not v > 0 for v in numbers):
        raise DataError(f"split={value} in {text!r}: give three positive train/val/test shares, e.g. split=60/20/20")
    total = sum(numbers)
    return tuple(v / total for v in numbers)  # type: ignore[return-value]


def _class_token(token: str, text: str) -> str:
    if not token or "=" in token:
        raise DataError(f"empty or malformed class in {text!r}; e.g. classes=5-9 or classes=0,2,4")
    return token
