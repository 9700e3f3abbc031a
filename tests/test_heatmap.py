"""Heatmap pictures: alignment of cells on the image, the picture, the CLI, the ImageNet names."""

import keras
import numpy as np
import pytest
from keras import layers
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.inference.heatmap import LEGEND_WIDTH, cell_coordinates, class_probabilities, upsample


def _classifier(classes=1000, size=32):
    """Two strided valid convolutions, Flatten + Dense(softmax): stride 8."""
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(4, 4, strides=4, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(classes, activation="softmax"),
        ],
        name="tiny",
    )


def _same_padding_fcn():
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = layers.Conv2D(4, 5, strides=2, padding="same")(x)
    return keras.Model(inputs, layers.Conv2D(3, 1)(x))


def test_cell_centres_land_on_their_windows_centres():
    grid = kfs.geometry(_same_padding_fcn())
    size = (41, 37)
    cells = grid.output_size(size)
    rows, cols = cell_coordinates(grid, size, cells)
    at = grid.at(size)
    for i in range(1, cells[0] - 1):
        top, _, bottom, _ = at.input_box(i, 0)
        centre = (top + bottom - 1) / 2  # pixel index of the window's centre
        if centre == int(centre):
            assert rows[int(centre)] == pytest.approx(i)
        else:  # halfway between two pixels: they sit symmetrically around the cell
            assert rows[int(centre)] + rows[int(centre) + 1] == pytest.approx(2 * i)
    assert rows.min() == 0 and rows.max() == cells[0] - 1
    assert len(rows) == size[0] and len(cols) == size[1]
    # Magnified display: the same positions, in display pixels.
    big_rows, _ = cell_coordinates(grid, size, cells, scale=4)
    assert len(big_rows) == 4 * size[0]
    inner = (rows > 0) & (rows < cells[0] - 1)  # away from the clamped ends
    centres = np.interp(np.arange(size[0]) * 4 + 1.5, np.arange(4 * size[0]), big_rows)
    assert centres[inner] == pytest.approx(rows[inner])


def test_upsample_is_bilinear_between_cells():
    values = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = upsample(values, np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(out, [[0, 0.25, 1], [1, 1.25, 2], [2, 2.25, 3]])


def test_class_probabilities_softmax_only_for_scores():
    probs = np.array([[[0.2, 0.8]]])
    np.testing.assert_allclose(class_probabilities(probs), probs)
    logits = np.array([[[0.0, np.log(3.0)]]])
    np.testing.assert_allclose(class_probabilities(logits), [[[0.25, 0.75]]], rtol=1e-6)


def test_heatmap_picture_size_and_errors():
    fcn = _same_padding_fcn()
    image = np.random.default_rng(0).uniform(0, 255, (330, 300, 3)).astype("float32")
    scores = kfs.predict_map(fcn, image)
    picture = kfs.heatmap(image, scores, kfs.geometry(fcn), 1, class_names=["a", "b", "c"])
    assert picture.size == (2 * 300 + LEGEND_WIDTH, 330)
    magnified = kfs.heatmap(image, scores, kfs.geometry(fcn), 0, style=kfs.HeatmapStyle(scale=2))
    assert magnified.size == (4 * 300 + LEGEND_WIDTH, 660)
    with pytest.raises(kfs.InputError, match="Expected `style` to be a HeatmapStyle"):
        kfs.heatmap(image, scores, kfs.geometry(fcn), 0, style={"scale": 2})
    with pytest.raises(kfs.ConversionError, match="Class 3 does not exist"):
        kfs.heatmap(image, scores, kfs.geometry(fcn), 3)
    with pytest.raises(kfs.ConversionError, match="do not belong together"):
        kfs.heatmap(image[:200], scores, kfs.geometry(fcn), 0)


def test_imagenet_class_names_ship_with_the_package():
    names = kfs.imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heatmap")
    keras.utils.set_random_seed(3)
    classifier = _classifier()
    classifier.save(folder / "classifier.keras")
    kfs.convert(classifier).save(folder / "fcn.keras")
    image = np.random.default_rng(0).integers(0, 256, (320, 344, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "image.png")
    return folder


@pytest.mark.parametrize("model", ["classifier.keras", "fcn.keras"])
def test_cli_writes_a_png_of_the_expected_size(model_files, model, tmp_path, capsys):
    out = tmp_path / "map.png"
    argv = ["heatmap", str(model_files / model), str(model_files / "image.png"), "--class", "7", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top classes" in printed and "class" in printed
    names = kfs.imagenet_class_names()
    assert sum(name in printed for name in names) >= 3  # K == 1000: printed by name
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (2 * 344 + LEGEND_WIDTH, 320)


def test_cli_never_overwrites_without_the_flag(model_files, tmp_path, capsys):
    out = tmp_path / "map.png"
    out.write_bytes(b"keep me")
    argv = ["heatmap", str(model_files / "fcn.keras"), str(model_files / "image.png"), "--class", "1", "-o", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main([*argv, "--overwrite", "--tile", "96"]) == 0
    with Image.open(out) as picture:
        assert picture.size == (2 * 344 + LEGEND_WIDTH, 320)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]


def test_cli_rejects_a_class_out_of_range(model_files, tmp_path, capsys):
    out = tmp_path / "map.png"
    argv = [
        "heatmap",
        str(model_files / "fcn.keras"),
        str(model_files / "image.png"),
        "--class",
        "1000",
        "-o",
        str(out),
    ]
    assert main(argv) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()
