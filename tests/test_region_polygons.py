"""Regions as polygons valid for GEOS/shapely (what QuPath, geopandas and PostGIS read): holes as interior rings,
rings split where the boundary touches itself at a corner, every polygon's area its cell count."""

import numpy as np
import pytest

from keras_fcn_surgery.batch import regions as regions_module

shapely = pytest.importorskip("shapely")
pytest.importorskip("skimage")
from shapely.geometry import Polygon  # noqa: E402
from shapely.validation import explain_validity  # noqa: E402


def _polygons(labels):
    labels = np.asarray(labels, dtype=np.int32)
    found = list(regions_module.regions(labels, np.ones(labels.shape, np.float32)))
    return found, [Polygon(region.rings[0], region.rings[1:]) for region in found]


def _check_valid_and_exact(labels):
    found, polygons = _polygons(labels)
    assert found, "no region"
    for region, polygon in zip(found, polygons):
        assert polygon.is_valid, (region.label, region.box, explain_validity(polygon))
        assert polygon.area == region.pixels
        assert polygon.exterior.is_ccw and not any(ring.is_ccw for ring in polygon.interiors)  # GeoJSON's rule
        for ring in region.rings:
            assert len({tuple(point) for point in ring[:-1].tolist()}) == len(ring) - 1  # a simple ring
    union = shapely.union_all(polygons)
    assert union.area == np.count_nonzero(np.asarray(labels) >= 0)  # the regions tile the map: no overlap


def test_a_hole_touching_the_outline_at_a_corner_is_an_interior_ring():
    # A ring of 1s around a 0 whose outline is closed only at a corner (top-right): the traced outer boundary
    # passes that corner twice ("Ring Self-intersection" for GEOS).
    labels = np.array(
        [
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [1, 1, 1, 0],
            [0, 0, 0, 0],
        ]
    )
    found, polygons = _polygons(labels)
    (ones,) = [p for r, p in zip(found, polygons) if r.label == 1]
    assert ones.is_valid, explain_validity(ones)
    assert len(ones.interiors) == 1 and ones.area == 7
    _check_valid_and_exact(labels)


def test_holes_touching_each_other_at_a_corner_are_two_interior_rings():
    labels = np.ones((5, 5), np.int32)
    labels[1, 1] = labels[2, 2] = 0  # two one-cell holes meeting at a corner
    _check_valid_and_exact(labels)
    found, polygons = _polygons(labels)
    (ones,) = [p for r, p in zip(found, polygons) if r.label == 1]
    assert len(ones.interiors) == 2


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("classes, fill", [(2, 0.5), (3, 0.3), (2, 0.8)])
def test_speckled_maps_give_valid_polygons_of_their_cell_counts(seed, classes, fill):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (24, 31)).astype(np.int32)
    labels[rng.random(labels.shape) > fill + 0.15] = -1  # cells not computed (a mask) make holes too
    _check_valid_and_exact(labels)
