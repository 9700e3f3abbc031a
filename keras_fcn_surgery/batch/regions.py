"""Regions of a per-pixel label map as polygons (a segmenter's GeoJSON and CSV outputs).

Each connected region of one class (4-connected) becomes one polygon: its
outer boundary and its holes, traced exactly along the pixel edges (only the
corners kept), so a polygon's area is its pixel count and the regions of a
map tile it without gaps or overlaps. Where two pixels of a region touch only
at a corner, the boundary passes through that corner twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.batch.readers import SLIDES_EXTRA
from keras_fcn_surgery.errors import InputError

# Unit steps along the pixel edges, in (row, column) of the corner grid: right, down, left, up.
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


@dataclass(frozen=True)
class Region:
    """One connected region of one class.

    Attributes:
        label: the class.
        pixels: its number of pixels.
        mean_probability: the mean probability of ``label`` over its pixels.
        box: ``(top, left, bottom, right)`` in map pixels (bottom/right exclusive).
        rings: the outer ring first, then the holes; each an ``(n, 2)`` array
            of ``(x, y)`` points in map pixels (pixel ``(i, j)`` covers
            ``[j, j + 1] x [i, i + 1]``), closed (last point = first). The
            outer ring is counter-clockwise and holes clockwise in these
            coordinates taken as written (GeoJSON's right-hand rule; on screen,
            with ``y`` pointing down, they look the other way round).
    """

    label: int
    pixels: int
    mean_probability: float
    box: tuple[int, int, int, int]
    rings: tuple[np.ndarray, ...]


def label_map(scores, top_classes) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probability)``: each pixel's top class (-1 where not computed) and its probability.

    Args:
        scores: ``(H, W, K)`` map (numpy or zarr), NaN where not computed.
        top_classes: the writers' band iterator over ``scores``.
    """
    labels = np.full(scores.shape[:2], -1, dtype=np.int32)
    probability = np.zeros(scores.shape[:2], dtype=np.float32)
    for rows, cols, classes, probabilities in top_classes(scores):
        labels[rows, cols] = classes
        probability[rows, cols] = probabilities
    return labels, probability


def regions(labels: np.ndarray, probability: np.ndarray) -> Iterator[Region]:
    """The connected regions of every class in ``labels`` (pixels labelled -1 belong to none), row-major."""
    measure = _measure()
    components = measure.label(labels + 1, background=0, connectivity=1)
    for properties in measure.regionprops(components):
        top, left, bottom, right = (int(v) for v in properties.bbox)
        rings = [ring + np.array([left, top], dtype=np.float64) for ring in pixel_edge_rings(properties.image)]
        rings.sort(key=lambda ring: -abs(_signed_area(ring)))  # the outer ring encloses all the others
        rings = [_oriented(ring, outer=index == 0) for index, ring in enumerate(rings)]
        row, col = (int(v) for v in properties.coords[0])
        values = probability[properties.coords[:, 0], properties.coords[:, 1]]
        yield Region(
            label=int(labels[row, col]),
            pixels=int(properties.area),
            mean_probability=float(values.mean()),
            box=(top, left, bottom, right),
            rings=tuple(rings),
        )


def pixel_edge_rings(mask: np.ndarray) -> list[np.ndarray]:
    """The boundaries of a boolean mask's pixels, traced along pixel edges: closed ``(x, y)`` rings of corners.

    Pixel ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]``. Every edge between a
    True pixel and a False one (or the outside) is walked once, the True pixel
    always on the same side, so an outer boundary and a hole come out in
    opposite directions. Where two True pixels meet only at a corner, the walk
    stays with the pixel it came along (4-connectivity).
    """
    inside = np.pad(np.asarray(mask, dtype=bool), 1)
    rows, cols = np.nonzero(inside)
    # For each True pixel, its sides that face a False one: (start corner, step), walking with the pixel on the right.
    sides = (
        (~inside[rows - 1, cols], rows, cols, 0),  # top side, walked rightwards
        (~inside[rows, cols + 1], rows, cols + 1, 1),  # right side, downwards
        (~inside[rows + 1, cols], rows + 1, cols + 1, 2),  # bottom side, leftwards
        (~inside[rows, cols - 1], rows + 1, cols, 3),  # left side, upwards
    )
    outgoing: dict = {}
    for facing, start_rows, start_cols, step in sides:
        for pixel_row, pixel_col, row, col in zip(rows[facing], cols[facing], start_rows[facing], start_cols[facing]):
            outgoing.setdefault((int(row), int(col)), []).append((step, (int(pixel_row), int(pixel_col))))
    rings = []
    while outgoing:
        start = next(iter(outgoing))
        corner, step, pixel = start, -1, None
        points: list[tuple[int, int]] = []
        for _ in range(4 * len(rows) + 1):  # bounded: each pixel has four sides
            choices = outgoing.get(corner)
            if not choices:
                break
            # At a corner two pixels share diagonally, follow the side of the pixel just walked along.
            index = next((k for k, (_, owner) in enumerate(choices) if owner == pixel), 0)
            next_step, pixel = choices.pop(index)
            if not choices:
                del outgoing[corner]
            if next_step != step:
                points.append(corner)
            step = next_step
            corner = (corner[0] + _STEPS[step][0], corner[1] + _STEPS[step][1])
            if corner == start:
                break
        if points[0] != corner or len(points) < 4:
            raise AssertionError(f"pixel_edge_rings: an open boundary at {corner} (a bug: please report the mask)")
        # (row, col) corners of the padded mask -> (x, y) of the mask's own pixels, closed.
        ring = np.array([(col - 1, row - 1) for row, col in points + [points[0]]], dtype=np.float64)
        rings.append(ring)
    return rings


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of the ring's ``(x, y)`` as written; positive when counter-clockwise."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _oriented(ring: np.ndarray, *, outer: bool) -> np.ndarray:
    counter_clockwise = _signed_area(ring) > 0
    return ring if counter_clockwise == outer else ring[::-1]


def _measure():
    try:
        return importlib.import_module("skimage.measure")
    except ImportError as error:
        what = "Regions of a segmenter's map (GeoJSON, CSV)"
        raise InputError(f"{what} need scikit-image: {SLIDES_EXTRA}.") from error
