"""`keras-fcn-surgery segment`: overlay, label array, exact tiles, classifiers as FCN-32s, refusals."""

import os

import numpy as np
from PIL import Image
from test_segment import pooled_net

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.segmentation.predict import reach, segment_image


def _image(tmp_path, size=(45, 52)):
    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    return os.fspath(path), pixels.astype(np.float32)


def test_segment_writes_overlay_and_labels_equal_to_the_model_and_tiles_agree(tmp_path, capsys):
    model = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2])
    model_path = os.fspath(tmp_path / "seg.keras")
    model.save(model_path)
    image_path, pixels = _image(tmp_path, (100, 110))
    out, labels = tmp_path / "mask.png", tmp_path / "labels.npy"
    assert cli.main(["segment", model_path, image_path, "-o", os.fspath(out), "--labels", os.fspath(labels)]) == 0
    written = np.load(labels)
    np.testing.assert_array_equal(written, segment_image(model, pixels).argmax(-1))
    assert Image.open(out).size[1] >= 100
    margin, period = reach(model)
    tiled = tmp_path / "tiled.npy"
    side = 2 * max(margin) + 2 * max(period)
    assert side < 100  # two tiles or more on each axis
    arguments = ["segment", model_path, image_path, "-o", os.fspath(tmp_path / "t.png"), "--labels", os.fspath(tiled)]
    assert cli.main([*arguments, "--tile", str(side)]) == 0
    np.testing.assert_array_equal(np.load(tiled), written)
    assert "labels by share of pixels" in capsys.readouterr().out


def test_segment_takes_a_classifier_as_fcn32s_of_its_classes(tmp_path):
    classifier = pooled_net(classes=4)
    path = os.fspath(tmp_path / "clf.keras")
    classifier.save(path)
    image_path, pixels = _image(tmp_path, (33, 40))
    labels = tmp_path / "labels.npy"
    arguments = ["segment", path, image_path, "-o", os.fspath(tmp_path / "m.png"), "--labels", os.fspath(labels)]
    assert cli.main(arguments) == 0
    expected = segment_image(kfs.segmenter(classifier, skips=()), pixels).argmax(-1)
    np.testing.assert_array_equal(np.load(labels), expected)


def test_segment_refuses_existing_output_before_any_work(tmp_path, capsys):
    out = tmp_path / "mask.png"
    out.write_bytes(b"keep")
    assert cli.main(["segment", "missing.keras", "image.png", "-o", os.fspath(out)]) == 2
    assert out.read_bytes() == b"keep"
    assert "--overwrite" in capsys.readouterr().err


def test_predict_command_writes_a_segmenters_logits_per_pixel_whole_tiled_and_masked(tmp_path):
    import zarr

    model = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2])
    model_path = os.fspath(tmp_path / "seg.keras")
    model.save(model_path)
    image_path, pixels = _image(tmp_path, (100, 110))
    expected = segment_image(model, pixels)
    scale = float(np.abs(expected).max())
    assert scale > 0 and float(expected.std()) > 1e-3 * scale  # a map that can tell right from wrong

    whole = tmp_path / "whole"
    assert cli.main(["predict", model_path, image_path, "--out", os.fspath(whole), "--format", "npz,zarr"]) == 0
    with np.load(whole / "image.npz") as written:
        np.testing.assert_allclose(written["scores"], expected, rtol=0, atol=1e-5 * scale)
        assert tuple(written["stride"]) == (1, 1) and tuple(written["offset"]) == (0, 0)
    np.testing.assert_allclose(zarr.open_group(whole / "image.zarr")["scores"][:], expected, rtol=0, atol=1e-5 * scale)

    margin, period = reach(model)
    side = 2 * max(margin) + 2 * max(period)
    tiled = tmp_path / "tiled"
    assert cli.main(["predict", model_path, image_path, "--out", os.fspath(tiled), "--tile", str(side)]) == 0
    with np.load(tiled / "image.npz") as written:
        np.testing.assert_allclose(written["scores"], expected, rtol=0, atol=1e-5 * scale)

    mask = np.zeros((100, 110), np.uint8)
    mask[:30] = 255  # the top 30 rows
    Image.fromarray(mask).save(tmp_path / "mask.png")
    masked = tmp_path / "masked"
    arguments = ["predict", model_path, image_path, "--out", os.fspath(masked), "--tile", str(side)]
    assert cli.main([*arguments, "--mask", os.fspath(tmp_path / "mask.png")]) == 0
    with np.load(masked / "image.npz") as written:
        scores = written["scores"]
        np.testing.assert_allclose(scores[:30], expected[:30], rtol=0, atol=1e-5 * scale)
        assert np.isnan(scores[30:]).all()
        assert 0 < float(written["computed_fraction"]) < 1  # tiles of the bottom rows were not computed


def test_predict_command_writes_a_segmenters_regions_as_geojson_and_csv(tmp_path):
    import csv
    import json

    model = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2])
    model_path = os.fspath(tmp_path / "seg.keras")
    model.save(model_path)
    image_path, pixels = _image(tmp_path, (60, 70))
    labels = segment_image(model, pixels).argmax(-1)
    out = tmp_path / "out"
    arguments = ["predict", model_path, image_path, "--out", os.fspath(out), "--format", "geojson,csv"]
    assert cli.main(arguments) == 0
    features = json.loads((out / "image.geojson").read_text())["features"]
    rows = list(csv.DictReader((out / "image.csv").open()))
    assert len(features) == len(rows) >= 1
    for k in range(3):  # every pixel of a class is in one of that class's regions
        counted = sum(f["properties"]["measurements"]["pixels"] for f in features if f["properties"]["class"] == k)
        assert counted == int((labels == k).sum())
        assert counted == sum(int(r["pixels"]) for r in rows if int(r["class"]) == k)
    for feature in features:  # the polygon's area is the region's, within the corners cut by marching squares
        outer, *holes = feature["geometry"]["coordinates"]
        area = _ring_area(outer) - sum(_ring_area(h) for h in holes)
        pixels_in = feature["properties"]["measurements"]["pixels"]
        assert abs(area - pixels_in) <= 0.5 * sum(len(r) for r in (outer, *holes)), (area, pixels_in)


def _ring_area(ring):
    points = np.asarray(ring)
    x, y = points[:, 0], points[:, 1]
    return abs(0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


def test_segment_names_the_classes_it_reports(tmp_path, capsys):
    model = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2])
    model_path = os.fspath(tmp_path / "seg.keras")
    model.save(model_path)
    image_path, _ = _image(tmp_path, (40, 44))
    names = tmp_path / "names.txt"
    names.write_text("sky\nsea\nsand\n")
    argv = ["segment", model_path, image_path, "-o", os.fspath(tmp_path / "m.png"), "--class-names", os.fspath(names)]
    assert cli.main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("labels by share"))
    assert any(f"{k} {name}: " in line for k, name in enumerate(("sky", "sea", "sand")))  # issue 28: indices only
