"""Regions of a label map as polygons (GeoJSON and CSV regions of a segmenter's or a classifier's map).

Each connected region of one class (4-connected) becomes one polygon: its
outer boundary and its holes, traced exactly along the cell edges (only the
corners kept), so a polygon's area is its cell count and the regions of a map
tile it without gaps or overlaps. Where two cells of a region touch only at a
corner, the traced boundary passes through that corner twice: it is cut there
into rings that touch at that corner, so that a hole touching the outline is
an interior ring, and every polygon is valid (OGC: no ring touches itself).

The whole map is traced at once with array operations (each boundary edge's
successor is decided by the 2 x 2 cells around its end corner), so maps of
millions of cells and hundreds of thousands of regions take seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.batch.readers import SLIDES_EXTRA
from keras_fcn_surgery.errors import InputError

# Unit steps along the cell edges, in (row, column) of the corner grid: right, down, left, up (clockwise on
# screen). A boundary edge is walked with its region's cell on the right (on screen, rows pointing down).
_STEPS = np.array(((0, 1), (1, 0), (0, -1), (-1, 0)))
# Per step, the corner (row, column) where the edge along side `step` of cell (r, c) starts: the top side
# walked rightwards starts at the cell's top-left corner, the right side walked downwards at its top-right...
_STARTS = np.array(((0, 0), (0, 1), (1, 1), (1, 0)))
# ...and the neighbour across that side.
_ACROSS = np.array(((-1, 0), (0, 1), (1, 0), (0, -1)))


@dataclass(frozen=True)
class Region:
    """One connected region of one class.

    Attributes:
        label: the class.
        pixels: its number of cells (pixels of a per-pixel map).
        mean_probability: the mean probability of ``label`` over its cells.
        max_probability: the largest probability of ``label`` over its cells.
        box: ``(top, left, bottom, right)`` in map cells (bottom/right exclusive).
        rings: the outer ring first, then the holes; each an ``(n, 2)`` array
            of ``(x, y)`` corners in map cells (cell ``(i, j)`` covers
            ``[j, j + 1] x [i, i + 1]``), closed (last point = first). The
            outer ring is counter-clockwise and holes clockwise in these
            coordinates taken as written (GeoJSON's right-hand rule; on screen,
            with ``y`` pointing down, they look the other way round).
    """

    label: int
    pixels: int
    mean_probability: float
    max_probability: float
    box: tuple[int, int, int, int]
    rings: tuple[np.ndarray, ...]


def label_map(scores, top_classes) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probability)``: each cell's top class (-1 where not computed) and its probability.

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


def check_available() -> None:
    """Raise `InputError` now when regions cannot be traced (scikit-image missing), before any map is computed."""
    _measure()


def regions(labels: np.ndarray, probability: np.ndarray) -> Iterator[Region]:
    """The connected regions of every class in ``labels`` (cells labelled -1 belong to none), row-major."""
    labels = np.asarray(labels)
    components = _measure().label(labels + 1, background=0, connectivity=1).astype(np.int64)
    count = int(components.max(initial=0))
    if count == 0:
        return
    flat = components.ravel()
    inside = np.flatnonzero(flat)
    ids = flat[inside] - 1
    values = np.asarray(probability, dtype=np.float64).ravel()[inside]
    pixels = np.bincount(ids, minlength=count)
    means = np.bincount(ids, weights=values, minlength=count) / pixels
    maxima = np.full(count, -np.inf)
    np.maximum.at(maxima, ids, values)
    rows, cols = np.divmod(inside, labels.shape[1])
    top, left = np.full(count, labels.shape[0]), np.full(count, labels.shape[1])
    bottom, right = np.zeros(count, np.int64), np.zeros(count, np.int64)
    np.minimum.at(top, ids, rows)
    np.minimum.at(left, ids, cols)
    np.maximum.at(bottom, ids, rows + 1)
    np.maximum.at(right, ids, cols + 1)
    classes = labels.ravel()[inside[np.unique(ids, return_index=True)[1]]]
    owners, rings, areas = edge_rings(components)
    outer = areas > 0
    if not np.array_equal(np.bincount(owners[outer], minlength=count + 1)[1:], np.ones(count, np.int64)):
        raise AssertionError("regions: a region without exactly one outer ring (a bug: please report the map)")
    by_region: list[list[np.ndarray]] = [[] for _ in range(count)]
    pinched = _pinched(rings)
    for index, (owner, ring, is_outer) in enumerate(zip(owners.tolist(), rings, outer.tolist())):
        if index not in pinched:
            by_region[owner - 1].insert(0, ring) if is_outer else by_region[owner - 1].append(ring)
            continue
        for loop in _simple_loops(ring):
            by_region[owner - 1].insert(0, loop) if _signed_area(loop) > 0 else by_region[owner - 1].append(loop)
    if any(len(found) and _signed_area(found[1]) > 0 for found in by_region if len(found) > 1):
        raise AssertionError("regions: a region with two outer rings (a bug: please report the map)")
    for k in range(count):
        yield Region(
            label=int(classes[k]),
            pixels=int(pixels[k]),
            mean_probability=float(means[k]),
            max_probability=float(maxima[k]),
            box=(int(top[k]), int(left[k]), int(bottom[k]), int(right[k])),
            rings=tuple(by_region[k]),
        )


def edge_rings(components: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The boundaries of every region of a map of region numbers (0: none), traced along the cell edges.

    Cell ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]``. Every edge between
    a cell of a region and a cell of another (or none, or the outside) is
    walked once, the region's cell on the same side, so an outer boundary
    and a hole come out in opposite directions: outer rings counter-clockwise
    in ``(x, y)`` as written, holes clockwise. Where two cells of a region
    meet only at a corner, the walk stays with the cell it came along
    (4-connectivity).

    Returns:
        ``(owners, rings, areas)``: per ring, its region number, its closed
        ``(n, 2)`` float array of ``(x, y)`` corners (where the boundary
        turns) and its signed area (positive for an outer ring).
    """
    padded = np.pad(np.asarray(components), 1)
    width = padded.shape[1]
    flat = padded.ravel()
    # Every boundary edge as (cell, side): key = cell * 4 + side, sorted, so an edge is found by searchsorted.
    keys = []
    cells = np.flatnonzero(flat)
    for facing in range(4):
        across = cells + _ACROSS[facing, 0] * width + _ACROSS[facing, 1]
        keys.append(cells[flat[across] != flat[cells]] * 4 + facing)
    edges = np.sort(np.concatenate(keys))
    if not len(edges):
        return np.zeros(0, np.int64), [], np.zeros(0)
    cell, side = edges // 4, edges % 4
    region = flat[cell]
    step = _STEPS[side, 0] * width + _STEPS[side, 1]
    left_of = _STEPS[(side - 1) % 4, 0] * width + _STEPS[(side - 1) % 4, 1]
    # At the edge's end corner: the cell ahead on the region's side, and its neighbour across the walk's line.
    # The walk turns right when the first is not the region's, goes straight when only the first is, else turns left.
    ahead = cell + step
    ahead_left = ahead + left_of
    turn_right = flat[ahead] != region
    straight = ~turn_right & (flat[ahead_left] != region)
    turn_left = ~turn_right & ~straight
    following = np.where(turn_right, cell * 4 + (side + 1) % 4, 0)
    following = np.where(straight, ahead * 4 + side, following)
    following = np.where(turn_left, ahead_left * 4 + (side - 1) % 4, following)
    successor = np.searchsorted(edges, following)
    if np.any(successor >= len(edges)) or np.any(edges[np.minimum(successor, len(edges) - 1)] != following):
        raise AssertionError("edge_rings: an open boundary (a bug: please report the map)")
    leader, rank = _cycles(successor)
    order = np.lexsort((-rank, leader))
    ordered_side = side[order]
    previous_side = np.roll(ordered_side, 1)
    starts = np.flatnonzero(np.r_[True, leader[order][1:] != leader[order][:-1]])
    previous_side[starts] = ordered_side[np.r_[starts[1:], len(order)] - 1]  # a ring's last edge precedes its first
    turns = order[ordered_side != previous_side]  # the edges that start where the boundary turns, in ring order
    corner = np.stack(np.divmod(cell[turns], width), axis=-1) + _STARTS[side[turns]]
    points = corner[:, ::-1].astype(np.float64) - 1.0  # (row, col) of the padded grid -> (x, y) of the map
    ring_of = leader[turns]
    bounds = np.flatnonzero(np.r_[True, ring_of[1:] != ring_of[:-1], True])
    following_point = np.arange(1, len(points) + 1)
    following_point[bounds[1:] - 1] = bounds[:-1]  # a ring's last corner is followed by its first
    x, y = points[:, 0], points[:, 1]
    areas = 0.5 * np.add.reduceat(x * y[following_point] - x[following_point] * y, bounds[:-1])
    rings = [np.concatenate([points[a:b], points[a : a + 1]]) for a, b in zip(bounds[:-1], bounds[1:])]
    return region[ring_of[bounds[:-1]]], rings, areas


def _pinched(rings: list[np.ndarray]) -> set[int]:
    """The rings that pass a corner twice (where two cells of a region, or of what surrounds it, meet only at
    that corner)."""
    if not rings:
        return set()
    lengths = np.array([len(ring) - 1 for ring in rings])
    points = np.concatenate([ring[:-1] for ring in rings])
    owner = np.repeat(np.arange(len(rings)), lengths)
    order = np.lexsort((points[:, 1], points[:, 0], owner))
    keys = np.column_stack([owner[order], points[order]])
    repeated = np.all(keys[1:] == keys[:-1], axis=1)
    return set(owner[order][1:][repeated].tolist())


def _simple_loops(ring: np.ndarray) -> list[np.ndarray]:
    """A closed ring cut at every corner it passes twice into closed loops that pass no corner twice, each in
    the ring's direction of travel: OGC's valid rings (a ring may not touch itself), with the same total signed
    area. A region's outer boundary that touches itself so yields its outer ring and the holes that touch it at
    one corner; a hole's, holes that touch each other at one corner."""
    loops = []
    path: list[tuple[float, float]] = []
    position: dict[tuple[float, float], int] = {}
    for point in map(tuple, ring[:-1].tolist()):
        start = position.get(point)
        if start is None:
            position[point] = len(path)
            path.append(point)
            continue
        loops.append(np.array([*path[start:], point], dtype=np.float64))
        for dropped in path[start + 1 :]:
            del position[dropped]
        del path[start + 1 :]
    loops.append(np.array([*path, path[0]], dtype=np.float64))
    return loops


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]  # closed: the last point is the first
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _cycles(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation given by ``successor``: each element's cycle, named by its smallest element, and its
    distance to the element before that one along the cycle (pointer jumping: log2 of the longest cycle rounds).
    """
    leader, jump = np.arange(len(successor)), successor
    while True:  # after k rounds, the smallest of the next 2**k elements; unchanged only once that spans the cycle
        smaller = np.minimum(leader, leader[jump])
        if np.array_equal(smaller, leader):
            break
        leader, jump = smaller, jump[jump]
    # Cut each cycle before its leader, then rank by pointer jumping: rank = distance to jump, which ends at the cut.
    last = successor == leader
    jump = np.where(last, np.arange(len(successor)), successor)
    rank = (~last).astype(np.int64)
    while not np.array_equal(jump[jump], jump):
        rank = rank + rank[jump]
        jump = jump[jump]
    return leader, rank


def _measure():
    try:
        return importlib.import_module("skimage.measure")
    except ImportError as error:
        what = "Regions of a map (GeoJSON regions; a segmenter's CSV)"
        raise InputError(f"{what} need scikit-image: {SLIDES_EXTRA}, or ask for one feature per cell.") from error
