"""Fixed-position encoding of orders for Optuna samplers.

Optuna samplers propose one value per named parameter. An order of a space with
``max_len = L`` and a pinned prefix of length ``P`` is encoded as ``L - P`` positions
``pos_0 .. pos_{L-P-1}``, each a categorical over the block ids and, when the space allows
skips, :data:`~ordersearch.SKIP`. :class:`~ordersearch.Order` drops the skips.

Not every assignment is a valid order (a block used more than ``max_repeats`` times, too few
positions kept). Such proposals are **repaired**, deterministically, never failed: a block
over its repeat cap becomes a skip, and if the order is then shorter than ``min_len`` the
freed positions are refilled, earliest first, with the lowest block id that still has
capacity. The repair is many-to-one, but a fixed function of the parameters, so a model-based
sampler still sees a consistent objective of its parameters; the trial keeps the sampled
parameters and records the repaired order (user attribute ``order``) and ``repaired=True``.
Failing invalid proposals instead would spend most of a small budget on them: with K=4 and
``max_repeats=1`` fewer than one uniform assignment in three is valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from ..order import SKIP, Order
from ..space import OrderSpace

__all__ = ["OrderEncoding", "is_live", "order_of"]


class OrderEncoding:
    """Maps orders of ``space`` to Optuna parameters and back.

    Args:
        space: The order space.

    Example:
        >>> enc = OrderEncoding(OrderSpace(3, max_len=4, max_repeats=2))
        >>> enc.params(Order("2-0"))
        {'pos_0': 2, 'pos_1': 0, 'pos_2': -1, 'pos_3': -1}
        >>> enc.decode({"pos_0": 1, "pos_1": 1, "pos_2": 1, "pos_3": -1})
        Order('1-1')
    """

    def __init__(self, space: OrderSpace) -> None:
        self.space = space
        assert space.max_len is not None
        self.n_positions = space.max_len - len(space.prefix)
        choices: tuple[int, ...] = tuple(range(space.n_blocks))
        if space.allow_skip:
            choices = choices + (SKIP,)
        self.choices = choices
        self.names = [f"pos_{i}" for i in range(self.n_positions)]
        self.distribution = CategoricalDistribution(choices)

    @property
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """The search space, as Optuna distributions."""
        return {n: self.distribution for n in self.names}

    def params(self, order: Order) -> dict[str, int] | None:
        """Parameters that decode to ``order``, or None when it is not representable
        (outside the space, e.g. the identity of a bank deeper than ``max_len``)."""
        if not self.space.contains(order):
            return None
        tail = list(order)[len(self.space.prefix):]
        return dict(zip(self.names, tail + [SKIP] * (self.n_positions - len(tail))))

    def record(self, trial: optuna.Trial, order: Order) -> None:
        """Record ``order``'s parameters in a new trial as if its sampler had suggested them
        (nothing for an order the space cannot represent)."""
        params = self.params(order)
        for name, value in (params or {}).items():
            trial.storage.set_trial_param(trial._trial_id, name, self.distribution.to_internal_repr(value),
                                          self.distribution)

    def raw(self, params: Mapping[str, Any]) -> Order:
        """The order the parameters spell, before repair (may be outside the space)."""
        return Order(self.space.prefix + tuple(int(params.get(n, SKIP)) for n in self.names))

    def decode(self, params: Mapping[str, Any]) -> Order:
        """The repaired order of ``params`` (always in the space)."""
        space = self.space
        cap = space.max_repeats
        used = Order(space.prefix).counts()
        tail: list[int] = []
        freed: list[int] = []  # indices into tail of positions dropped by the repair
        for name in self.names:
            b = int(params.get(name, SKIP))
            if b != SKIP and (cap is None or used.get(b, 0) < cap):
                used[b] = used.get(b, 0) + 1
                tail.append(b)
            else:
                if b != SKIP or not space.allow_skip:
                    freed.append(len(tail))
                tail.append(SKIP)
        length = len(space.prefix) + sum(t != SKIP for t in tail)
        for idx in freed:
            if length >= space.min_len:
                break
            b = next(b for b in range(space.n_blocks) if cap is None or used.get(b, 0) < cap)
            used[b] = used.get(b, 0) + 1
            tail[idx] = b
            length += 1
        while length < space.min_len:  # only reachable when skips were sampled
            idx = tail.index(SKIP)
            b = next(b for b in range(space.n_blocks) if cap is None or used.get(b, 0) < cap)
            used[b] = used.get(b, 0) + 1
            tail[idx] = b
            length += 1
        return Order(space.prefix + tuple(tail))

    def suggest(self, trial: optuna.Trial) -> Order:
        """Ask the trial's sampler for every position; record and return the repaired order."""
        params = {n: trial.suggest_categorical(n, self.choices) for n in self.names}
        order = self.decode(params)
        trial.set_user_attr("order", str(order))
        if order != self.raw(params):
            trial.set_user_attr("repaired", True)
        return order


def order_of(trial: FrozenTrial, encoding: OrderEncoding | None = None) -> Order | None:
    """The order a trial evaluated: its ``order`` user attribute, else its decoded
    parameters (a running trial whose sampler has proposed but not yet recorded it)."""
    text = trial.user_attrs.get("order")
    if text is not None:
        return Order.parse(text)
    if encoding is not None and all(n in trial.params for n in encoding.names):
        return encoding.decode(trial.params)
    return None


def is_live(trial: FrozenTrial) -> bool:
    """False for a trial failed by an interruption or a dead worker (its order was never
    scored and may be proposed again); True for every other trial."""
    return trial.state != TrialState.FAIL or "failed" in trial.user_attrs
