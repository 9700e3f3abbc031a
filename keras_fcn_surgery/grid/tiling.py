"""Tile planning for exact tiled inference (pure integer functions).

One axis at a time. The network has total stride ``S``. A tile of length
``T`` starting at input pixel ``a`` pads like the whole image when ``a`` is a
multiple of ``S`` and ``T`` is congruent to the image's length modulo ``S``
(``same`` padding amounts depend only on sizes modulo strides); its output cell
``j`` is then the whole image's cell ``a // S + j``. A tile whose edge lies
inside the image loses ``margin_before`` cells at its start and
``margin_after`` at its end (their windows reach across the edge); at the
image's own edges nothing is lost. Consecutive tiles overlap so that the cells
each one keeps meet exactly, every output cell is written once, and all tiles
share one length (so they can be batched): the last tile is moved back to end
at the image's end, and `balanced_tile_length` shortens all tiles as far as
that keeps their number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.errors import ConversionError, InputError, loop_bound_exceeded


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis.

    Attributes:
        start: first input pixel of the tile.
        stop: input pixel after its last one.
        keep_start: first of the tile's output cells that is written.
        keep_stop: output cell after the last one written.
        out_start: the whole map's cell where ``keep_start`` goes.
    """

    start: int
    stop: int
    keep_start: int
    keep_stop: int
    out_start: int

    @property
    def out_stop(self) -> int:
        return self.out_start + self.keep_stop - self.keep_start


def tile_length(requested: int, length: int, stride: int) -> int:
    """The tile length used for a requested one along an axis of ``length`` pixels.

    ``requested`` is rounded up to a multiple of ``stride``, then the image's
    remainder ``length % stride`` is added, so that the tile pads like the
    whole image. An image no longer than that is one tile of its own length.

    Raises:
        ConversionError: for a non-positive request or stride.
    """
    if requested < 1 or stride < 1:
        raise InputError(f"Expected a positive tile size and stride. Received: tile={requested}, stride={stride}")
    rounded = -(-requested // stride) * stride + length % stride
    return min(rounded, length)


def balanced_tile_length(
    length: int, tile: int, stride: int, cells: int, margin_before: int, margin_after: int, min_length: int
) -> int:
    """The shortest tile length that covers the axis with as few tiles as ``tile`` does.

    A tile of ``tile`` pixels may leave the last tile mostly redundant (it is
    moved back to end at the image's end); equal shorter tiles do the same work
    with less overlap. Lengths keep their remainder modulo ``stride``, and one
    stride less means one output cell less.

    Args:
        length: the image's length along the axis.
        tile: the largest tile length allowed, from `tile_length`.
        stride: the network's total stride along the axis.
        cells: output cells of a tile of length ``tile``.
        margin_before: cells lost at a tile start that lies inside the image.
        margin_after: cells lost at a tile end that lies inside the image.
        min_length: the shortest tile length the network accepts, congruent to
            ``length`` modulo ``stride``.

    Returns:
        A length between ``min_length`` and ``tile`` (``length`` if that is
        shorter than ``tile``); ``tile`` itself when it keeps no cell.
    """
    if tile >= length:
        return length
    lost = margin_before + margin_after
    step = cells - lost
    if step < 1:
        return tile
    total = (length - tile) // stride + cells
    count = max(2, -(-(total - lost) // step))
    needed = -(-(total + (count - 1) * lost) // count)
    return max(min_length, tile - (cells - needed) * stride)


def plan_axis(
    length: int,
    tile: int,
    stride: int,
    cells: int,
    margin_before: int,
    margin_after: int,
    *,
    cells_per_stride: int = 1,
) -> list[AxisTile]:
    """Tiles covering one axis of the output map, each output cell written once.

    Args:
        length: the image's length along the axis.
        tile: the tile length, congruent to ``length`` modulo ``stride`` (see
            `tile_length`) or equal to ``length``.
        stride: tile origins lie on multiples of it (the network's total
            stride along the axis).
        cells: output cells of one tile of length ``tile``.
        margin_before: cells lost at a tile start that lies inside the image.
        margin_after: cells lost at a tile end that lies inside the image.
        cells_per_stride: output cells per ``stride`` input pixels: 1 for a
            score map (one cell per stride), ``stride`` for a per-pixel map
            (a segmenter's, see `plan_pixels`).

    Returns:
        `AxisTile` list in order; one tile when ``tile >= length``.

    Raises:
        ConversionError: when the tile length is not aligned.
        InputError: when the tile is too short to keep any cell of an inner tile.
        InternalError: past ``total`` tiles (each writes a cell): a bug, never a bad input.
    """
    if tile >= length:
        return [AxisTile(0, length, 0, cells, 0)]
    if (length - tile) % stride:
        raise ConversionError(
            f"A tile of {tile} pixels does not pad like an image of {length}: their lengths must be congruent "
            f"modulo the stride {stride}. Use `tile_length` to choose the tile."
        )
    step = cells - margin_before - margin_after
    if step < cells_per_stride:
        needed = tile + stride * -(-(cells_per_stride - step) // cells_per_stride)
        raise InputError(
            f"A tile of {tile} pixels gives {cells} output cells, but {margin_before} + {margin_after} of them "
            f"see past the tile's edges: no cell of an inner tile would be exact. Use tiles of at least {needed} "
            "pixels (more keep more of each tile)."
        )
    last_origin = (length - tile) // stride
    total = last_origin * cells_per_stride + cells
    tiles: list[AxisTile] = []
    written, origin = 0, 0
    while written < total:  # each tile writes at least one cell, so `total` tiles at most
        if len(tiles) >= total:
            raise loop_bound_exceeded(
                "plan_axis",
                total,
                length=length,
                tile=tile,
                stride=stride,
                cells=cells,
                margin_before=margin_before,
                margin_after=margin_after,
                cells_per_stride=cells_per_stride,
            )
        origin = min(origin, last_origin)
        first_cell = origin * cells_per_stride
        keep_stop = cells if origin == last_origin else cells - margin_after
        tiles.append(AxisTile(origin * stride, origin * stride + tile, written - first_cell, keep_stop, written))
        written = first_cell + keep_stop
        # The next tile starts as late as lets it keep `written` on: its first kept cell past its margin.
        origin = (written - margin_before) // cells_per_stride
    return tiles


def plan_pixels(length: int, tile: int, margin: int, period: int) -> list[AxisTile]:
    """Tiles of a per-pixel map (a segmenter's logits) along one axis, each pixel written once.

    Tiles start on multiples of ``period`` (the network's stride) and are as
    long as the longest length up to ``tile`` congruent to ``length`` modulo
    it, so every padding and alignment shift is the whole image's; pixels
    within ``margin`` of an edge inside the image are not kept.

    Raises:
        InputError: when ``tile`` leaves no room for kept pixels between the margins.
    """
    if tile >= length:
        return [AxisTile(0, length, 0, length, 0)]
    size = tile - ((tile - length) % period)  # the longest length <= tile congruent to `length`
    if size < 1 or size - 2 * margin < period:
        smallest = 2 * margin + period + (length - 2 * margin - period) % period
        raise InputError(
            f"A tile of {tile} pixels keeps nothing: each side loses {margin} pixels and tiles move by "
            f"multiples of {period}. Use tiles of at least {smallest} pixels."
        )
    return plan_axis(length, size, period, size, margin, margin, cells_per_stride=period)


def tiles_touching(mask, rows: list[AxisTile], cols: list[AxisTile]):
    """Which tiles keep at least one True cell of ``mask``: a ``(len(rows), len(cols))`` boolean array.

    One row of tiles at a time (the columns its band of the mask touches), so
    memory stays a few bytes per map column whatever the map's size.

    Args:
        mask: a boolean ``(H', W')`` array over the cells the tiles write.
        rows, cols: the tiles along each axis (`plan_axis`).
    """
    mask = np.asarray(mask, dtype=bool)
    c0, c1 = (np.array([getattr(t, f) for t in cols], dtype=np.int64) for f in ("out_start", "out_stop"))
    touched = np.zeros((len(rows), len(cols)), dtype=bool)
    for i, row in enumerate(rows):
        counts = np.zeros(mask.shape[1] + 1, dtype=np.int64)
        np.cumsum(mask[row.out_start : row.out_stop].any(axis=0), out=counts[1:])
        touched[i] = counts[c1] - counts[c0] > 0
    return touched


def box_counts(mask, top, bottom, left, right, *, rows_at_once: int = 256):
    """True cells of ``mask`` in every box ``[top[i], bottom[i]) x [left[j], right[j])``: an ``(I, J)`` array.

    One integral image of the mask, then four look-ups per box, for
    ``rows_at_once`` rows of boxes at a time (the look-ups' temporaries stay
    small however many boxes there are).
    """
    mask = np.asarray(mask, dtype=bool)
    counts = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    counts[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    top, bottom, left, right = (np.asarray(edge, dtype=np.int64) for edge in (top, bottom, left, right))
    dtype = np.int32 if mask.size < 2**31 else np.int64
    found = np.empty((len(top), len(left)), dtype=dtype)
    for first in range(0, len(top), rows_at_once):
        t, b = top[first : first + rows_at_once, None], bottom[first : first + rows_at_once, None]
        found[first : first + rows_at_once] = (
            counts[b, right[None, :]] - counts[t, right[None, :]] - counts[b, left[None, :]] + counts[t, left[None, :]]
        )
    return found


def pixels_read(size, rows: list[AxisTile], cols: list[AxisTile], selected):
    """The input cells that the ``selected`` tiles read: a boolean ``size`` array, True inside any of them.

    Args:
        size: ``(H, W)`` of the tiles' input.
        rows, cols: the tiles along each axis.
        selected: a boolean ``(len(rows), len(cols))`` array.
    """
    i, j = np.nonzero(np.asarray(selected, dtype=bool))
    # 4 bytes a cell, summed in place: the stage maps of a large slide are large (the counts fit: <= len(i)).
    marks = np.zeros((size[0] + 1, size[1] + 1), dtype=np.int32 if len(i) < 2**31 else np.int64)
    r0 = np.array([t.start for t in rows])[i]
    r1 = np.array([t.stop for t in rows])[i]
    c0 = np.array([t.start for t in cols])[j]
    c1 = np.array([t.stop for t in cols])[j]
    np.add.at(marks, (r0, c0), 1)
    np.add.at(marks, (r0, c1), -1)
    np.add.at(marks, (r1, c0), -1)
    np.add.at(marks, (r1, c1), 1)
    np.cumsum(marks, axis=0, out=marks)
    np.cumsum(marks, axis=1, out=marks)
    return marks[: size[0], : size[1]] > 0


def crop_tile(
    tile: AxisTile,
    cells: int,
    need_start: int,
    need_stop: int,
    stride: int,
    margin_before: int,
    margin_after: int,
    quantum: int = 1,
) -> AxisTile:
    """``tile`` shortened to write only the cells ``[need_start, need_stop)`` of the map (a score map's tile).

    The tile loses whole strides at either end (so it still pads like the
    image), as many as keep the needed cells clear of the new edges' margins,
    rounded down to multiples of ``quantum`` cells (fewer distinct tile shapes
    to trace); it then writes the needed cells only.

    Args:
        tile: a tile of `plan_axis`, ``cells`` output cells long.
        need_start, need_stop: the map cells to write, within the tile's kept cells.
        stride, margin_before, margin_after: as for `plan_axis`.
        quantum: crop in multiples of this many cells.
    """
    origin = tile.start // stride
    first, last = need_start - origin, need_stop - origin  # in the tile's own cells
    if not tile.keep_start <= first < last <= tile.keep_stop:
        raise ValueError(f"cells [{need_start}, {need_stop}) are not kept by {tile}")
    quantum = max(1, quantum)
    before = max(0, first - margin_before) // quantum * quantum
    after = max(0, cells - last - margin_after) // quantum * quantum
    return AxisTile(
        tile.start + before * stride,
        tile.stop - after * stride,
        first - before,
        last - before,
        need_start,
    )
