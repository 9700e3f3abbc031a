"""Choosing the stages of a staged tiling (grid.stages: pure functions, no Keras)."""

import math

import pytest

from keras_fcn_surgery.errors import InternalError
from keras_fcn_surgery.grid import stages
from keras_fcn_surgery.grid.stages import cheapest_chain, memory_scale, place_stores, scaled_tile


def test_cheapest_chain():
    costs = {(0, 1): 1.0, (1, 3): 1.0, (0, 3): 5.0, (0, 2): 0.5, (2, 3): 3.0, (1, 2): 0.1}
    assert cheapest_chain(3, lambda i, j: costs.get((i, j))) == ([0, 1, 3], 2.0)
    costs[(1, 3)] = None
    assert cheapest_chain(3, lambda i, j: costs.get((i, j))) == ([0, 2, 3], 3.5)
    assert cheapest_chain(2, lambda i, j: None) == ([], math.inf)
    assert cheapest_chain(1, lambda i, j: 7.0) == ([0, 1], 7.0)


def test_memory_helpers():
    assert place_stores([100, 50, 60, 70], 120) == [True, False, True, False]
    assert place_stores([100, 10], 110) == [True, True]
    assert place_stores([], 0) == []
    assert memory_scale(100, 400) == 2.0 and memory_scale(0, 10) == 1.0
    assert scaled_tile((10, 20), 2.5, (100, 30)) == (25, 30)
    assert scaled_tile((10, 20), 0.01, (100, 30)) == (1, 1)


def test_equal_cost_chains_keep_the_first_found():
    # [0, 2] and [0, 1, 2] both cost 2: the chain with the earlier last cut (found first) is kept, fewer stages.
    costs = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 2.0}
    assert cheapest_chain(2, lambda i, j: costs.get((i, j))) == ([0, 2], 2.0)
    assert cheapest_chain(3, lambda i, j: 1.0 if j == i + 1 else None) == ([0, 1, 2, 3], 3.0)
    assert cheapest_chain(0, lambda i, j: 1.0) == ([0], 0.0)


def test_chains_read_back_through_a_broken_table_stop_with_an_internal_error():
    assert stages._chain_back([-1, 0, 1, 2], 3) == [0, 1, 2, 3]  # the longest chain: count + 1 boundaries
    with pytest.raises(InternalError, match=r"cheapest_chain\(count=1, previous=\[-1, 1\]\).*bug"):
        stages._chain_back([-1, 1], 1)  # boundary 1 its own predecessor: would loop for ever
    with pytest.raises(InternalError, match="ran past 4 iterations"):
        stages._chain_back([-1, 0, 3, 2], 3)


def test_memory_scale_and_stores_at_their_edges():
    assert memory_scale(1, 4) == 2.0 and memory_scale(4, 1) == 0.5
    # The previous map spilled: this one has the whole budget, and not one element more.
    assert place_stores([200, 100], 100) == [False, True]
    assert place_stores([200, 101], 100) == [False, False]
    # The previous map held: both must fit together.
    assert place_stores([50, 50], 100) == [True, True] and place_stores([50, 51], 100) == [True, False]
    assert scaled_tile((10, 20), 1.0, (10, 20)) == (10, 20) and scaled_tile((3,), 0.5, (9,)) == (1,)
