"""Classifiers as tutorials and model zoos write them (issue 36): maps, certificates, commands and exports.

Each case of `tutorial_classifiers.CASES` gives a map whose certificate is
exact against the classifier's crops (a `same`-padding FCN's says by how much
and why it differs, and its windowed map is exact), or is refused in one line
naming the layer. The first tests pin the issue's bugs one by one.
"""

import inspect
import re

import keras
import numpy as np
import pytest
from PIL import Image
from tutorial_classifiers import (
    CASES,
    adapted_normalization,
    augmented_rescaling_cnn,
    dropout_family,
    images,
    keras_io_vit,
    resizing_first,
    subclassed_underscore,
)

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli, taxonomy
from keras_fcn_surgery.graph import sublayers
from keras_fcn_surgery.names import runtime_name

IMAGE = np.random.default_rng(1).integers(0, 256, (30, 34, 3)).astype("float32")  # as a PNG holds it
BY_NAME = {case.name: case for case in CASES}
SAME_PADDING = {"augmented_preprocess_input", "separable_residual", "same_padding_flatten"}


def _names(model) -> list[str]:
    return [type(layer).__name__ for layer in sublayers(model)]


# The bugs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", taxonomy.RANDOM_AUGMENTATIONS, ids=lambda kind: kind.__name__)
def test_every_random_augmentation_returns_its_input_at_inference(kind):
    parameters = inspect.signature(kind.__init__).parameters
    factor = 4 if kind.__name__ == "RandomPosterization" else 0.3  # its factor is a number of bits
    required = {"factor": factor, "height_factor": 0.2, "width_factor": 0.2}
    arguments = {
        name: value
        for name, value in required.items()
        if name in parameters and parameters[name].default is inspect.Parameter.empty
    }
    layer = kind(**arguments)
    for seed, shape in ((0, (2, 20, 20, 3)), (1, (1, 9, 13, 3))):
        x = np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")
        np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_a_converted_model_holds_no_layer_that_is_the_identity_at_inference():
    for build in (augmented_rescaling_cnn, dropout_family):
        source = build()
        assert any(isinstance(layer, taxonomy.INFERENCE_IDENTITY) for layer in sublayers(source))
        fcn = kfs.convert(source)
        assert not any(isinstance(layer, taxonomy.INFERENCE_IDENTITY) for layer in sublayers(fcn)), _names(fcn)


def test_augmentation_inside_a_nested_sequential_is_transparent_to_maps_and_certificates():
    model = augmented_rescaling_cnn()
    for method in ("auto", "windowed"):  # the windowed replay runs the augmentation in inference mode
        result = kfs.predict_map(model, IMAGE, method=method, stride=4, certify=6)
        assert result.certificate.exact and result.certificate.informative, (method, str(result.certificate))


def test_an_adapted_normalization_carries_its_mean_and_variance_through_conversion():
    source = adapted_normalization()
    fcn = kfs.convert(source, verify_inputs=images(seed=1))  # verified: refused before (max rel diff 0.68)
    before, after = source.layers[1], fcn.get_layer(source.layers[1].name)
    np.testing.assert_array_equal(np.asarray(after.mean), np.asarray(before.mean))
    np.testing.assert_array_equal(np.asarray(after.variance), np.asarray(before.variance))
    assert float(np.max(np.abs(np.asarray(before.mean)))) > 1.0  # adapted to 0..255 pixels, not the defaults
    result = kfs.predict_map(source, IMAGE, method="windowed", stride=2, certify=6)
    assert result.certificate.exact


def test_a_subclassed_model_named_with_an_underscore_maps_a_larger_image():
    model = subclassed_underscore()
    assert model.name.startswith("_")
    fcn = kfs.convert(model)
    assert fcn.name == "net_fcn"
    result = kfs.predict_map(model, IMAGE, certify=6)  # a raw '__net_fcn' is not a valid root scope name before
    assert result.certificate.exact


def test_names_are_made_valid_for_every_runtime_in_one_place():
    assert runtime_name("__net", "fcn") == "net_fcn"
    assert runtime_name("my model/v2", "to", "conv:0") == "my_model_v2_to_conv_0"
    assert runtime_name("_", "") == "model"
    pattern = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")  # TensorFlow's root scope names
    assert all(pattern.match(runtime_name(name)) for name in ("__net", "-x", ".y", "ok", "é"))


def test_a_classifier_that_shares_nothing_says_its_map_costs_the_sliding_window():
    model = resizing_first()
    with pytest.raises(kfs.InputError, match="nothing is shared between its windows.*sliding window"):
        kfs.predict_map(model, IMAGE)
    plan = kfs.plan_prediction(model, IMAGE.shape[:2], stride=4)
    assert plan.method == "windowed" and plan.split == "input" and plan.saved == 0.0
    assert "nothing is shared: this is the sliding window's cost" in str(plan)


def test_a_layer_that_is_not_the_identity_at_inference_is_refused_by_name():
    case = BY_NAME["random_crop_inside"]
    model = case.build()
    with pytest.raises(kfs.ConversionError, match="'random_crop' \\(RandomCrop\\)"):
        kfs.convert(model)
    with pytest.raises(kfs.ConversionError, match="'random_crop' \\(RandomCrop\\) is not the identity at inference"):
        kfs.predict_map(model, IMAGE, stride=2)


# The matrix ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_predict_map_chooses_a_method_and_certifies_it_or_refuses_in_one_line(case):
    model = case.build()
    if case.method is None:
        with pytest.raises(kfs.ConversionError, match=case.refusal) as refused:
            kfs.predict_map(model, IMAGE, stride=case.stride, certify=4)
        assert "\n" not in str(refused.value)
        return
    plan = kfs.plan_prediction(model, IMAGE.shape[:2], stride=case.stride)
    assert plan.method == case.method
    certificate = kfs.predict_map(model, IMAGE, stride=case.stride, certify=6).certificate
    assert certificate.informative, str(certificate)
    if case.name in SAME_PADDING:
        assert not certificate.exact and "`same`-padding" in certificate.reason  # says by how much and why
        stride = case.stride or tuple(kfs.geometry(kfs.as_fcn(model)).stride)
        certificate = kfs.predict_map(model, IMAGE, method="windowed", stride=stride, certify=6).certificate
    assert certificate.exact, str(certificate)


def _image_file(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(IMAGE.astype(np.uint8)).save(path)
    return str(path)


def _commands(case, tmp_path, capsys):
    """Exit codes of ``heatmap`` and ``predict`` on the case's saved classifier, and what they printed."""
    model = case.build()
    path = str(tmp_path / f"{case.name}.keras")
    model.save(path)
    image = _image_file(tmp_path)
    stride = ["--stride", str(case.stride)] if case.stride else []
    heatmap = cli.main(["heatmap", path, image, "--class", "0", "-o", str(tmp_path / "heat.png"), *stride])
    predict = cli.main(["predict", path, image, "-o", str(tmp_path / "maps"), "--certify", "4", *stride])
    return heatmap, predict, capsys.readouterr()


def _assert_commands(case, tmp_path, capsys):
    heatmap, predict, printed = _commands(case, tmp_path, capsys)
    if case.method is None:
        assert heatmap == 2 or heatmap == 1, printed
        errors = [line for line in printed.err.splitlines() if line.lower().startswith("error")]
        assert errors and re.search(case.refusal, errors[0]), printed.err
        assert "Traceback" not in printed.err
        return
    assert (heatmap, predict) == (0, 0), printed
    scores = np.load(tmp_path / "maps" / "scene.npz")["scores"]
    want = kfs.predict_map(keras.models.load_model(str(tmp_path / f"{case.name}.keras")), IMAGE, stride=case.stride)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    "name", ["augmented_rescaling_cnn", "keras_io_vit", "subclassed_underscore", "image_and_metadata"]
)
def test_the_commands_map_or_refuse_in_one_line(name, tmp_path, capsys):
    _assert_commands(BY_NAME[name], tmp_path, capsys)


@pytest.mark.heavy
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_commands_map_or_refuse_every_case(case, tmp_path, capsys):
    _assert_commands(case, tmp_path, capsys)


def _assert_export(case, tmp_path):
    model = case.build()
    if not case.exportable:
        with pytest.raises(kfs.ConversionError) as refused:
            kfs.export(model, tmp_path / "model.onnx", format="onnx")
        assert "\n" not in str(refused.value).strip()
        assert not (tmp_path / "model.onnx").exists()
        return
    result = kfs.export(model, tmp_path / "model.onnx", format="onnx")
    assert all(check.passed for check in result.checks)
    import onnx

    operators = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert not {op for op in operators if "Random" in op or op == "Dropout"}, operators


def test_an_adapted_normalization_exports_to_onnx_with_its_mean_and_variance_as_constants(tmp_path):
    _assert_export(BY_NAME["adapted_normalization"], tmp_path)  # its captured mean was a second "image input"


@pytest.mark.heavy
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_case_exports_or_is_refused_in_one_line(case, tmp_path):
    _assert_export(case, tmp_path)


def test_the_vit_custom_layers_reload_from_their_config(tmp_path):
    model = keras_io_vit()
    path = tmp_path / "vit.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = IMAGE[None, :16, :16]
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)), atol=1e-5)


def _cli(*args):
    """The command line in a fresh interpreter, where the test's registered custom layers are unknown."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": repo}
    script = "import sys; from keras_fcn_surgery.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.heavy
def test_the_commands_load_custom_layers_with_custom_objects(tmp_path):
    import tutorial_classifiers

    model = keras_io_vit()
    path = str(tmp_path / "vit.keras")
    model.save(path)
    layers_file = tmp_path / "vit_layers.py"
    source = "\n\n".join(
        inspect.getsource(c) for c in (tutorial_classifiers.Patches, tutorial_classifiers.PatchEncoder)
    )
    layers_file.write_text("import keras\nfrom keras import layers, ops\n\n\n" + source, encoding="utf-8")
    image = _image_file(tmp_path)
    heatmap = ["heatmap", path, image, "--class", "0", "-o", str(tmp_path / "heat.png"), "--stride", "4"]
    refused = _cli(*heatmap)
    assert refused.returncode == 2 and "--custom-objects" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    done = _cli(*heatmap, "--custom-objects", str(layers_file))
    assert done.returncode == 0 and "exact" in done.stdout, done.stderr
    predict = ["predict", path, image, "-o", str(tmp_path / "maps"), "--stride", "4"]
    assert _cli(*predict, "--custom-objects", str(layers_file)).returncode == 0
    scores = np.load(tmp_path / "maps" / "scene.npz")["scores"]
    want = kfs.predict_map(model, IMAGE, stride=4)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_a_center_crop_of_the_input_converts_to_the_cropping_it_is():
    model = BY_NAME["center_crop_first"].build()
    fcn = kfs.convert(model)  # refused before: "gives a 15x16 map whatever the size of its input"
    crop = fcn.get_layer("center_crop")
    assert isinstance(crop, keras.layers.Cropping2D) and tuple(map(tuple, crop.cropping)) == ((2, 3), (2, 2))
    assert kfs.predict_map(model, IMAGE, certify=8).certificate.exact
