"""Which pixels each score-map cell owns, and which tiles must be computed (pure functions)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import Geometry


@dataclass(frozen=True)
class PixelGrid:
    """The geometry of a per-pixel map (a segmenter's): cell ``(i, j)`` is pixel ``(i, j)``."""

    stride: tuple[int, int] = (1, 1)
    offset: tuple[int, int] = (0, 0)
    receptive_field: tuple[int, int] = (1, 1)
    global_context: bool = False

    def output_size(self, input_size) -> tuple[int, int]:
        return (int(input_size[0]), int(input_size[1]))


def cell_edges(cells, stride: int, receptive_field: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis, the box each cell owns: ``stride`` pixels centred on its window's centre.

    Neighbouring boxes meet, so the boxes tile the image (they may reach past
    its edges by up to half a stride where the network pads).

    Args:
        cells: the cells' indices along the axis (an integer array).
        stride, receptive_field, offset: the network's geometry along the axis.

    Returns:
        ``(low, high)`` float arrays, one value per cell, in image pixels.
    """
    centres = offset + np.asarray(cells, dtype=np.float64) * stride + receptive_field / 2
    return centres - stride / 2, centres + stride / 2


def plan_tiles(image_size, grid: Geometry, tile) -> list[tuple[tiling.AxisTile, tiling.AxisTile]]:
    """Exact tiles covering the whole map, each map cell written by one tile.

    The same plan `predict_map` follows (tile origins on multiples of the
    stride, sides congruent to the image's modulo the stride, the cells whose
    windows cross an inner tile edge dropped), without its balancing of tile
    lengths. A tile's pixels fed to the network as a whole image give its
    kept cells exactly as the whole image would.

    Args:
        image_size: ``(H, W)``.
        grid: the network's geometry.
        tile: the largest tile side ``T`` or ``(T_h, T_w)``.

    Returns:
        ``(rows, cols)`` pairs of `AxisTile`, row-major.

    Raises:
        ConversionError: for a network with global context (no tiling is
            exact) or tiles too small to keep a cell.
    """
    requested = (tile, tile) if np.isscalar(tile) else tuple(tile)
    sides = tuple(tiling.tile_length(int(t), n, s) for t, n, s in zip(requested, image_size, grid.stride))
    if sides == tuple(image_size):
        cells = grid.output_size(image_size)
        return [(tiling.AxisTile(0, image_size[0], 0, cells[0], 0), tiling.AxisTile(0, image_size[1], 0, cells[1], 0))]
    if grid.global_context:
        raise ConversionError(
            "The network pools over the whole image (global context), so no tile is exact; a mask cannot skip "
            "tiles. Use no mask, or no tiling."
        )
    for name, side, low in zip(("height", "width"), sides, grid.min_input_size):
        if side < low:
            raise ConversionError(
                f"A tile {name} of {side} pixels is smaller than the network's minimum input of {low}. "
                f"Use tiles of at least {low}."
            )
    cells = grid.output_size(sides)
    exact = grid.exact_cells(sides, at_image_start=(False, False), at_image_end=(False, False))
    axes = [
        tiling.plan_axis(n, t, s, c, start, c - stop)
        for n, t, s, c, (start, stop) in zip(image_size, sides, grid.stride, cells, exact)
    ]
    return list(itertools.product(axes[0], axes[1]))
