"""Exact tiled segmentation: the pure tile planner and the stitched logits against one pass."""

import numpy as np
import pytest
from conftest import random_images
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_segment import pooled_net, same_net

import keras_fcn_surgery as kfs
from keras_fcn_surgery.grid.tiling import plan_pixels
from keras_fcn_surgery.segmentation.predict import reach, segment_image


@settings(deadline=None, max_examples=200)
@given(
    length=st.integers(1, 400),
    tile=st.integers(8, 200),
    margin=st.integers(0, 20),
    period=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_tiles_cover_every_pixel_once_and_pad_like_the_image(length, tile, margin, period):
    size = tile - (tile - length) % period  # the inner tiles' length (test_tiling.py checks the refusal otherwise)
    assume(tile >= length or size - 2 * margin >= period)
    tiles = plan_pixels(length, tile, margin, period)
    # The kept pixels, in image coordinates: [out_start, out_stop) (`keep_*` count from the tile's start).
    assert tiles[0].out_start == 0 and tiles[-1].out_stop == length
    for tile_, following in zip(tiles, tiles[1:]):
        assert tile_.out_stop == following.out_start
    for t in tiles:
        assert t.start % period == 0
        assert (t.stop - t.start) % period == length % period
        assert t.stop - t.start <= max(tile, length if len(tiles) == 1 else 0)
        assert t.keep_start < t.keep_stop and t.out_start - t.start == t.keep_start
        assert t.out_start == 0 or t.out_start - t.start >= margin
        assert t.out_stop == length or t.stop - t.out_stop >= margin


@pytest.mark.parametrize("factory", [pooled_net, same_net])
def test_tiled_segmentation_equals_one_pass(factory):
    model = kfs.segmenter(factory(), num_classes=3, keep_classes=[0, 1, 2])
    margin, period = reach(model)
    side = 3 * max(margin)
    image = random_images((side + 37, side + 45, 3))
    assert all(len(plan_pixels(n, side, max(margin), max(period))) >= 2 for n in image.shape[:2])
    whole = segment_image(model, image)
    tiled = segment_image(model, image, tile=side)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_tiles_too_small_are_refused_with_the_smallest_size():
    model = kfs.segmenter(pooled_net(), num_classes=2)
    with pytest.raises(kfs.ConversionError, match="at least"):
        segment_image(model, random_images((80, 80, 3)), tile=10)


def test_images_smaller_than_the_network_are_refused_with_the_minimum():
    model = kfs.segmenter(pooled_net(), num_classes=2)
    with pytest.raises(kfs.ConversionError, match=r"5x40 pixels is smaller than the 16x16"):
        segment_image(model, random_images((5, 40, 3)))
