"""Which pixels each score-map cell owns (pure functions)."""

from __future__ import annotations

import numpy as np


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
