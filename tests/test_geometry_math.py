"""Pure per-axis geometry functions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_fcn_surgery.grid import axis as gm


@pytest.mark.parametrize("size", [5, 6, 9, 10, 11])
@pytest.mark.parametrize("kernel, stride", [(1, 2), (3, 1), (3, 2), (4, 2), (7, 1), (5, 3)])
def test_same_padding_before_matches_tensorflow(size, kernel, stride):
    # With input 1..size and a kernel that picks its last tap, output cell 0
    # holds input[kernel - 1 - pad_before], i.e. the value kernel - pad_before.
    import keras  # here, so that the pure tests below run without starting TensorFlow

    values = np.arange(1, size + 1, dtype="float32").reshape(1, size, 1)
    picker = np.zeros((kernel, 1, 1), dtype="float32")
    picker[-1] = 1
    first = float(np.asarray(keras.ops.conv(values, picker, strides=stride, padding="same"))[0, 0, 0])
    assert gm.same_padding_before(size, kernel, stride) == kernel - first
    assert gm.window_output_size(size, kernel, stride, 1, "same") == np.asarray(
        keras.ops.conv(values, picker, strides=stride, padding="same")
    ).shape[1]


def test_valid_window_chain():
    state = gm.input_state(227)
    state = gm.apply_window(state, 11, 4, 1, "valid")
    assert (state.size, state.stride, state.receptive_field, state.offset) == (55, 4, 11, 0)
    state = gm.apply_window(state, 3, 2, 1, "valid")
    assert (state.size, state.stride, state.receptive_field) == (27, 8, 19)


def test_same_window_offset_and_dilation():
    state = gm.apply_window(gm.input_state(8), 3, 1, 2, "same")
    assert (state.size, state.offset, state.receptive_field) == (8, -2, 5)


def test_padding_and_cropping():
    state = gm.apply_padding(gm.apply_window(gm.input_state(10), 2, 2, 1, "valid"), 1, 1)
    assert (state.size, state.offset) == (7, -2)
    cropped = gm.apply_padding(state, -1, 0)
    assert (cropped.size, cropped.offset) == (6, 0)


def test_too_small_gives_empty_axis():
    assert gm.apply_window(gm.input_state(2), 3, 1, 1, "valid").size == 0


def test_merge_unites_boxes_and_ignores_broadcast_vectors():
    a = gm.AxisState(size=5, stride=2, offset=0, receptive_field=3)
    b = gm.AxisState(size=5, stride=2, offset=-1, receptive_field=3)
    vector = gm.apply_global(a)
    merged = gm.merge([a, b, vector])
    assert (merged.size, merged.offset, merged.receptive_field) == (5, -1, 4)
    assert merged.global_context and not merged.is_global


def test_merge_refuses_misaligned_maps():
    with pytest.raises(ValueError, match="do not line up"):
        gm.merge([gm.AxisState(size=5), gm.AxisState(size=6)])


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="padding"):
        gm.apply_window(gm.input_state(5), 3, 1, 1, "causal")


def test_an_empty_axis_stays_empty():
    empty = gm.apply_padding(gm.input_state(3), -2, -2)
    assert empty.size == 0
    assert gm.apply_padding(empty, 3, 3).size == 0
    assert gm.apply_window(empty, 1, 1, 1, "same").size == 0
    assert gm.apply_global(empty).size == 0
    assert gm.merge([empty, gm.input_state(4)]).size == 0


def test_slice_keeps_every_step_th_cell_from_start():
    state = gm.apply_window(gm.input_state(20), 3, 1, 1, "valid")  # 18 cells, stride 1, field 3
    sliced = gm.apply_slice(state, 1, 2, len(range(1, 18, 2)))
    assert (sliced.size, sliced.stride, sliced.offset, sliced.receptive_field) == (9, 2, 1, 3)
    # A tile edge inside the image: input cells [2, 15) exact -> kept cells j with 2 <= 1 + 2j < 15.
    edged = gm.apply_slice(gm.AxisState(size=18, exact_start=2, exact_stop=15), 1, 2, 9)
    assert (edged.exact_start, edged.exact_stop) == (1, 7)
    with pytest.raises(ValueError):
        gm.apply_slice(state, 0, 0, 1)


def test_unknown_window_is_carried_through_every_later_step():
    state = gm.apply_unknown(gm.input_state(16), 8, 2, "layer 'x' (X)")
    assert state.unknown == ("layer 'x' (X)",) and (state.size, state.stride) == (8, 2)
    assert (state.exact_start, state.exact_stop) == (0, 0)  # no cell is proven exact
    later = gm.apply_window(gm.apply_padding(state, 1, 1), 3, 1, 1, "valid")
    assert later.unknown == state.unknown
    merged = gm.merge([later, gm.apply_unknown(later, later.size, 1, "layer 'y' (Y)")])
    assert merged.unknown == ("layer 'x' (X)", "layer 'y' (Y)")
    assert gm.apply_global(merged).unknown == merged.unknown


# --- the gaps mutation testing found (issue 29) --------------------------------------------------------------


def test_a_valid_window_as_long_as_its_input_gives_one_cell():
    assert gm.window_output_size(3, 3, 1, 1, "valid") == 1
    assert gm.window_output_size(2, 3, 1, 1, "valid") == 0
    assert gm.window_output_size(7, 3, 2, 3, "valid") == 1  # dilated: an effective window of 7


@settings(max_examples=200, deadline=None)
@given(kernel=st.integers(1, 9), stride=st.integers(1, 8), dilation=st.integers(1, 4), extra=st.integers(0, 40))
def test_valid_window_output_size_is_the_number_of_whole_windows(kernel, stride, dilation, extra):
    effective = dilation * (kernel - 1) + 1
    assert gm.window_output_size(effective, kernel, stride, dilation, "valid") == 1
    size = effective + extra
    starts = [a for a in range(size) if a + effective <= size and a % stride == 0]
    assert gm.window_output_size(size, kernel, stride, dilation, "valid") == len(starts)
    assert gm.window_output_size(size, kernel, stride, dilation, "same") == len(range(0, size, stride))
    state = gm.apply_window(gm.input_state(size), kernel, stride, dilation, "valid")
    assert (state.size, state.stride, state.offset, state.receptive_field) == (len(starts), stride, 0, effective)


def test_a_slice_of_step_one_shifts_by_its_start():
    state = gm.apply_window(gm.input_state(21), 3, 2, 1, "same")  # 11 cells, stride 2, offset -1
    sliced = gm.apply_slice(state, 3, 1, 5)
    assert (sliced.size, sliced.stride, sliced.offset, sliced.receptive_field) == (5, 2, 5, 3)
    edged = gm.apply_slice(gm.AxisState(size=10, exact_start=2, exact_stop=9), 3, 1, 5)
    assert (edged.exact_start, edged.exact_stop) == (0, 5)
    edged = gm.apply_slice(gm.AxisState(size=10, exact_start=4, exact_stop=7), 1, 1, 8)
    assert (edged.exact_start, edged.exact_stop) == (3, 6)
    # Exact cells only before the slice's start: none kept.
    edged = gm.apply_slice(gm.AxisState(size=10, exact_start=0, exact_stop=2), 3, 1, 5)
    assert (edged.exact_start, edged.exact_stop) == (0, 0)


def test_a_global_pooling_sees_the_whole_axis_from_its_start():
    state = gm.apply_window(gm.input_state(21), 3, 2, 1, "same")  # 11 cells, offset -1, stride 2
    assert state.offset == -1
    pooled = gm.apply_global(state)
    assert (pooled.size, pooled.offset, pooled.receptive_field, pooled.stride) == (1, 0, 11, 2)
    assert pooled.is_global and pooled.global_context
    inner = gm.apply_global(gm.AxisState(size=10, exact_start=2, exact_stop=8))
    assert (inner.exact_start, inner.exact_stop) == (0, 0)  # a tile's pooling is exact nowhere


def test_merge_refuses_maps_of_one_size_but_different_strides():
    with pytest.raises(ValueError, match=r"strides \[1, 2\]"):
        gm.merge([gm.AxisState(size=5, stride=1), gm.AxisState(size=5, stride=2)])


def test_merge_of_one_map_with_a_broadcast_vector_keeps_the_maps_grid():
    a = gm.AxisState(size=5, stride=2, offset=-1, receptive_field=3)
    merged = gm.merge([a, gm.apply_global(gm.input_state(9))])
    assert (merged.size, merged.stride, merged.offset, merged.receptive_field) == (5, 2, -1, 3)
    empty = gm.merge([gm.AxisState(size=0, stride=4), gm.apply_global(gm.input_state(9))])
    assert (empty.size, empty.stride, empty.global_context) == (0, 4, True)
