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
