from __future__ import annotations

import pickle
import random

import pytest

from ordersearch import SKIP, Order, OrderError, OrderSpace


def test_order_is_immutable_hashable_and_prints_dashed():
    o = Order([0, 1, 1, 3])
    assert str(o) == "0-1-1-3"
    assert repr(o) == "Order('0-1-1-3')"
    assert {o: 1}[Order((0, 1, 1, 3))] == 1
    assert o == (0, 1, 1, 3) and o == [0, 1, 1, 3]
    assert o[1:3] == Order([1, 1]) and isinstance(o[1:3], Order)
    with pytest.raises(AttributeError):
        o.foo = 1  # __slots__: no new attributes
    assert pickle.loads(pickle.dumps(o)) == o


@pytest.mark.parametrize("text", ["0-1-1-3", "0,1,1,3", "0 1 1 3", "[0, 1, 1, 3]", " 0-1-1-3 "])
def test_parse_text_and_json(text):
    assert Order.parse(text) == Order([0, 1, 1, 3])


def test_skip_is_normalised_away():
    assert Order([2, SKIP, 0, SKIP]) == Order([2, 0])


@pytest.mark.parametrize("bad", ["0-a-1", "[0, 1.5]", "{\"a\": 1}", "[0, -3]"])
def test_parse_rejects_bad_text(bad):
    with pytest.raises(OrderError):
        Order.parse(bad)


def test_validate_names_position_and_range():
    with pytest.raises(OrderError, match=r"position 2 uses block 7, but the bank has blocks 0\.\.3"):
        Order([0, 1, 7]).validate(4)
    with pytest.raises(OrderError, match="length 3 is outside the allowed 1..2"):
        Order([0, 1, 2]).validate(4, max_len=2)
    assert Order([3, 3]).validate(4) == Order([3, 3])


def test_space_validation_repeats_and_prefix():
    space = OrderSpace(4, max_len=6, max_repeats=2, prefix=(0,))
    assert space.validate("0-1-1-2") == Order([0, 1, 1, 2])
    with pytest.raises(OrderError, match="block 1 is used 3 times"):
        space.validate("0-1-1-1")
    with pytest.raises(OrderError, match="pinned prefix 0"):
        space.validate("1-0")
    with pytest.raises(OrderError, match="position 1 uses block 4"):
        space.validate("0-4")


def test_space_without_skip_has_fixed_length():
    space = OrderSpace(3, allow_skip=False)
    assert space.min_len == space.max_len == 3
    assert sorted(space.enumerate()) == sorted(Order(p) for p in __import__("itertools").permutations(range(3)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_blocks=3),
        dict(n_blocks=3, max_repeats=2, max_len=4),
        dict(n_blocks=4, max_repeats=None, max_len=3, min_len=2),
        dict(n_blocks=4, max_repeats=1, max_len=4, prefix=(2,)),
        dict(n_blocks=2, max_repeats=3, max_len=5, min_len=0),
    ],
)
def test_size_matches_enumeration_and_sampling_stays_inside(kwargs):
    space = OrderSpace(**kwargs)
    orders = list(space.enumerate())
    assert len(orders) == space.size() == len(set(orders))
    assert all(space.contains(o) for o in orders)
    rng = random.Random(0)
    assert all(space.contains(space.sample(rng)) for _ in range(200))


def test_sampling_is_uniform_over_the_space():
    space = OrderSpace(3, max_len=3, max_repeats=2)  # lengths 1..3 with repeats: uneven tree
    n = space.size()
    rng = random.Random(1)
    draws = 300 * n
    counts: dict[Order, int] = {}
    for _ in range(draws):
        o = space.sample(rng)
        counts[o] = counts.get(o, 0) + 1
    assert len(counts) == n
    expected = draws / n
    # chi-square-ish bound: every cell within 35% of its expectation at 300 draws per cell
    assert all(abs(c - expected) < 0.35 * expected for c in counts.values())


def test_sampling_is_seeded():
    space = OrderSpace(6, max_len=8, max_repeats=2)
    a = [space.sample(random.Random(5)) for _ in range(3)]
    b = [space.sample(random.Random(5)) for _ in range(3)]
    assert a == b


def test_enumeration_refuses_large_spaces():
    space = OrderSpace(12, max_len=12)
    with pytest.raises(OrderError, match="more than the limit"):
        next(space.enumerate(limit=1000))


def test_bad_spaces_are_refused():
    with pytest.raises(OrderError):
        OrderSpace(0)
    with pytest.raises(OrderError):
        OrderSpace(3, min_len=4, max_len=3)
    with pytest.raises(OrderError):
        OrderSpace(2, min_len=5, max_len=6, max_repeats=2)


def test_covering_space_holds_source_orders():
    sources = [Order([3, 3, 1, 1, 0, 0]), Order([0, 1])]
    space = OrderSpace.covering(4, sources)
    assert space.max_len == 6 and space.max_repeats == 2
    assert all(space.contains(o) for o in sources)
    # explicit settings win over widening
    assert OrderSpace.covering(4, sources, max_len=8, max_repeats=3).max_repeats == 3
    assert OrderSpace.covering(4).max_repeats == 1 and OrderSpace.covering(4).max_len == 4
