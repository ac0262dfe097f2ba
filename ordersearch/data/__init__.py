"""Data for order search: digits domains, image folders and tensor files, from one spec string.

The embedded default is scikit-learn's handwritten digits with named domain shifts
(``digits:rotate=40``, ``digits:invert``, ``digits:rotate=25,noise=0.3``): the new domains
that Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963) adapt a bank to by reordering its
blocks. Every dataset comes as fixed, seeded, stratified train/val/test splits that do not
depend on the shifts, preprocessed with the bank's data config (size, mean, std).

Example:
    >>> from ordersearch.data import load
    >>> source = load("digits")
    >>> target = load("digits:rotate=40")
    >>> bool((source.val[1] == target.val[1]).all())  # same digits, new domain
    True
"""

from __future__ import annotations

from ._data import Data, Split
from ._digits import WORK_SIZE, digits_images
from ._load import load
from ._prep import DEFAULT_DATA_CONFIG, stratified_split
from ._shifts import SHIFTS, Shift, apply_shifts, describe_shifts, register_shift
from ._spec import OPTIONS, DataSpec, parse_spec, parse_split

__all__ = [
    "DEFAULT_DATA_CONFIG",
    "Data",
    "DataSpec",
    "OPTIONS",
    "SHIFTS",
    "Shift",
    "Split",
    "WORK_SIZE",
    "apply_shifts",
    "describe_shifts",
    "digits_images",
    "load",
    "parse_spec",
    "parse_split",
    "register_shift",
    "stratified_split",
]
