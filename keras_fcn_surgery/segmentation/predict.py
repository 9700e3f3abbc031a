"""`segment_image`: a segmenter's logits for one image, whole or in exact tiles."""

from __future__ import annotations

import itertools

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.segmentation.tiles import AxisTile, plan_tiles
from keras_fcn_surgery.taxonomy import UPSAMPLINGS


def is_segmenter(model) -> bool:
    """True for a model with learnable upsampling (a transposed convolution), as `segmenter` builds."""
    return any(isinstance(layer, UPSAMPLINGS) for layer in model.layers)


def _grids(model) -> list:
    """The geometry of every convolution before the upsampling (the backbone's and the score layers')."""
    grids = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D) or isinstance(layer, keras.layers.Conv2DTranspose):
            continue
        try:
            grids.append(geometry(keras.Model(model.inputs[0], layer.output)))
        except ConversionError:
            continue
    if not grids:
        raise ConversionError(f"Model '{model.name}' has no convolution before its upsampling to take a geometry from.")
    return grids


def minimum_size(model) -> tuple[int, int]:
    """The smallest ``(H, W)`` a segmenter takes: every score map must have a cell."""
    sizes = [grid.min_input_size for grid in _grids(model)]
    return (max(s[0] for s in sizes), max(s[1] for s in sizes))


def reach(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(margin, period)`` per axis of a segmenter: how far a pixel's inputs reach, and the network's stride.

    Read from the geometry of every convolution before the upsampling: a
    pixel is interpolated from cells whose centres lie within twice the
    largest stride (the cascade of skips halves the stride at each step), and
    each of them sees half the largest receptive field around its centre. The
    margin adds one more stride to stay clear of that bound.
    """
    grids = _grids(model)
    strides = [grid.stride for grid in grids]
    fields = [grid.receptive_field for grid in grids]
    period = tuple(max(s[a] for s in strides) for a in (0, 1))
    field = tuple(max(f[a] for f in fields) for a in (0, 1))
    margin = tuple(3 * period[a] + (field[a] + 1) // 2 + 1 for a in (0, 1))
    return margin, period  # type: ignore[return-value]


def segment_image(model, image, *, tile=None) -> np.ndarray:
    """The segmenter's logits for one image, ``(H, W, K)`` (``(K, H, W)`` for channels-first models).

    Args:
        model: a model from `segmenter` (or loaded from its ``.keras`` file).
        image: one image in the model's layout, already preprocessed.
        tile: tile side in pixels (an int or ``(h, w)``); None runs the image
            whole. Tiles overlap by the network's reach (see `reach`), so the
            result equals the whole-image pass within float32 round-off.

    Raises:
        ConversionError: for an image of the wrong rank, or tiles too small.
    """
    layout = model_layout(model)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ConversionError(f"Expected one image of rank 3 in the model's layout. Received shape {image.shape}.")
    size = layout.image_size(image.shape)
    out = None
    for rows, cols in plan_segment_tiles(model, size, tile):
        piece = image[layout.image_index(slice(rows.start, rows.stop), slice(cols.start, cols.stop))]
        logits = np.asarray(model(piece[None], training=False))[0]
        if out is None:
            classes = logits.shape[layout.image_channel_axis]
            out = np.empty(layout.image_shape(size[0], size[1], classes), np.float32)
        out[layout.image_index(slice(rows.keep_start, rows.keep_stop), slice(cols.keep_start, cols.keep_stop))] = (
            logits[layout.image_index(*kept_part(rows, cols))]
        )
    assert out is not None  # plan_tiles returns at least one tile per axis
    return out


def plan_segment_tiles(model, size, tile=None) -> list[tuple[AxisTile, AxisTile]]:
    """The exact tiles of a segmenter over an image of ``size`` ``(H, W)``, row-major.

    Each tile reads ``[start, stop)`` and owns ``[keep_start, keep_stop)`` on
    each axis; every pixel is owned by exactly one tile. Without ``tile`` (or
    with one at least as large as the image) there is one tile, the image.

    Raises:
        ConversionError: for an image smaller than `minimum_size`, or tiles too small.
    """
    smallest = minimum_size(model)
    if size[0] < smallest[0] or size[1] < smallest[1]:
        raise ConversionError(
            f"An image of {size[0]}x{size[1]} pixels is smaller than the {smallest[0]}x{smallest[1]} that "
            f"'{model.name}' needs. Pad it, or use a larger image."
        )
    if tile is None:
        return [(AxisTile(0, size[0], 0, size[0]), AxisTile(0, size[1], 0, size[1]))]
    sides = tuple(int(t) for t in tile) if isinstance(tile, (tuple, list)) else (int(tile), int(tile))
    margin, period = reach(model)
    try:
        plans = [plan_tiles(size[a], sides[a], margin[a], period[a]) for a in (0, 1)]
    except ValueError as error:
        raise ConversionError(f"Cannot tile for '{model.name}': {error}") from error
    for axis, plan in enumerate(plans):
        short = [t for t in plan if t.stop - t.start < smallest[axis]]
        if short:
            raise ConversionError(
                f"Tiles of {sides[axis]} pixels leave a {short[0].stop - short[0].start}-pixel tile, smaller than "
                f"the {smallest[axis]} pixels '{model.name}' needs. Use larger tiles."
            )
    return list(itertools.product(plans[0], plans[1]))


def kept_part(rows: AxisTile, cols: AxisTile) -> tuple[slice, slice]:
    """The slices of a tile's logits that the tile owns (rows, columns)."""
    return (
        slice(rows.keep_start - rows.start, rows.keep_stop - rows.start),
        slice(cols.keep_start - cols.start, cols.keep_stop - cols.start),
    )
