"""Models of several outputs end to end: maps (whole, tiled, staged, masked), heatmaps, predict, exports.

The classifier is shaped like mtcnn's ONet: a shared convolutional body, a
Flatten and a Dense, then three heads (a box, landmarks, a softmax face
score), the score last, so that picking it by default is tested.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.inference.heatmap import LEGEND_WIDTH

NAMES = ["box", "landmarks", "prob"]
WINDOW, STRIDE = 16, 2
RELATIVE = 1e-5


def three_head_classifier():
    """16x16 RGB -> box (4, linear), landmarks (6, linear), prob (2, softmax); valid padding, stride 2."""
    image = keras.Input((WINDOW, WINDOW, 3))
    x = layers.Conv2D(4, 3, activation="relu")(image)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(6, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(8, activation="relu")(x)
    heads = [
        layers.Dense(4, name="box")(x),
        layers.Dense(6, name="landmarks")(x),
        layers.Dense(2, activation="softmax", name="prob")(x),
    ]
    return keras.Model(image, heads, name="three_heads")


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(5)
    classifier = three_head_classifier()
    return classifier, kfs.as_fcn(classifier)


def crops_of(classifier, image) -> dict:
    """Each output of the classifier on every 16x16 crop at stride 2, as maps (H', W', K)."""
    rows, cols = ((n - WINDOW) // STRIDE + 1 for n in image.shape[:2])
    crops = np.stack(
        [
            image[i * STRIDE : i * STRIDE + WINDOW, j * STRIDE : j * STRIDE + WINDOW]
            for i in range(rows)
            for j in range(cols)
        ]
    )
    outputs = classifier(crops, training=False)
    return {name: np.asarray(y).reshape(rows, cols, -1) for name, y in zip(NAMES, outputs)}


def assert_same_maps(got, want, what=""):
    assert list(got) == list(want), what
    for name in want:
        assert got[name].shape == want[name].shape, (what, name)
        scale = np.abs(want[name]).max()
        assert np.abs(got[name] - want[name]).max() <= RELATIVE * scale, (what, name)


@pytest.mark.parametrize(("tile", "staged"), [(None, None), (20, False), (20, True)])
def test_every_output_of_predict_map_equals_the_classifier_on_every_crop(models, tile, staged):
    classifier, fcn = models
    image = random_images((37, 33, 3), seed=1)
    maps = kfs.predict_map(fcn, image, tile=tile, staged=staged, batch_size=3)
    assert isinstance(maps, kfs.OutputMaps) and isinstance(maps, dict)
    assert_same_maps(maps, crops_of(classifier, image), f"tile={tile}, staged={staged}")
    plan = kfs.plan_prediction(fcn, image.shape[:2], tile=tile, staged=staged, batch_size=3)
    assert [(o.name, o.map_size, o.classes) for o in plan.outputs] == [
        ("box", (11, 9), 4),
        ("landmarks", (11, 9), 6),
        ("prob", (11, 9), 2),
    ]
    assert "3 outputs: box 11x9x4, landmarks 11x9x6, prob 11x9x2" in str(plan)
    if tile is not None:
        assert plan.staged == bool(staged) and plan.stages[0].tiles > 1, str(plan)
        assert plan.stages[-1].stop == "box+landmarks+prob"


def test_masked_and_batched_maps_of_several_outputs(models):
    classifier, fcn = models
    image = random_images((37, 33, 3), seed=2)
    whole = crops_of(classifier, image)
    keep = np.zeros((11, 9), dtype=bool)
    keep[1:4, 5:8] = keep[9, 0] = True
    masked = kfs.predict_map(fcn, image, tile=20, keep=keep)
    for name in NAMES:
        assert np.isnan(masked[name][~keep]).all()
        np.testing.assert_allclose(masked[name][keep], whole[name][keep], atol=RELATIVE * np.abs(whole[name]).max())
    second = random_images((37, 33, 3), seed=3)
    batched = kfs.predict_maps(fcn, [image, second])
    assert_same_maps(batched[0], whole)
    assert_same_maps(batched[1], crops_of(classifier, second))
    assert_same_maps(kfs.sliding_window_predict(classifier, image, STRIDE), whole)
    assert str(kfs.geometry(fcn)) == str(kfs.geometry(fcn, output="prob")) == str(kfs.geometry(classifier))


class _TwoHeads(keras.Model):
    """A subclassed classifier of two outputs (as mtcnn's nets are written)."""

    def __init__(self):
        super().__init__(name="two_heads")
        self.body = layers.Conv2D(3, 5, strides=2, activation="relu")
        self.flatten = layers.Flatten()
        self.score = layers.Dense(2, activation="softmax", name="score")
        self.box = layers.Dense(4, name="offsets")

    def call(self, x):
        features = self.flatten(self.body(x))
        return self.score(features), self.box(features)


def test_a_subclassed_classifier_of_two_outputs_slides_and_maps_alike():
    model = _TwoHeads()
    model(np.zeros((1, 11, 11, 3), "float32"))
    image = random_images((27, 23, 3), seed=8)
    slid = kfs.sliding_window_predict(model, image, 2)
    maps = kfs.predict_map(kfs.as_fcn(model), image, tile=15)
    assert list(slid) == list(maps) == ["score", "offsets"] and maps.pick()[0] == "score"
    assert_same_maps(maps, slid)


def test_every_output_is_certified_against_the_classifier_on_its_crops(models):
    classifier, fcn = models
    image = random_images((37, 33, 3), seed=9)
    maps, certificates = kfs.predict_map(fcn, image, tile=20, certify=6)
    assert list(maps) == list(certificates) == NAMES
    for name, certificate in certificates.items():
        assert certificate.exact and len(certificate.cells) == 6, (name, certificate)
        assert certificate.against == "classifier 'three_heads'"
    one = kfs.certify_map(classifier, image, maps, 6, output="landmarks")
    assert one.cells == certificates["landmarks"].cells and one.exact
    with pytest.raises(kfs.InputError, match="give the dict of their maps"):
        kfs.certify_map(fcn, image, maps["prob"], 6)


def test_outputs_on_different_grids_run_whole_and_refuse_tiles_naming_the_strides():
    image_input = keras.Input((None, None, 3))
    features = layers.Conv2D(4, 3, activation="relu")(image_input)
    fine = layers.Conv2D(2, 1, activation="softmax", name="fine")(features)
    coarse = layers.Conv2D(3, 3, name="coarse")(layers.MaxPooling2D(2)(features))
    fcn = keras.Model(image_input, [fine, coarse])
    image = random_images((29, 26, 3), seed=4)
    maps = kfs.predict_map(fcn, image)
    for name, want in zip(["fine", "coarse"], fcn(image[None])):
        np.testing.assert_allclose(maps[name], np.asarray(want)[0], atol=1e-6)
    assert kfs.geometry(fcn, output="coarse").output_size((29, 26)) == maps["coarse"].shape[:2] == (11, 10)
    assert kfs.geometry(fcn, output="fine").stride == (1, 1)
    with pytest.raises(kfs.ConversionError, match="'fine' stride 1, 'coarse' stride 2"):
        kfs.geometry(fcn)
    with pytest.raises(kfs.ConversionError, match="'fine' stride 1, 'coarse' stride 2.*use `tile=None`"):
        kfs.predict_map(fcn, image, tile=12)
    with pytest.raises(kfs.InputError, match="no output named 'box'; its outputs are 'fine', 'coarse'"):
        kfs.geometry(fcn, output="box")


def test_heatmap_shows_the_probabilities_by_default_and_any_output_by_name(models):
    _, fcn = models
    image = random_images((37, 33, 3), seed=5)
    maps = kfs.predict_map(fcn, image)
    grid = kfs.geometry(fcn)
    default = np.asarray(kfs.heatmap(image, maps, grid, 1))
    np.testing.assert_array_equal(default, np.asarray(kfs.heatmap(image, maps, grid, 1, output="prob")))
    np.testing.assert_array_equal(default, np.asarray(kfs.heatmap(image, maps["prob"], grid, 1)))
    landmarks = kfs.heatmap(image, maps, grid, 5, output="landmarks")
    assert landmarks.size == (2 * 33 + LEGEND_WIDTH, max(37, landmarks.height))
    with pytest.raises(kfs.InputError, match="no output named 'face'; its outputs are 'box', 'landmarks', 'prob'"):
        kfs.heatmap(image, maps, grid, 1, output="face")
    with pytest.raises(kfs.InputError, match="3 maps were given .*`output=NAME`"):
        kfs.heatmap(image, dict(maps), grid, 1)


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    classifier, _ = models
    folder = tmp_path_factory.mktemp("several_outputs")
    classifier.save(folder / "classifier.keras")
    pixels = np.random.default_rng(6).integers(0, 256, (37, 33, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    return folder, pixels


def test_cli_heatmap_takes_an_output_name(files, tmp_path, capsys):
    folder, _ = files
    argv = ["heatmap", str(folder / "classifier.keras"), str(folder / "image.png"), "-o", str(tmp_path / "a.png")]
    assert main([*argv, "--class", "1"]) == 0
    printed = capsys.readouterr().out
    assert "output 'prob' of 3 (the others: box, landmarks" in printed
    assert "certificate of 'prob': 8 of 99 eligible cells" in printed and ": exact" in printed
    assert main([*argv, "--class", "5", "--overwrite"]) == 2  # prob has 2 classes
    assert "out of range: the model has 2 classes" in capsys.readouterr().err
    assert main([*argv, "--class", "5", "--overwrite", "--output-name", "landmarks"]) == 0
    assert "output 'landmarks' of 3" in capsys.readouterr().out
    with Image.open(tmp_path / "a.png") as picture:
        assert picture.width == 2 * 33 + LEGEND_WIDTH
    assert main([*argv, "--class", "0", "--overwrite", "--output-name", "face"]) == 2
    error = capsys.readouterr().err
    assert "no output named 'face'; its outputs are 'box', 'landmarks', 'prob'" in error
    assert "--output-name NAME" in error and "output=NAME" not in error


def test_predict_writes_every_output_and_describes_the_one_named(models, files, tmp_path, capsys):
    _, fcn = models
    folder, pixels = files
    import zarr

    summary = kfs.predict_images(folder / "classifier.keras", [folder / "image.png"], tmp_path, formats="npz,zarr,csv")
    assert summary.ok, summary.failed
    want = kfs.predict_map(fcn, pixels.astype(np.float32))
    with np.load(tmp_path / "image.npz") as stored:
        assert list(stored["outputs"]) == NAMES and "scores" not in stored.files
        assert_same_maps({name: stored[name] for name in NAMES}, want)
        assert tuple(stored["stride"]) == (2, 2)
        assert str(stored["certificate_output"]) == "prob" and bool(stored["certificate_exact"])
    group = zarr.open_group(str(tmp_path / "image.zarr"), mode="r")
    assert group.attrs["outputs"] == NAMES and sorted(group.array_keys()) == NAMES
    assert_same_maps({name: group[name][:] for name in NAMES}, want)
    with open(tmp_path / "image.csv") as table:
        classes = {line.split(",")[6] for line in list(table)[1:]}
    assert classes <= {"0", "1"}  # from prob, the default
    summary = kfs.predict_images(
        folder / "classifier.keras", [folder / "image.png"], tmp_path, formats="csv,ome-zarr", output="landmarks",
        overwrite=True,
    )
    assert summary.ok, summary.failed
    with open(tmp_path / "image.csv") as table:
        classes = {int(line.split(",")[6]) for line in list(table)[1:]}
    assert max(classes) <= 5 and classes - {0, 1}  # from the six landmark channels
    level0 = zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="r")["0"][:]
    assert_same_maps({"landmarks": np.moveaxis(level0, 0, -1)}, {"landmarks": want["landmarks"]})
    with pytest.raises(kfs.InputError, match="no output named 'face'"):
        kfs.predict_images(fcn, [folder / "image.png"], tmp_path / "other", formats="csv", output="face")
    argv = ["predict", str(folder / "classifier.keras"), str(folder / "image.png"), "--out", str(tmp_path / "other")]
    assert main([*argv, "--format", "geojson", "--output-name", "face"]) == 2
    assert "its outputs are 'box', 'landmarks', 'prob'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# A SavedModel loaded with TensorFlow alone; every output of serving_default saved under "<input>/<output>".
FRESH_PROCESS_SCRIPT = """
import sys

import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
assert not any(name.split(".")[0] == "keras_fcn_surgery" for name in sys.modules)
inputs = np.load(sys.argv[2])
outputs = {}
for key in inputs.files:
    for name, value in serve(images=tf.constant(inputs[key])).items():
        outputs[key + "/" + name] = value.numpy()
np.savez(sys.argv[3], **outputs)
"""


def test_savedmodel_signature_returns_every_output_by_name(models, tmp_path):
    classifier, fcn = models
    result = kfs.export_savedmodel(classifier, tmp_path / "models", bytes_signature=False)
    assert [check.compared for check in result.checks] == [f"output '{name}'" for name in NAMES] * 2
    image = random_images((1, 37, 33, 3), seed=7)
    np.savez(tmp_path / "in.npz", image=image)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    process = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS_SCRIPT, result.path, "in.npz", "out.npz"],
        cwd=tmp_path,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as served:
        assert sorted(served.files) == [f"image/{name}" for name in NAMES]
        got = {name: served[f"image/{name}"][0] for name in NAMES}
    assert_same_maps(got, crops_of(classifier, image[0]))


@pytest.mark.parametrize("format", ["tflite", "onnx", "openvino"])
def test_file_exports_carry_and_check_every_output(models, format, tmp_path):
    if format == "openvino":
        pytest.importorskip("openvino")
    _, fcn = models
    options = kfs.ExportOptions(input_size=(WINDOW, WINDOW))
    result = kfs.export(fcn, tmp_path / f"fcn.{format}", format=format, options=options)
    assert [check.compared for check in result.checks] == [f"output '{name}'" for name in NAMES] * 2
    assert all(check.passed for check in result.checks)


def test_an_export_of_outputs_that_all_end_in_softmax_checks_each_ones_logits(tmp_path):
    image = keras.Input((WINDOW, WINDOW, 3))
    x = layers.Flatten()(layers.Conv2D(3, 5, strides=2, activation="relu")(image))
    heads = [layers.Dense(3, activation="softmax", name="kind")(x), layers.Softmax(name="age")(layers.Dense(2)(x))]
    result = kfs.export(keras.Model(image, heads), tmp_path / "heads.tflite", format="tflite")
    assert [check.compared for check in result.checks] == ["logits of output 'kind'", "logits of output 'age'"] * 2
    assert [check.compared for check in result.output_checks] == ["output 'kind'", "output 'age'"] * 2
