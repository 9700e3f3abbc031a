"""A saved FCN remembers its classifier's input size: reloaded, it certifies on the crops the in-memory one
does (the README's flow: `convert` to fcn.keras, then `heatmap`/`predict` on that file)."""

import os

import keras
import numpy as np
from models import valid_gap_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.saving.record import source_input_size


def _image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (44, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    return pixels.astype(np.float32) / 255.0


def test_a_converted_and_saved_fcn_records_its_classifier_input_size(tmp_path):
    classifier = valid_gap_cnn(input_size=(20, 20), classes=3)
    fcn = kfs.convert(classifier)
    kfs.save_model(fcn, tmp_path / "fcn.keras")
    loaded = kfs.load_model(tmp_path / "fcn.keras")
    assert source_input_size(loaded) == (20, 20) == source_input_size(fcn)
    assert keras.models.load_model(tmp_path / "fcn.keras") is not None  # still a plain Keras file

    image = _image(tmp_path)
    scores = kfs.predict_map(loaded, image)
    in_memory = kfs.certify_map(fcn, image, kfs.predict_map(fcn, image), 6)
    reloaded = kfs.certify_map(loaded, image, scores, 6)
    assert "smallest input size" not in reloaded.against
    assert reloaded.cells == in_memory.cells and reloaded.exact and in_memory.exact
    np.testing.assert_allclose(scores, kfs.predict_map(fcn, image), rtol=0, atol=1e-6)


def test_the_readme_flow_certifies_a_converted_file_on_the_classifier_crops(tmp_path, capsys):
    classifier = valid_gap_cnn(input_size=(20, 20), classes=3)
    classifier.save(tmp_path / "model.keras")
    _image(tmp_path)
    assert main(["convert", str(tmp_path / "model.keras"), str(tmp_path / "fcn.keras")]) == 0
    argv = ["heatmap", str(tmp_path / "fcn.keras"), str(tmp_path / "photo.png"), "--class", "0"]
    assert main([*argv, "-o", str(tmp_path / "heat.png"), "--preprocess", "unit"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("certificate:"))
    assert "20x20 crops" in line and "--input-size" not in line and "smallest" not in line, line
    assert sorted(os.listdir(tmp_path)) == ["fcn.keras", "heat.png", "model.keras", "photo.png"]


def test_a_file_written_by_model_save_still_asks_for_the_size(tmp_path):
    fcn = kfs.convert(valid_gap_cnn(input_size=(20, 20), classes=3))
    fcn.save(tmp_path / "plain.keras")
    assert source_input_size(kfs.load_model(tmp_path / "plain.keras")) is None
