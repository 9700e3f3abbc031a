"""Outputs of maps finer than the network's stride: placed at stride s, the same bytes tiled, whole or in shards.

`predict_images(..., stride=s)` of a `valid` classifier of stride 8 (its FCN
à trous at s = 2, and at s = 6 from the finest exact stride below, 2, every
third cell kept): the npz holds the map at stride s with its geometry; each
GeoJSON cell's box and each CSV row's box is s pixels wide, centred on its
crop at ``(i s, j s)``; the OME-Zarr scale is s and its translation the
centre of cell 0's window, that of the stride-8 map's cell 0; tiles and region
shards give the bytes of the whole run.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_finer_strides import WINDOW, _relative, _valid_classifier
from test_shards import _assert_same_outputs, _run, picture  # noqa: F401 - `picture` is a fixture

from keras_fcn_surgery.batch.cells import cell_edges

pytest.importorskip("zarr")


def _ome_transforms(path):
    import zarr

    ngff = zarr.open_group(str(path), mode="r").attrs.asdict()
    transforms = ngff.get("ome", ngff)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    return tuple(next(t[kind] for t in transforms if t["type"] == kind)[1:] for kind in ("scale", "translation"))


@pytest.mark.parametrize("stride", [2, 6])
def test_the_outputs_of_a_finer_map_are_placed_at_its_stride(picture, tmp_path, stride):  # noqa: F811
    from PIL import Image

    classifier = _valid_classifier()
    pixels = np.asarray(Image.open(picture / "img.png").convert("RGB"), dtype=np.float32)
    out = tmp_path / f"at{stride}"
    _run(classifier, picture, out, stride=stride, geojson="cells")
    saved = np.load(out / "img.npz")
    scores = saved["scores"]
    assert tuple(saved["stride"]) == (stride, stride) and tuple(saved["receptive_field"]) == (WINDOW, WINDOW)
    assert tuple(saved["offset"]) == (0, 0)
    assert scores.shape[:2] == tuple((n - WINDOW) // stride + 1 for n in pixels.shape[:2])
    cells = [(i, j) for i in range(0, scores.shape[0], 7) for j in range(0, scores.shape[1], 11)]  # a sample
    crops = np.stack([pixels[i * stride : i * stride + WINDOW, j * stride : j * stride + WINDOW] for i, j in cells])
    reference = classifier.predict(crops, verbose=0)
    assert _relative(np.stack([scores[i, j] for i, j in cells]), reference) < 1e-5
    # GeoJSON: each cell's box is `stride` pixels, centred on its crop at (i s, j s).
    with open(out / "img.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    assert len(features) == scores.shape[0] * scores.shape[1]
    for feature in features[:: max(1, len(features) // 50)]:
        i, j = feature["properties"]["row"], feature["properties"]["col"]
        xs, ys = zip(*feature["geometry"]["coordinates"][0])
        assert (min(xs), max(xs)) == (j * stride + WINDOW / 2 - stride / 2, j * stride + WINDOW / 2 + stride / 2)
        assert (min(ys), max(ys)) == (i * stride + WINDOW / 2 - stride / 2, i * stride + WINDOW / 2 + stride / 2)
    # CSV: one row per cell, its box as the GeoJSON's.
    with open(out / "img.csv", encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == scores.shape[0] * scores.shape[1]
    for row in table[:: max(1, len(table) // 50)]:
        i, j = int(row["row"]), int(row["col"])
        (top,), (bottom,) = cell_edges([i], stride, WINDOW, 0)
        (left,), (right,) = cell_edges([j], stride, WINDOW, 0)
        assert [float(row[k]) for k in ("x0", "y0", "x1", "y1")] == [left, top, right, bottom]
        assert int(row["class"]) == int(scores[i, j].argmax())
    # OME-Zarr: scale s, translation the centre of cell 0's window: the stride-8 map's, whose scale is 8.
    scale, translation = _ome_transforms(out / "img.ome.zarr")
    assert scale == [stride, stride] and translation == [WINDOW / 2 - 0.5] * 2
    own = tmp_path / "own"
    _run(classifier, picture, own)
    own_scale, own_translation = _ome_transforms(own / "img.ome.zarr")
    assert own_scale == [8, 8] and own_translation == translation


@pytest.mark.parametrize("stride", [2, 6])
def test_tiles_and_region_shards_of_a_finer_map_give_the_bytes_of_one_run(picture, tmp_path, stride):  # noqa: F811
    classifier = _valid_classifier()
    _run(classifier, picture, tmp_path / "tiled", stride=stride, tile=64)
    for count in (2, 5):
        out = tmp_path / f"shards{count}"
        _run(classifier, picture, out, stride=stride, tile=64, shards=count, shard_rows=4)
        _assert_same_outputs(out, tmp_path / "tiled")
    whole = tmp_path / "whole"
    _run(classifier, picture, whole, stride=stride)
    _assert_same_outputs(tmp_path / "tiled", whole)  # the tiles' cells are the whole pass's, to the bit
