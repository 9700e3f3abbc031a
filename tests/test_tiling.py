"""Tile planning (pure integer math) and the exact-cell rule of the geometry."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.grid import axis as gm
from keras_fcn_surgery.grid.tiling import balanced_tile_length, plan_axis, tile_length


def _check_plan(tiles, length, tile, stride, cells, before, after):
    """Every map cell written once, in order; each tile keeps only exact cells."""
    total = (length - tile) // stride + cells if tile < length else cells
    written = []
    for index, t in enumerate(tiles):
        assert t.start % stride == 0 and t.stop - t.start == min(tile, length) and t.stop <= length
        first, last = index == 0, index == len(tiles) - 1
        assert t.keep_start >= (0 if t.start == 0 else before)
        assert t.keep_stop <= (cells if t.stop == length else cells - after)
        assert t.out_start == t.start // stride + t.keep_start
        assert t.keep_start < t.keep_stop
        written.extend(range(t.out_start, t.out_stop))
        assert first == (t.start == 0) and last == (t.stop == length)
    assert written == list(range(total))


def test_tile_length_rounds_up_to_the_stride_and_adds_the_remainder():
    assert tile_length(64, 1000, 32) == 64 + 1000 % 32
    assert tile_length(65, 1000, 32) == 96 + 8
    assert tile_length(100, 96, 32) == 96  # no longer than the image
    assert tile_length(7, 50, 1) == 7
    with pytest.raises(ConversionError, match="positive"):
        tile_length(0, 50, 4)


def test_plan_axis_single_tile_when_the_image_fits():
    (only,) = plan_axis(40, 40, 8, 5, 1, 2)
    assert (only.start, only.stop, only.keep_start, only.keep_stop, only.out_start) == (0, 40, 0, 5, 0)


def test_plan_axis_worked_example():
    # stride 4, 10 cells per 40-pixel tile, 2 lost at an inner start and 3 at an inner end, image of 102.
    tiles = plan_axis(102, 42, 4, 10, 2, 3)
    assert [(t.start, t.keep_start, t.keep_stop, t.out_start) for t in tiles] == [
        (0, 0, 7, 0),
        (20, 2, 7, 7),
        (40, 2, 7, 12),
        (60, 2, 10, 17),
    ]
    _check_plan(tiles, 102, 42, 4, 10, 2, 3)


def test_plan_axis_refuses_unaligned_tiles_and_tiles_without_exact_cells():
    with pytest.raises(ConversionError, match="congruent"):
        plan_axis(100, 41, 4, 9, 1, 1)
    with pytest.raises(ConversionError, match="at least 48 pixels"):
        plan_axis(100, 40, 4, 5, 3, 3)


@settings(max_examples=300, deadline=None)
@given(
    stride=st.sampled_from([1, 2, 3, 4, 8, 16, 32]),
    blocks=st.integers(1, 12),
    length=st.integers(1, 2000),
    before=st.integers(0, 6),
    after=st.integers(0, 6),
    extra=st.integers(1, 8),
)
def test_plan_axis_covers_every_cell_once(stride, blocks, length, before, after, extra):
    tile = tile_length(blocks * stride, length, stride)
    cells = before + after + extra  # any tile length gives this many cells in this synthetic test
    tiles = plan_axis(length, tile, stride, cells, before, after)
    _check_plan(tiles, length, tile, stride, cells, before, after)


def test_balanced_tiles_are_shorter_but_as_few():
    # VGG16-like: stride 32, 26 cells from 1024 pixels, 3 + 3 lost at inner edges.
    assert balanced_tile_length(2048, 1024, 32, 26, 3, 3, 224) == 960
    assert len(plan_axis(2048, 960, 32, 24, 3, 3)) == len(plan_axis(2048, 1024, 32, 26, 3, 3)) == 3
    assert balanced_tile_length(900, 1024, 32, 26, 3, 3, 224) == 900
    assert balanced_tile_length(2048, 1024, 32, 6, 3, 3, 224) == 1024  # keeps no cell: left to plan_axis


@settings(max_examples=300, deadline=None)
@given(
    stride=st.sampled_from([1, 2, 4, 8, 32]),
    blocks=st.integers(2, 12),
    length=st.integers(1, 3000),
    before=st.integers(0, 6),
    after=st.integers(0, 6),
    head=st.integers(0, 6),
)
def test_balanced_tiles_never_need_more_tiles(stride, blocks, length, before, after, head):
    # A synthetic network: a tile of L pixels gives L // stride - head cells.
    def cells_of(pixels):
        return pixels // stride - head

    tile = tile_length(blocks * stride, length, stride)
    shortest = (head + before + after + 1) * stride + length % stride
    if tile >= length or cells_of(tile) - before - after < 1:
        return
    balanced = balanced_tile_length(length, tile, stride, cells_of(tile), before, after, shortest)
    assert shortest <= balanced <= tile and (length - balanced) % stride == 0
    original = plan_axis(length, tile, stride, cells_of(tile), before, after)
    shorter = plan_axis(length, balanced, stride, cells_of(balanced), before, after)
    assert len(shorter) <= len(original)
    _check_plan(shorter, length, balanced, stride, cells_of(balanced), before, after)


def test_exact_interval_through_a_same_convolution():
    # Inner tile of 20: a 3x3 'same' conv loses one cell at each side.
    state = gm.apply_window(gm.input_state(20, 0, 20), 3, 1, 1, "same")
    assert (state.exact_start, state.exact_stop) == (1, 19)
    # At the image's edges nothing is lost.
    state = gm.apply_window(gm.input_state(20), 3, 1, 1, "same")
    assert math.isinf(state.exact_start) and math.isinf(state.exact_stop)


def test_exact_interval_through_strides_padding_and_cropping():
    state = gm.input_state(33, 0, 33)
    state = gm.apply_window(state, 3, 2, 1, "same")  # 17 cells, pad 1 before: cells 1..15 exact
    assert (state.size, state.exact_start, state.exact_stop) == (17, 1, 16)
    state = gm.apply_padding(state, 2, 0)  # zeros before: shifted
    assert (state.exact_start, state.exact_stop) == (3, 18)
    state = gm.apply_padding(state, -4, 0)  # crop more than the padding
    assert (state.exact_start, state.exact_stop) == (0, 14)


def test_a_global_pooling_is_exact_only_over_the_whole_axis():
    inner = gm.apply_global(gm.input_state(20, 0, math.inf))
    assert inner.exact_start >= inner.exact_stop
    whole = gm.apply_global(gm.input_state(20))
    assert math.isinf(whole.exact_start) and math.isinf(whole.exact_stop)
    merged = gm.merge([gm.input_state(20, 0, math.inf), inner])
    assert merged.exact_start >= merged.exact_stop
