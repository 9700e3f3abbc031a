"""Exact tiles for segmenters along one axis (pure integer arithmetic).

A segmenter's pixel depends on the input within its reach: the receptive field
of the cells that are interpolated into it, plus the strides it is
interpolated over. Tiles start on multiples of the period (the network's
stride) and are congruent to the image's length modulo it, so every ``same``
padding and every alignment shift is the same in a tile as in the whole
image; of each tile, only pixels at least ``margin`` from an edge inside the
image are kept, and every pixel is written exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AxisTile:
    """One tile along an axis: it reads ``[start, stop)`` and writes ``[keep_start, keep_stop)`` (image pixels)."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def plan_tiles(length: int, tile: int, margin: int, period: int) -> list[AxisTile]:
    """Tiles covering ``[0, length)``, each at most ``tile`` long.

    Raises:
        ValueError: when ``tile`` leaves no room for kept pixels between the margins.
    """
    if tile >= length:
        return [AxisTile(0, length, 0, length)]
    size = tile - ((tile - length) % period)  # the longest length <= tile congruent to `length`
    if size - 2 * margin < period:
        smallest = 2 * margin + period + (length - 2 * margin - period) % period
        raise ValueError(
            f"A tile of {tile} pixels keeps nothing: each side loses {margin} pixels and tiles move by "
            f"multiples of {period}. Use tiles of at least {smallest} pixels."
        )
    tiles: list[AxisTile] = []
    start, keep_start = 0, 0
    for _ in range(length):  # bounded: each tile moves on by at least one period
        stop = start + size
        if stop >= length:
            # Starts on a multiple of `period` and ends at the image's end: congruent, and no longer than `size`.
            tiles.append(AxisTile(start, length, keep_start, length))
            break
        keep_stop = stop - margin
        tiles.append(AxisTile(start, stop, keep_start, keep_stop))
        start = ((keep_stop - margin) // period) * period
        keep_start = keep_stop
    return tiles
