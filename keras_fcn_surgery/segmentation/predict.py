"""`segment_image`: a segmenter's logits for one image, whole or in exact tiles."""

from __future__ import annotations

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.grid.tiling import AxisTile
from keras_fcn_surgery.inference import engines, runner
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.taxonomy import UPSAMPLINGS


def is_segmenter(model) -> bool:
    """True for a model with learnable upsampling (a transposed convolution), as `segmenter` builds."""
    return any(isinstance(layer, UPSAMPLINGS) for layer in model.layers)


def _grids(model) -> list:
    """The geometry of every convolution before the upsampling (the backbone's and the score layers')."""
    grids = []
    for layer in model.layers:
        if not isinstance(layer, taxonomy.PLAIN_CONVOLUTIONS) or isinstance(layer, taxonomy.TRANSPOSED_CONVOLUTIONS):
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


def segment_image(model, image, *, tile=None, batch_size: int | None = None, progress: bool | None = False):
    """The segmenter's logits for one image, ``(H, W, K)`` (``(K, H, W)`` for channels-first models).

    Args:
        model: a model from `segmenter` (or loaded from its ``.keras`` file).
        image: one image in the model's layout, already preprocessed: a
            numpy array or any array that supports slicing.
        tile: tile side in pixels (an int or ``(h, w)``); None runs the image
            whole. Tiles overlap by the network's reach (see `reach`), so the
            result equals the whole-image pass within float32 round-off.
        batch_size: tiles per forward pass; default: as many as make about
            1 million pixels.
        progress: show a progress bar over the tiles.

    Raises:
        ConversionError: for an image of the wrong rank, or tiles too small.
    """
    layout = model_layout(model)
    shape = tuple(getattr(image, "shape", np.shape(image)))
    if len(shape) != 3:
        raise ConversionError(f"Expected one image of rank 3 in the model's layout. Received shape {shape}.")
    size = layout.image_size(shape)
    classes = int(layout.channels(tuple(model.outputs[0].shape)))
    out = np.empty(layout.image_shape(size[0], size[1], classes), np.float32)
    axis_plans = plan_segment_tiles(model, size, tile)
    runner.warn_if_wasteful(
        _tiled_area(axis_plans) / (size[0] * size[1]),
        None if tile is None else runner.pair(tile, "tile"),
        lambda side: _tiled_area(plan_segment_tiles(model, size, side)) / (size[0] * size[1]),
        size,
    )
    run_segmenter(model, image, out, tile=tile, batch_size=batch_size, progress=progress)
    return out


def _tiled_area(axis_plans) -> int:
    return sum(t.stop - t.start for t in axis_plans[0]) * sum(t.stop - t.start for t in axis_plans[1])


def run_segmenter(
    model, image, out, *, tile=None, keep=None, preprocess=None, batch_size: int | None = None, progress=False
) -> float:
    """Write the segmenter's logits for ``image`` into ``out`` through the tile loop `predict_map` uses.

    With ``keep`` (a boolean ``(H, W)`` array), only the tiles holding a kept
    pixel run and the other pixels are NaN.

    Returns:
        The share of the tiles computed.
    """
    layout = model_layout(model)
    size = layout.image_size(tuple(image.shape))
    axis_plans = plan_segment_tiles(model, size, tile)
    tiles = None if keep is None else _kept_tiles(axis_plans, keep)
    count = len(axis_plans[0]) * len(axis_plans[1])
    side = (axis_plans[0][0].stop - axis_plans[0][0].start, axis_plans[1][0].stop - axis_plans[1][0].start)
    per_batch = batch_size or max(1, runner.PIXELS_PER_BATCH // (side[0] * side[1]))
    computed = count if tiles is None else len(tiles)
    spec = ImageSpec(layout, int(layout.channels(tuple(model.inputs[0].shape))))
    with runner.progress_bar(computed, progress, "tiles") as bar:
        runner.run_tiles(
            engines.forward(model, engines.native()),
            image,
            runner.TileJob(spec, axis_plans, per_batch, tiles=tiles, keep=keep),
            out,
            preprocess=preprocess,
            dtype=runner.input_dtype(model),
            bar=bar,
            prefetch=True,
        )
    return computed / count


def _kept_tiles(axis_plans, keep) -> list:
    selected = tiling.tiles_touching(keep, *axis_plans)
    return [(axis_plans[0][i], axis_plans[1][j]) for i, j in zip(*np.nonzero(selected))]


def tile_fraction(model, size, tile, keep) -> float:
    """The share of a segmenter's tiles over an image of ``size`` that `run_segmenter` computes with ``keep``."""
    axis_plans = plan_segment_tiles(model, size, tile)
    return len(_kept_tiles(axis_plans, keep)) / (len(axis_plans[0]) * len(axis_plans[1]))


def plan_segment_tiles(model, size, tile=None) -> list[list[AxisTile]]:
    """The exact tiles of a segmenter over an image of ``size`` ``(H, W)``: one `AxisTile` list per axis.

    Each tile reads ``[start, stop)`` and writes the pixels ``[out_start,
    out_stop)`` on each axis; every pixel is written by exactly one tile.
    Without ``tile`` (or with one at least as large as the image) there is one
    tile, the image.

    Raises:
        InputError: for an image smaller than `minimum_size`, or tiles too small.
    """
    smallest = minimum_size(model)
    if size[0] < smallest[0] or size[1] < smallest[1]:
        raise InputError(
            f"An image of {size[0]}x{size[1]} pixels is smaller than the {smallest[0]}x{smallest[1]} that "
            f"'{model.name}' needs. Pad it, or use a larger image."
        )
    if tile is None:
        return [[AxisTile(0, size[0], 0, size[0], 0)], [AxisTile(0, size[1], 0, size[1], 0)]]
    sides = tuple(int(t) for t in tile) if isinstance(tile, (tuple, list)) else (int(tile), int(tile))
    margin, period = reach(model)
    try:
        plans = [tiling.plan_pixels(size[a], sides[a], margin[a], period[a]) for a in (0, 1)]
    except ValueError as error:
        raise InputError(f"Cannot tile for '{model.name}': {error}") from error
    for axis, plan in enumerate(plans):
        short = [t for t in plan if t.stop - t.start < smallest[axis]]
        if short:
            raise InputError(
                f"Tiles of {sides[axis]} pixels leave a {short[0].stop - short[0].start}-pixel tile, smaller than "
                f"the {smallest[axis]} pixels '{model.name}' needs. Use larger tiles."
            )
    return plans
