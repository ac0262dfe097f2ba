"""What the studies share: parameter counts and the mean ± sd cells of their tables.

Each study's ``run.py`` puts this folder on ``sys.path`` (they run as scripts).
"""

from __future__ import annotations

import statistics
from typing import Any


def n_params(bank: Any) -> int:
    """Trainable weights of a trained bank's network (the order logits, a few dozen numbers
    that only soft training uses, left out)."""
    return sum(p.numel() for n, p in bank.model.named_parameters() if n != "logits")


def pm(v: list[float]) -> str:
    """Mean ± sample standard deviation over seeds, in points (the mean alone for one seed)."""
    m = statistics.mean(v)
    return f"{100 * m:.1f}" + (f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else "")
