"""Which pixels each score-map cell owns (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
