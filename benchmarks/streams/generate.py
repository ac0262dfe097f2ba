"""Order streams for the engine benchmark: what real searchers ask for, saved once and replayed.

Each stream is a list of batches, each batch the orders a searcher asked for at once and the
prefixes it will extend next (its ``retain`` hints: the population, the incumbent, the beam).
Streams are generated with a fixed seed, scoring candidates with the engine on a small subset
of the data, and saved as JSON so that replays (and their block-forward counts) are
deterministic whatever the machine.

    random     uniform samples from the order space, batches of 16
    tpe        Optuna's TPESampler over one categorical per position (a block id or SKIP),
               8 trials asked per batch
    evolution  regularized (aging) evolution: population 32, tournament of 8, one mutation
               (replace, swap, insert, delete, duplicate) per child, 16 children per batch
    local      hill climbing from the identity order, 16 neighbours per step
    beam       grows orders position by position keeping the 4 best prefixes
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from ordersearch import SKIP, Order, OrderSpace

Score = Callable[[list[Order]], list[float]]
Batch = dict[str, list[str]]


def mutate(order: Order, space: OrderSpace, rng: random.Random) -> Order:
    """One random valid mutation: replace, swap, insert, delete or duplicate a position."""
    ids = list(order)
    for _ in range(100):
        new = list(ids)
        op = rng.choice(["replace", "swap", "insert", "delete", "duplicate"])
        i = rng.randrange(len(new))
        if op == "replace":
            new[i] = rng.randrange(space.n_blocks)
        elif op == "swap" and len(new) > 1:
            j = rng.randrange(len(new))
            new[i], new[j] = new[j], new[i]
        elif op == "insert":
            new.insert(i, rng.randrange(space.n_blocks))
        elif op == "delete":
            del new[i]
        elif op == "duplicate":
            new.insert(i, new[i])
        if new != ids and space.contains(new):
            return Order(new)
    return space.sample(rng)


def _batch(orders: Sequence[Order], retain: Sequence[Order] = ()) -> Batch:
    return {"orders": [str(o) for o in orders], "retain": [str(o) for o in retain]}


def random_stream(space: OrderSpace, score: Score, n: int, seed: int) -> list[Batch]:
    rng = random.Random(seed)
    orders = [space.identity] + [space.sample(rng) for _ in range(n - 1)]
    return [_batch(orders[i : i + 16]) for i in range(0, n, 16)]


def tpe_stream(space: OrderSpace, score: Score, n: int, seed: int) -> list[Batch]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=16, constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    choices = [SKIP, *range(space.n_blocks)]
    assert space.max_len is not None
    study.enqueue_trial({f"p{i}": (i if i < space.n_blocks else SKIP) for i in range(space.max_len)})
    batches = []
    while sum(len(b["orders"]) for b in batches) < n:
        trials = [study.ask() for _ in range(8)]
        orders = []
        for t in trials:
            o = Order(t.suggest_categorical(f"p{i}", choices) for i in range(space.max_len))
            orders.append(o if len(o) else Order([0]))
        for t, v in zip(trials, score(orders)):
            study.tell(t, v)
        batches.append(_batch(orders))
    return batches


def evolution_stream(space: OrderSpace, score: Score, n: int, seed: int) -> list[Batch]:
    rng = random.Random(seed)
    pop = [space.identity] + [space.sample(rng) for _ in range(31)]
    values = score(pop)
    population = list(zip(pop, values))
    batches = [_batch(pop, pop)]
    while sum(len(b["orders"]) for b in batches) < n:
        children = []
        for _ in range(16):
            parent = max(rng.sample(population, 8), key=lambda pv: pv[1])[0]
            children.append(mutate(parent, space, rng))
        population = population[16:] + list(zip(children, score(children)))  # the oldest die
        batches.append(_batch(children, [o for o, _ in population]))
    return batches


def local_stream(space: OrderSpace, score: Score, n: int, seed: int) -> list[Batch]:
    rng = random.Random(seed)
    best = space.identity
    best_value = score([best])[0]
    batches = [_batch([best], [best])]
    while sum(len(b["orders"]) for b in batches) < n:
        neighbours = list(dict.fromkeys(mutate(best, space, rng) for _ in range(16)))
        values = score(neighbours)
        i = max(range(len(values)), key=values.__getitem__)
        if values[i] > best_value:
            best, best_value = neighbours[i], values[i]
        batches.append(_batch(neighbours, [best]))
    return batches


def beam_stream(space: OrderSpace, score: Score, n: int, seed: int, width: int = 4) -> list[Batch]:
    beam = [Order([])]
    batches: list[Batch] = []
    assert space.max_len is not None
    for _ in range(space.max_len):
        cands = [p + [b] for p in beam for b in range(space.n_blocks) if space.contains(p + [b])]
        if not cands or sum(len(b["orders"]) for b in batches) >= n:
            break
        values = score(cands)
        ranked = sorted(range(len(cands)), key=lambda i: -values[i])
        beam = [cands[i] for i in ranked[:width]]
        batches.append(_batch(cands, beam))
    return batches


GENERATORS = {
    "random": random_stream,
    "tpe": tpe_stream,
    "evolution": evolution_stream,
    "local": local_stream,
    "beam": beam_stream,
}


def save(path: Path, meta: dict, batches: list[Batch]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "batches": batches}, indent=1) + "\n")


def load(path: Path) -> tuple[dict, list[tuple[list[Order], list[Order]]]]:
    data = json.loads(path.read_text())
    batches = [([Order.parse(o) for o in b["orders"]], [Order.parse(o) for o in b["retain"]]) for b in data.pop("batches")]
    return data, batches
