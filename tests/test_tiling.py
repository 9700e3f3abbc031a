"""Tile planning (pure integer math) and the exact-cell rule of the geometry."""

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from keras_fcn_surgery.errors import ConversionError, InputError, InternalError
from keras_fcn_surgery.grid import axis as gm
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.tiling import AxisTile, balanced_tile_length, plan_axis, plan_pixels, tile_length


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


@st.composite
def balanced_cases(draw, min_extra_blocks=0):
    """A synthetic network (a tile of L pixels gives L // stride - head cells), its margins, and a tile shorter
    than the image that keeps at least one cell: every case reaches the balancing property.

    Returns ``(stride, length, tile, before, after, head, shortest)``: ``tile`` as `tile_length` gives it and
    ``shortest`` the network's minimum (at least one kept cell, plus ``min_extra_blocks`` or more strides).
    """
    stride = draw(st.sampled_from([1, 2, 4, 8, 32]))
    before, after, head = draw(st.integers(0, 6)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    remainder = draw(st.integers(0, stride - 1))  # the image's length modulo the stride
    low = head + before + after + 1 + draw(st.integers(min_extra_blocks, min_extra_blocks + 20))
    shortest = low * stride + remainder
    blocks = low + draw(st.integers(0, 12))
    length = (blocks + draw(st.integers(1, 3000 // stride))) * stride + remainder
    tile = tile_length(blocks * stride, length, stride)
    assert tile == blocks * stride + remainder < length
    return stride, length, tile, before, after, head, shortest


@settings(max_examples=300, deadline=None)
@given(case=balanced_cases())
def test_balanced_tiles_never_need_more_tiles(case):
    stride, length, tile, before, after, head, shortest = case

    def cells_of(pixels):
        return pixels // stride - head

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


# --- the gaps mutation testing found (issue 29), and the planning loop's bound --------------------------------


def test_a_tile_as_long_as_the_image_is_one_tile_even_when_its_margins_take_every_cell():
    # tile_length returns the length itself for a small image; its margins do not matter (no inner edge).
    assert tile_length(224, 100, 32) == 100
    (only,) = plan_axis(100, 100, 32, 3, 2, 2)
    assert (only.start, only.stop, only.keep_start, only.keep_stop, only.out_start) == (0, 100, 0, 3, 0)
    assert plan_pixels(50, 50, 30, 8) == [AxisTile(0, 50, 0, 50, 0)]


def test_a_tile_whose_cells_all_lie_in_its_margins_is_refused_not_looped_on():
    # step == 0: cells equal the two margins; the next tile would start where this one did.
    with pytest.raises(InputError, match="at least 44 pixels"):
        plan_axis(100, 40, 4, 5, 2, 3)
    # step == cells_per_stride - 1 for a per-pixel map: each tile would keep less than one stride.
    with pytest.raises(InputError, match="at least 40 pixels"):
        plan_axis(100, 36, 4, 36, 16, 17, cells_per_stride=4)


def test_balancing_down_to_two_tiles():
    # 100 pixels, stride 1, tiles of 60 with 5 + 5 lost: 2 tiles; 55 pixels still keep 2 tiles (50 + 50 >= 100).
    balanced = balanced_tile_length(100, 60, 1, 60, 5, 5, 11)
    assert balanced == 55
    assert len(plan_axis(100, balanced, 1, balanced, 5, 5)) == len(plan_axis(100, 60, 1, 60, 5, 5)) == 2
    assert balanced_tile_length(100, 60, 1, 60, 5, 5, 58) == 58  # never below the network's minimum


def test_plan_pixels_worked_example():
    # 100 pixels, period 4, tiles of up to 42 (40 is congruent to 100 mod 4), 6 lost at each inner edge.
    tiles = plan_pixels(100, 42, 6, 4)
    assert [(t.start, t.stop, t.keep_start, t.keep_stop, t.out_start) for t in tiles] == [
        (0, 40, 0, 34, 0),
        (28, 68, 6, 34, 34),
        (56, 96, 6, 34, 62),
        (60, 100, 30, 40, 90),
    ]
    with pytest.raises(InputError, match="at least 16 pixels"):
        plan_pixels(100, 15, 6, 4)


def test_plan_axis_stops_with_an_internal_error_past_its_bound(monkeypatch):
    # A broken step (every tile clamped back to origin 0) would plan tiles forever: the loop stops at `total`.
    calls = []

    def stuck(origin, last_origin):
        calls.append(origin)
        return 0

    monkeypatch.setattr(tiling, "min", stuck, raising=False)
    with pytest.raises(InternalError, match=r"plan_axis\(length=102, tile=42, .*bug in keras_fcn_surgery"):
        plan_axis(102, 42, 4, 10, 2, 3)
    assert len(calls) == (102 - 42) // 4 + 10  # exactly `total` tiles planned, not one more


@st.composite
def axis_cases(draw, refused=False):
    """``(stride, length, tile, cells, before, after, k)`` for `plan_axis` with ``k`` cells per stride (k =
    stride: a per-pixel map): with ``refused``, an inner tile that keeps less than a stride (refused); else a
    plan (one tile, or inner tiles keeping at least a stride)."""
    stride, k = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32])), draw(st.integers(1, 8))
    before = draw(st.integers(0, 40))
    if refused:
        blocks = draw(st.integers(1, 6))
        remainder = draw(st.integers(0, stride - 1))
        cells = (blocks + (remainder > 0)) * k
        after = max(0, cells - k + 1 - before) + draw(st.integers(0, 5))  # cells - before - after < k
    else:
        after = draw(st.integers(0, 40))
        least = -(-(before + after + k) // k)  # the blocks that keep a stride's cells between the margins
        blocks = draw(st.integers(least, least + 12))
        remainder = draw(st.integers(0, stride - 1))
    if refused or draw(st.booleans()):  # inner tiles
        length = (blocks + draw(st.integers(1, 2000 // stride + 1))) * stride + remainder
    else:  # an image no longer than the tile: one tile, whatever the margins
        length = draw(st.integers(1, blocks * stride + remainder))
    tile = tile_length(blocks * stride, length, stride)
    cells = -(-tile // stride) * k
    return stride, length, tile, cells, before, after, k


@settings(max_examples=300, deadline=None)
@given(case=axis_cases())
def test_every_tile_lies_in_the_image_and_every_cell_is_written_once(case):
    # A map of `k` cells per stride (k = stride: a per-pixel map), of `cells` cells per tile.
    stride, length, tile, cells, before, after, k = case
    total = (length - tile) // stride * k + cells if tile < length else cells
    tiles = plan_axis(length, tile, stride, cells, before, after, cells_per_stride=k)
    written = []
    for t in tiles:
        assert 0 <= t.start < t.stop <= length and t.start % stride == 0 and t.stop - t.start == min(tile, length)
        assert t.keep_start >= (0 if t.start == 0 else before)
        assert t.keep_stop <= (cells if t.stop == length else cells - after)
        assert t.out_start == t.start // stride * k + t.keep_start and t.keep_start < t.keep_stop
        written.extend(range(t.out_start, t.out_stop))
    assert written == list(range(total))


@settings(max_examples=100, deadline=None)
@given(case=axis_cases(refused=True))
def test_an_inner_tile_that_keeps_less_than_a_stride_is_refused_with_a_length_that_works(case):
    stride, length, tile, cells, before, after, k = case
    assert tile < length and cells - before - after < k
    with pytest.raises(InputError, match="Use tiles of at least") as refused:
        plan_axis(length, tile, stride, cells, before, after, cells_per_stride=k)
    needed = int(str(refused.value).split("at least ")[1].split()[0])
    assert needed > tile and (needed - tile) % stride == 0  # the way out: aligned like the tile, and enough
    more = -(-needed // stride) * k
    assert more - before - after >= k or needed >= length


@st.composite
def pixel_cases(draw):
    """``(period, length, tile, margin, size)``: a per-pixel map's axis cut into inner tiles of ``size`` pixels,
    the longest up to ``tile`` congruent to ``length``, each keeping at least a period between its margins."""
    period, margin = draw(st.sampled_from([1, 2, 4, 8, 16, 32])), draw(st.integers(0, 60))
    size = 2 * margin + period + draw(st.integers(0, 300))
    length = size + period * draw(st.integers(1, 1500 // period))
    return period, length, size + draw(st.integers(0, period - 1)), margin, size


@settings(max_examples=300, deadline=None)
@given(case=pixel_cases())
def test_plan_pixels_is_plan_axis_with_one_cell_per_pixel(case):
    period, length, tile, margin, size = case
    tiles = plan_pixels(length, tile, margin, period)
    assert tiles[0].stop == size and (length - size) % period == 0 and size + period > tile  # the longest allowed
    assert tiles == plan_axis(length, size, period, size, margin, margin, cells_per_stride=period)
    written = []
    for t in tiles:
        assert 0 <= t.start < t.stop <= length and t.start % period == 0
        assert t.keep_start >= (0 if t.start == 0 else margin)
        assert t.keep_stop <= size - (0 if t.stop == length else margin)
        assert t.out_start == t.start + t.keep_start  # a pixel map: a tile's cell j is the image's pixel start + j
        written.extend(range(t.out_start, t.out_stop))
    assert written == list(range(length))


@settings(max_examples=100, deadline=None)
@given(
    period=st.sampled_from([1, 2, 4, 8, 16, 32]),
    length=st.integers(1, 1500),
    longer=st.integers(0, 100),
    margin=st.integers(0, 60),
)
def test_plan_pixels_gives_one_tile_when_the_image_fits(period, length, longer, margin):
    assert plan_pixels(length, length + longer, margin, period) == [AxisTile(0, length, 0, length, 0)]


@st.composite
def thin_pixel_tiles(draw):
    """``(period, length, tile, margin)``: an inner tile whose longest congruent length keeps less than a period."""
    period = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    margin = draw(st.integers(1 if period == 1 else 0, 60))  # (a period of 1 and no margin keeps any tile)
    size = draw(st.integers(2 - period, 2 * margin + period - 1))  # congruent to the length; < 1: none fits
    length = max(size, 0) + period * draw(st.integers(1, 1500 // period))
    tile = size + draw(st.integers(max(0, 1 - size), period - 1))  # size: the longest <= tile congruent to length
    return period, length, tile, margin


@settings(max_examples=100, deadline=None)
@given(case=thin_pixel_tiles())
def test_a_pixel_tile_too_thin_to_keep_a_period_is_refused_with_a_length_that_works(case):
    period, length, tile, margin = case
    assert tile < length
    with pytest.raises(InputError, match="Use tiles of at least") as refused:
        plan_pixels(length, tile, margin, period)
    needed = int(str(refused.value).split("at least ")[1].split()[0])
    assert needed > tile and plan_pixels(length, needed, margin, period)  # the way out plans tiles


@settings(max_examples=300, deadline=None)
@given(case=balanced_cases())
def test_balancing_never_adds_tiles_and_stays_within_its_bounds(case):
    stride, length, tile, before, after, head, shortest = case

    def cells_of(pixels):
        return pixels // stride - head

    balanced = balanced_tile_length(length, tile, stride, cells_of(tile), before, after, shortest)
    assert (length - balanced) % stride == 0 and shortest <= balanced <= tile
    assert cells_of(balanced) - before - after >= 1  # the minimum keeps a cell, so the balanced tile does
    original = plan_axis(length, tile, stride, cells_of(tile), before, after)
    shorter = plan_axis(length, balanced, stride, cells_of(balanced), before, after)
    assert len(shorter) <= len(original)
    if balanced > shortest:  # not held up by the minimum: one stride shorter needs more tiles
        one_less = balanced - stride
        assert cells_of(one_less) - before - after >= 1
        assert len(plan_axis(length, one_less, stride, cells_of(one_less), before, after)) > len(original)
    else:
        event("held up by the minimum")


@settings(max_examples=100, deadline=None)
@given(
    stride=st.sampled_from([1, 2, 4, 8, 32]),
    remainder=st.integers(0, 31),
    strides=st.integers(1, 90),
    longer=st.integers(0, 100),
    before=st.integers(0, 6),
    after=st.integers(0, 6),
    head=st.integers(1, 6),  # (no head and no margins: every tile keeps a cell)
)
def test_balancing_keeps_a_tile_of_the_image_or_one_without_kept_cells(
    stride, remainder, strides, longer, before, after, head
):
    def cells_of(pixels):
        return pixels // stride - head

    blocks = head + before + after  # cells_of = blocks - head <= before + after: no kept cell
    length = (blocks + strides) * stride + remainder % stride
    # A tile as long as the image: the image.
    whole = tile_length(length + longer, length, stride)
    assert balanced_tile_length(length, whole, stride, cells_of(whole), before, after, 1) == length
    # An inner tile whose cells all lie in its margins: kept as it is (plan_axis refuses it by name).
    tile = tile_length(blocks * stride, length, stride)
    assert tile < length and cells_of(tile) - before - after < 1
    assert balanced_tile_length(length, tile, stride, cells_of(tile), before, after, 1) == tile


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    seed=st.integers(0, 1000),
    boxes=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)), max_size=4),
)
def test_box_counts_and_pixels_read_are_brute_force_sums(rows, cols, seed, boxes):
    mask = np.random.default_rng(seed).random((rows, cols)) < 0.5
    tops, bottoms, lefts, rights = [], [], [], []
    for a, b, c, d in boxes:
        tops.append(min(a, b, rows)), bottoms.append(min(max(a, b), rows))
        lefts.append(min(c, d, cols)), rights.append(min(max(c, d), cols))
    if not boxes:
        tops, bottoms, lefts, rights = [1], [rows], [1], [cols]
    counts = tiling.box_counts(mask, tops, bottoms, lefts, rights)
    expected = [[mask[t:b, left:right].sum() for left, right in zip(lefts, rights)] for t, b in zip(tops, bottoms)]
    np.testing.assert_array_equal(counts, expected)
    row_tiles = [AxisTile(t, b, 0, 0, 0) for t, b in zip(tops, bottoms)]
    col_tiles = [AxisTile(left, right, 0, 0, 0) for left, right in zip(lefts, rights)]
    selected = np.random.default_rng(seed + 1).random((len(tops), len(lefts))) < 0.5
    read = tiling.pixels_read((rows, cols), row_tiles, col_tiles, selected)
    brute = np.zeros((rows, cols), bool)
    for i, j in zip(*np.nonzero(selected)):
        brute[tops[i] : bottoms[i], lefts[j] : rights[j]] = True
    np.testing.assert_array_equal(read, brute)


def test_crop_tile_in_quanta_of_cells():
    tile = plan_axis(200, 64, 4, 14, 2, 2)[1]  # AxisTile(40, 104, 2, 12, 12): cells 10..23, keeps 12..21
    # Needed cells 17, 18 (tile cells 7, 8): 5 cells may go before (7 - 2) and 3 after (14 - 9 - 2).
    assert tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2, quantum=2) == AxisTile(56, 96, 3, 5, 17)
    assert tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2, quantum=3) == AxisTile(52, 92, 4, 6, 17)
    assert tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2, quantum=0) == tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2)
    assert tiling.crop_tile(tile, 14, 12, 22, 4, 2, 2) == tile  # every kept cell needed: nothing to crop
