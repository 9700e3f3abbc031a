"""Heatmaps that do not mislead: the absolute probability scale by default (the relative one asked for and
labelled), legend ends that differ, and one class-name rule for `heatmap` and `predict`."""

import json

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.inference.heatmap import class_names_for, scale_labels


class _Grid:
    """A stride-1 grid of one-pixel windows: cell (i, j) is pixel (i, j)."""

    def at(self, size):
        return self

    stride, receptive_field, offset = (1, 1), (1, 1), (0, 0)

    def output_size(self, size):
        return tuple(size)


def _uncertain_map(size=(8, 8)):
    """Probabilities of class 0 between 0.154 and 0.228: an uncertain model."""
    p0 = np.linspace(0.154, 0.228, size[0] * size[1]).reshape(size)
    return np.stack([p0, 1 - p0], axis=-1)


def test_the_default_scale_is_absolute_and_the_relative_one_is_labelled():
    image = np.zeros((8, 8, 3), np.uint8)
    probs = _uncertain_map()
    absolute = np.asarray(kfs.heatmap(image, probs, _Grid(), 0, style=kfs.HeatmapStyle(alpha=1.0)))
    style = kfs.HeatmapStyle(alpha=1.0, value_range="relative")
    relative = np.asarray(kfs.heatmap(image, probs, _Grid(), 0, style=style))
    # p = 0.228 on the absolute scale is a dark red, far from white; the relative scale draws it white.
    assert absolute[7, 7].tolist() != [255, 255, 255] and absolute[7, 7, 2] == 0 and absolute[7, 7, 0] < 200
    assert relative[7, 7].tolist() == [255, 255, 255]
    labelled = kfs.heatmap(image, probs, _Grid(), 0, style=kfs.HeatmapStyle(value_range="relative"))
    legend = np.asarray(labelled)[:, 16:]
    assert not np.array_equal(legend, np.asarray(kfs.heatmap(image, probs, _Grid(), 0))[:, 16:])  # labelled


def test_legend_ends_are_told_apart():
    assert scale_labels((0.0012, 0.0014)) == ("0.0012", "0.0014")
    assert scale_labels((0.0, 1.0)) == ("0", "1")


def test_one_class_name_rule():
    assert class_names_for(None, 5) is None
    assert class_names_for(None, 1000)[0] == kfs.imagenet_class_names()[0]
    assert class_names_for("imagenet", 1000) == kfs.imagenet_class_names()
    with pytest.raises(kfs.InputError, match="1000; the model has 5"):
        class_names_for("imagenet", 5)


@pytest.fixture
def files(tmp_path):
    small_flatten_cnn(classes=1000).save(tmp_path / "imagenet_like.keras")
    small_flatten_cnn(classes=5).save(tmp_path / "small.keras")
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    return tmp_path


def test_heatmap_and_predict_name_classes_alike(files, capsys):
    for model, named in (("imagenet_like.keras", True), ("small.keras", False)):
        argv = ["heatmap", str(files / model), str(files / "photo.png"), "--class", "0", "--certify", "0"]
        assert main([*argv, "-o", str(files / f"{model}.png")]) == 0
        out = capsys.readouterr().out
        assert "heat scale: black = p 0, white = p 1" in out and "relative" not in out
        top = [line for line in out.splitlines() if line.startswith("  ")]
        predict = ["predict", str(files / model), str(files / "photo.png"), "-o", str(files / model[:-6])]
        assert main([*predict, "--format", "geojson", "--geojson", "cells", "--certify", "0"]) == 0
        capsys.readouterr()
        features = json.loads((files / model[:-6] / "photo.geojson").read_text())["features"]
        name = features[0]["properties"]["classification"]["name"]
        names = kfs.imagenet_class_names()
        if named:
            assert name in names and any(n in line for line in top for n in names)
        else:
            assert name.startswith("class ") and not any(n in " ".join(top) for n in names[:20])
    argv = ["heatmap", str(files / "small.keras"), str(files / "photo.png"), "--class", "0", "--relative"]
    assert main([*argv, "-o", str(files / "r.png"), "--certify", "0"]) == 0
    assert "(relative: this map's range" in capsys.readouterr().out
