"""One rule across the Python API: a model as itself or its file's path, an image as an array, a PIL image or
its file's path, and `preprocess` as a function or a name the CLI takes ("unit", "caffe", ...)."""

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arguments")
    classifier = small_flatten_cnn(softmax=False)
    fcn = kfs.convert(classifier)
    kfs.save_model(fcn, folder / "fcn.keras")
    pixels = np.random.default_rng(0).integers(0, 255, (44, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    return folder, classifier, fcn, pixels


def test_predict_map_takes_preprocess_names_model_paths_pil_images_and_image_paths(setup):
    folder, _, fcn, pixels = setup
    raw = pixels.astype(np.float32)
    expected = kfs.predict_map(fcn, raw / 255.0)
    for model in (fcn, folder / "fcn.keras", str(folder / "fcn.keras")):
        for image in (raw, Image.fromarray(pixels), folder / "photo.png", str(folder / "photo.png")):
            scores = kfs.predict_map(model, image, preprocess="unit")
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(kfs.InputError, match=r"`preprocess` to be a function or one of .*'unit'"):
        kfs.predict_map(fcn, raw, preprocess="units")


def test_the_other_entry_points_follow_the_same_rule(setup):
    folder, classifier, fcn, pixels = setup
    raw = pixels.astype(np.float32)
    expected = kfs.predict_map(fcn, raw / 255.0)
    maps = kfs.predict_maps(folder / "fcn.keras", [folder / "photo.png", Image.fromarray(pixels)], preprocess="unit")
    for scores in maps:
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with pytest.warns(kfs.InexactMapWarning):
        certificate = kfs.certify_map(classifier, folder / "photo.png", expected, 4, preprocess="unit")
    assert len(certificate.cells) == 4  # same padding: not exact, but run on the file's pixels, preprocessed
    plan = kfs.plan_prediction(folder / "fcn.keras", (512, 512), tile=256)
    assert plan is not None
    picture = kfs.heatmap(folder / "photo.png", expected, kfs.geometry(fcn), 0)
    assert picture.size[1] >= 44
    windows = kfs.sliding_window_predict(classifier, Image.fromarray(pixels), 4, preprocess="unit")
    assert windows.shape[-1] == expected.shape[-1]


@pytest.mark.parametrize("command", ["heatmap", "predict", "segment", "export"])
def test_help_states_the_preprocess_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0-255 pixels" in text and ("default: none" in text or "none (default" in text), text
