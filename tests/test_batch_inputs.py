"""Finding inputs, reading pyramid levels and regions, tissue masks and cell boxes (no network involved)."""

import os

import numpy as np
import pytest
from PIL import Image

from keras_fcn_surgery.batch.cells import cell_edges
from keras_fcn_surgery.batch.masks import cell_mask, read_mask, thumbnail, tissue_mask
from keras_fcn_surgery.batch.readers import LevelArray, adapt_channels, choose_level, open_reader
from keras_fcn_surgery.batch.sources import find_sources
from keras_fcn_surgery.errors import InputError, ModelFileError
from keras_fcn_surgery.layout import Layout

tifffile = pytest.importorskip("tifffile")


def write_pyramid(path, image, levels=3, tile=64, mpp=0.5):
    """A tiled BigTIFF whose reduced levels are SubIFDs of the first page (as in OME-TIFF slides)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(image, subifds=levels - 1, **options, **resolution)
        for level in range(1, levels):
            factor = 2**level
            tif.write(image[::factor, ::factor], subfiletype=1, **options)


def test_folders_globs_and_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/one.png", "a/deep/two.JPG", "a/notes.txt", "three.tif", "a/.hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    sources = find_sources([str(tmp_path / "a"), str(tmp_path / "*.tif"), str(tmp_path / "a" / "one.png")])
    assert [s.name for s in sources] == ["deep/two", "one", "three"]
    assert all(os.path.isabs(s.path) for s in sources)


@pytest.mark.parametrize("given", ["missing.png", "*.nothing", "empty"])
def test_inputs_that_name_nothing_are_refused_by_name(tmp_path, given):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match=given.replace("*", r"\*")):
        find_sources([str(tmp_path / given)])


def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "slide.png").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="both write the output 'slide'"):
        find_sources([str(tmp_path / "x" / "slide.png"), str(tmp_path / "y" / "slide.png")])


def test_pyramidal_tiff_levels_regions_and_resolution(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (300, 420, 3), dtype=np.uint8)
    path = str(tmp_path / "slide.tif")
    write_pyramid(path, image, mpp=0.25)
    with open_reader(path) as reader:
        assert [lv.size for lv in reader.levels] == [(300, 420), (150, 210), (75, 105)]
        assert reader.levels[1].downsample == (2.0, 2.0)
        assert reader.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(reader.read_region(1, 70, 90, 50, 64), image[::2, ::2][70:120, 90:154])
        assert choose_level(reader, mpp=0.5) == 1
        assert choose_level(reader, mpp=0.9) == 2
        with pytest.raises(ModelFileError, match="level 3 does not exist"):
            choose_level(reader, level=3)
        view = LevelArray(reader, 1, 3, Layout("channels_first"))
        assert view.shape == (3, 150, 210)
        np.testing.assert_array_equal(view[:, 10:20, 5:9], np.moveaxis(image[::2, ::2][10:20, 5:9], -1, 0))


def test_unreadable_files_are_named(tmp_path):
    for name in ("broken.png", "broken.tif"):
        (tmp_path / name).write_bytes(b"not an image at all")
        with pytest.raises(ModelFileError, match=name):
            open_reader(str(tmp_path / name))


def test_resolution_is_required_for_mpp(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.png")
    with open_reader(str(tmp_path / "plain.png")) as reader, pytest.raises(ModelFileError, match="--level"):
        choose_level(reader, mpp=0.5)


def test_channels_are_adapted_to_the_model():
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(adapt_channels(rgba, 3), [[[255, 255, 255], [200, 100, 0]]])
    grey = np.array([[10, 20]], dtype=np.uint8)
    assert adapt_channels(grey, 3).shape == (1, 2, 3)
    np.testing.assert_allclose(adapt_channels(np.full((1, 1, 3), 100, np.uint8), 1), [[[100]]], rtol=1e-6)


def slide_picture(size=(400, 600), patch=(slice(40, 140), slice(60, 200)), seed=0):
    """Bright grey glass with a patch of pink, textured tissue."""
    rng = np.random.default_rng(seed)
    picture = np.clip(rng.normal(235, 4, (*size, 3)), 0, 255)
    tissue = rng.normal(0, 25, (patch[0].stop - patch[0].start, patch[1].stop - patch[1].start, 3))
    picture[patch] = np.clip(tissue + [200, 110, 160], 0, 255)
    return picture.astype(np.uint8)


def test_tissue_mask_finds_the_textured_patch():
    picture = slide_picture()
    picture[300, 500] = [120, 40, 90]  # one coloured speck on the glass: removed as a small object
    mask = tissue_mask(picture)
    expected = np.zeros(mask.shape, bool)
    expected[40:140, 60:200] = True
    assert (mask == expected).mean() > 0.99
    assert not mask[300, 500]
    grey = np.full((50, 50), 240, np.uint8)
    grey[10:30, 10:30] = 60
    assert tissue_mask(grey)[15, 15] and not tissue_mask(grey)[40, 40]
    assert not tissue_mask(np.full((20, 20, 3), 200, np.uint8)).any()


def test_thumbnail_reads_bands_and_averages_blocks(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (300, 420, 3), dtype=np.uint8)
    path = str(tmp_path / "flat.tif")
    tifffile.imwrite(path, image, photometric="rgb")
    with open_reader(path) as reader:
        small = thumbnail(reader, max_side=100)
    expected = image[:300, :420].reshape(60, 5, 84, 5, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(small, expected, rtol=1e-5)


class _Grid:
    stride, receptive_field, offset = (4, 4), (10, 10), (-3, -3)


def test_cell_edges_tile_the_image_and_the_mask_maps_onto_cells(tmp_path):
    low, high = cell_edges(np.arange(5), 4, 10, -3)
    np.testing.assert_allclose(low, [0, 4, 8, 12, 16])
    np.testing.assert_allclose(high[:-1], low[1:])
    mask = np.zeros((10, 10), bool)  # half the resolution of a 20 x 20 image
    mask[2, 6] = True  # image pixels rows 4-5, cols 12-13: owned by cell (1, 3)
    kept = cell_mask(mask, (20, 20), _Grid(), (5, 5))
    assert kept.sum() == 1 and kept[1, 3]
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)


def test_openslide_reader_matches_tifffile(tmp_path):
    pytest.importorskip("openslide")
    import shutil

    image = np.random.default_rng(4).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    path = str(tmp_path / "pages.tif")
    with tifffile.TiffWriter(path) as tif:  # levels as pages: the generic tiled TIFF OpenSlide reads
        for n, factor in enumerate((1, 2, 4)):
            tif.write(
                image[::factor, ::factor],
                tile=(64, 64),
                photometric="rgb",
                subfiletype=1 if n else 0,
                resolution=(2e4 / factor, 2e4 / factor),
                resolutionunit="CENTIMETER",
            )
    shutil.copy(path, tmp_path / "slide.svs")  # an OpenSlide suffix: read through OpenSlide
    with open_reader(str(tmp_path / "slide.svs")) as slide, open_reader(path) as tiff:
        assert type(slide).__name__ == "_OpenSlideReader"
        assert slide.levels == tiff.levels and slide.mpp == pytest.approx(0.5)
        region = LevelArray(slide, 1, 3)[10:40, 20:60, :]
        np.testing.assert_array_equal(region, tiff.read_region(1, 10, 20, 30, 40))


def test_an_image_too_large_for_pillow_points_to_tiled_tiff(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then past Pillow's bomb limit
    with pytest.raises(ModelFileError, match=r"huge\.png.*pyramidal TIFF"):
        open_reader(str(tmp_path / "huge.png"))


def test_regions_of_a_label_map_are_polygons_with_holes_counted_exactly():
    from keras_fcn_surgery.batch.regions import regions

    labels = np.full((9, 10), -1, np.int32)  # -1: not computed, in no region
    labels[1:8, 1:8] = 1
    labels[3:6, 3:6] = 2  # an island of class 2 makes a hole in class 1's square
    labels[0, 9] = 1  # a second region of class 1, one pixel, not touching the first
    probability = np.full(labels.shape, 0.5, np.float32)
    probability[labels == 2] = 0.9
    found = {(r.label, r.pixels): r for r in regions(labels, probability)}
    assert set(found) == {(1, 40), (2, 9), (1, 1)}
    square = found[(1, 40)]
    assert square.box == (1, 1, 8, 8) and len(square.rings) == 2
    outer, hole = square.rings
    assert outer[:, 0].min() == 1 and outer[:, 0].max() == 8 and outer[:, 1].min() == 1 and outer[:, 1].max() == 8
    assert hole[:, 0].min() == 3 and hole[:, 0].max() == 6  # the hole's edges are the island's pixel edges
    assert found[(2, 9)].mean_probability == pytest.approx(0.9) and len(found[(2, 9)].rings) == 1
    area = [0.5 * np.sum(r[:, 0] * np.roll(r[:, 1], -1) - np.roll(r[:, 0], -1) * r[:, 1]) for r in square.rings]
    assert area[0] > 0 > area[1]  # outer counter-clockwise, hole clockwise as written: GeoJSON's right-hand rule
    assert area[0] + area[1] == pytest.approx(40, abs=4)  # four corners of each ring cut by half a pixel squared


def _inside(rings, x, y):
    """Even-odd rule over all rings of one polygon, for points ``(x, y)`` (arrays)."""
    inside = np.zeros(x.shape, bool)
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
            crosses = (y0 > y) != (y1 > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (x < at)
    return inside


def test_region_polygons_follow_pixel_edges_exactly_and_tile_the_map():
    # Issue 28: corners were cut by half-pixel diagonals; areas missed the pixel counts, the union left gaps.
    from keras_fcn_surgery.batch.regions import regions

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, (14, 17)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = -1
    labels[2:9, 3:12] = 1
    labels[4:6, 5:7] = 2  # a hole, and islands touching it at corners below
    labels[6, 7] = 2
    found = list(regions(labels, np.full(labels.shape, 0.5, np.float32)))
    rows, cols = np.mgrid[: labels.shape[0], : labels.shape[1]]
    centres_x, centres_y = cols + 0.5, rows + 0.5
    covered = np.zeros(labels.shape, np.int32)
    for region in found:
        area = sum(0.5 * np.sum(r[:, 0] * np.roll(r[:, 1], -1) - np.roll(r[:, 0], -1) * r[:, 1]) for r in region.rings)
        assert area == region.pixels, region  # outer minus holes, exactly
        assert all(np.all(r == np.round(r)) for r in region.rings), "a corner off the pixel grid"
        mine = _inside(region.rings, centres_x, centres_y)
        assert np.all(labels[mine] == region.label) and mine.sum() == region.pixels
        covered += mine
    np.testing.assert_array_equal(covered, (labels >= 0).astype(np.int32))  # every labelled pixel once


def _classifier_map(shape=(23, 31), classes=3, seed=6):
    """Scores with patches of one top class (blocks, with noise), a few NaN cells and a NaN band (masked out)."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, classes, (shape[0] // 4 + 1, shape[1] // 4 + 1))
    top = np.kron(block, np.ones((4, 4), np.int64))[: shape[0], : shape[1]]
    noisy = rng.random(shape) < 0.15
    top[noisy] = rng.integers(0, classes, int(noisy.sum()))
    scores = rng.normal(0, 1, (*shape, classes)).astype(np.float32)
    scores[np.arange(shape[0])[:, None], np.arange(shape[1]), top] += 4.0
    scores[rng.random(shape) < 0.05] = np.nan
    scores[9:11, 5:20] = np.nan
    return scores


def _classifier_info(shape):
    from keras_fcn_surgery.batch.writers import MapInfo

    # A geometry with everything unequal: strides, windows, offsets and downsample differ per axis.
    return MapInfo(
        source="slide.tif",
        level=1,
        downsample=(2.0, 3.0),
        level_size=(shape[0] * 4, shape[1] * 8),
        stride=(4, 8),
        offset=(-3, 2),
        receptive_field=(11, 15),
        computed_fraction=1.0,
    )


def _polygon_area(rings):
    return sum(0.5 * np.sum(r[:, 0] * np.roll(r[:, 1], -1) - np.roll(r[:, 0], -1) * r[:, 1]) for r in rings)


def test_geojson_regions_of_a_classifier_map_are_the_exact_union_of_their_cells_boxes(tmp_path):
    # Issue 28: one detection per cell made 233 MB for a slide; neighbouring cells of one class are one region.
    import json

    from keras_fcn_surgery.batch.writers import cell_polygons, class_colour, top_classes, write_geojson

    scores = _classifier_map()
    info = _classifier_info(scores.shape)
    write_geojson(str(tmp_path / "map.geojson"), scores, info, class_names=["a", "b", "c"])
    with open(tmp_path / "map.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    labels = np.full(scores.shape[:2], -1)
    probability = np.zeros(scores.shape[:2])
    for rows, cols, classes, probabilities in top_classes(scores):
        labels[rows, cols], probability[rows, cols] = classes, probabilities
    rows, cols = np.mgrid[: labels.shape[0], : labels.shape[1]]
    x0, y0, x1, y1 = cell_polygons(rows, cols, info)
    box_area = (x1 - x0)[0, 0] * (y1 - y0)[0, 0]
    assert box_area == 4 * 2 * 8 * 3
    owner = np.full(labels.shape, -1)
    assert 0 < len(features) < (labels >= 0).sum() / 3
    for number, feature in enumerate(features):
        properties = feature["properties"]
        k, cells = properties["class"], properties["measurements"]["cells"]
        assert feature["geometry"]["type"] == "Polygon"
        assert properties["classification"]["name"] == "abc"[k] and properties["objectType"] == "annotation"
        assert properties["classification"]["color"] == list(class_colour(k))  # QuPath's class colour
        rings = [np.asarray(ring, np.float64) for ring in feature["geometry"]["coordinates"]]
        assert all(len(r) >= 5 and (r[0] == r[-1]).all() for r in rings)
        assert _polygon_area(rings[:1]) > 0 and all(_polygon_area([r]) < 0 for r in rings[1:])  # right-hand rule
        assert _polygon_area(rings) == cells * box_area  # outer minus holes: exactly the cells' boxes
        mine = _inside(rings, (x0 + x1) / 2, (y0 + y1) / 2)  # the cells whose box centre the polygon holds
        assert mine.sum() == cells and (labels[mine] == k).all()
        assert (owner[mine] == -1).all()  # no cell in two regions
        owner[mine] = number
        assert properties["measurements"]["mean probability"] == pytest.approx(probability[mine].mean(), rel=1e-6)
        assert properties["measurements"]["max probability"] == pytest.approx(probability[mine].max(), rel=1e-6)
    np.testing.assert_array_equal(owner >= 0, labels >= 0)  # every kept cell in a region; NaN cells in none
    # Regions of one class never touch along an edge: neighbouring cells of one class share their region.
    for a, b in ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:, 1:], np.s_[:, :-1])):
        same_class = (labels[a] == labels[b]) & (labels[a] >= 0)
        np.testing.assert_array_equal(owner[a][same_class], owner[b][same_class])


def test_geojson_cells_gives_one_detection_per_computed_cell(tmp_path):
    import json

    from keras_fcn_surgery.batch.writers import cell_polygons, class_colour, top_classes, write_geojson

    scores = _classifier_map()
    info = _classifier_info(scores.shape)
    write_geojson(str(tmp_path / "map.geojson"), scores, info, geojson="cells")
    with open(tmp_path / "map.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    expected = []
    for rows, cols, classes, probabilities in top_classes(scores):
        x0, y0, x1, y1 = cell_polygons(rows, cols, info)
        for n in range(len(rows)):
            ring = [[x0[n], y0[n]], [x1[n], y0[n]], [x1[n], y1[n]], [x0[n], y1[n]], [x0[n], y0[n]]]
            properties = {
                "objectType": "detection",
                "classification": {"name": f"class {classes[n]}", "color": list(class_colour(int(classes[n])))},
                "measurements": {"probability": float(probabilities[n])},
                "row": int(rows[n]),
                "col": int(cols[n]),
                "class": int(classes[n]),
            }
            expected.append(
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}
            )
    assert len(features) == (~np.isnan(scores).any(axis=-1)).sum()
    assert features == expected
    with pytest.raises(InputError, match="geojson"):
        write_geojson(str(tmp_path / "other.geojson"), scores, info, geojson="polygons")
