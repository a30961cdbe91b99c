"""reference_specs.sampling: the one way bounded checks pick a few of many (layers, row tiles)."""

from __future__ import annotations

from reference_specs.sampling import spread, spread_indices


def test_spread_takes_first_and_last_and_spaces_the_rest_evenly():
    # 10 layers, 3 picks: 0, 4.5 -> 4 (round half to even), 9
    assert spread_indices(10, 3) == [0, 4, 9]
    assert spread(list("abcdefghij"), 3) == ["a", "e", "j"]
    assert spread_indices(5, 2) == [0, 4]


def test_spread_of_as_many_or_more_than_there_are_is_everything():
    assert spread_indices(4, 4) == [0, 1, 2, 3]
    assert spread(["x", "y"], 5) == ["x", "y"]


def test_one_pick_is_the_first():
    assert spread_indices(7, 1) == [0]
