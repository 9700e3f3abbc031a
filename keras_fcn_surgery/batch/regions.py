"""Regions of a per-pixel label map as polygons (a segmenter's GeoJSON and CSV outputs).

Each connected region of one class (4-connected, as marching squares traces
it) becomes one polygon: its outer boundary and its holes, traced along the
pixel edges with `skimage.measure.find_contours` at level 0.5 (corners are
cut diagonally, so a polygon's area is within half a pixel per corner of its
pixel count), then thinned of points that lie within a tenth of a pixel of a
straight line.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.batch.readers import SLIDES_EXTRA
from keras_fcn_surgery.errors import InputError

# Points closer than this (in map pixels) to the line through their neighbours are dropped.
_TOLERANCE = 0.1


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
        inside = np.pad(properties.image, 1)
        rings = []
        for contour in measure.find_contours(inside.astype(np.uint8), 0.5):
            contour = measure.approximate_polygon(contour, _TOLERANCE)
            # (row, col) of the padded crop -> (x, y) in map pixels: undo the pad, move to pixel edges.
            points = np.stack([contour[:, 1] - 0.5 + left, contour[:, 0] - 0.5 + top], axis=1)
            rings.append(points)
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
