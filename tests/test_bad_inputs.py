"""Bad input gets a clear message naming the file or layer and the way out, and nothing is written.

Each file case is checked in the library (the message) and through the CLI
(exit code 2 or 1, the message on stderr, no output file).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from models import small_flatten_cnn, valid_gap_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.saving.loading import custom_objects_from_file
from keras_fcn_surgery.surgery.verify import RELATIVE_TOLERANCE, tolerance_for


@pytest.fixture
def out_dir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _cli_refuses(model_path, out_dir, capsys, *fragments, code=2, extra=()):
    """Run ``convert MODEL OUT``: check the exit code, the message, and that ``out_dir`` stays empty."""
    output = out_dir / "fcn.keras"
    assert main(["convert", str(model_path), str(output), *extra]) == code
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, error
    assert os.listdir(out_dir) == []
    return error


def _library_refuses(path, *fragments, **kwargs):
    with pytest.raises(kfs.ModelFileError) as info:
        kfs.convert(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# Files ---------------------------------------------------------------------------


def test_missing_path(tmp_path, out_dir, capsys):
    missing = tmp_path / "nowhere" / "model.keras"
    _library_refuses(missing, f"'{missing}'", "does not exist", "Check the path")
    _cli_refuses(missing, out_dir, capsys, str(missing), "does not exist")


def test_text_file_named_keras(tmp_path, out_dir, capsys):
    path = tmp_path / "notes.keras"
    path.write_text("these are not weights\n")
    _library_refuses(path, f"'{path}'", "not a valid `.keras` archive", "Save the model again")
    _cli_refuses(path, out_dir, capsys, str(path), "not a valid `.keras` archive")


@pytest.mark.parametrize("suffix", [".png", ".h5"])
def test_png_image(tmp_path, out_dir, capsys, suffix):
    path = tmp_path / f"cat{suffix}"
    Image.new("RGB", (4, 4), "white").save(path, format="PNG")
    expected = "not a Keras model file" if suffix == ".png" else "not a readable HDF5 file"
    _library_refuses(path, f"'{path}'", expected)
    _cli_refuses(path, out_dir, capsys, str(path), expected)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_truncated_model_file(tmp_path, out_dir, capsys, suffix):
    path = tmp_path / f"model{suffix}"
    small_flatten_cnn().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _library_refuses(path, f"'{path}'", "truncated", "Save the model again")
    _cli_refuses(path, out_dir, capsys, str(path), "truncated")


# Custom objects --------------------------------------------------------------------

_CUSTOM_LAYER_SOURCE = '''
import keras


class Scale(keras.layers.Layer):
    """Multiplies by a constant."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
'''


@pytest.fixture
def custom_model_file(tmp_path):
    """A .keras model using a layer class from a module that is gone when it is loaded."""
    module_path = tmp_path / "kfs_custom_layers.py"
    module_path.write_text(_CUSTOM_LAYER_SOURCE)
    objects = custom_objects_from_file(module_path)
    assert set(objects) == {"Scale"}
    inputs = keras.Input((12, 12, 3))
    x = objects["Scale"](name="scale")(layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="fc")(layers.Flatten()(x)))
    path = tmp_path / "custom.keras"
    model.save(path)
    import sys

    del sys.modules["kfs_custom_layers"]
    yield path, module_path, objects
    sys.modules.pop("kfs_custom_layers", None)


def test_model_that_needs_custom_objects(custom_model_file, out_dir, capsys):
    path, module_path, objects = custom_model_file
    _library_refuses(path, f"'{path}'", "'Scale'", "custom_objects={'Scale': Scale}", "--custom-objects")
    _cli_refuses(path, out_dir, capsys, "'Scale'", "--custom-objects")
    fcn = kfs.convert(path, custom_objects=objects)
    assert isinstance(fcn.get_layer("scale"), objects["Scale"])


def test_cli_custom_objects_option(custom_model_file, out_dir, capsys):
    path, module_path, _ = custom_model_file
    output = out_dir / "fcn.keras"
    assert main(["convert", str(path), str(output), "--custom-objects", str(module_path)]) == 0
    assert output.exists()
    assert "wrote" in capsys.readouterr().out


def test_custom_objects_dict_and_bad_files(tmp_path, custom_model_file, out_dir, capsys):
    path, module_path, objects = custom_model_file
    declared = tmp_path / "declared.py"
    declared.write_text(f"{_CUSTOM_LAYER_SOURCE}\nCUSTOM_OBJECTS = {{'Scale': Scale}}\n")
    assert set(custom_objects_from_file(declared)) == {"Scale"}
    _cli_refuses(path, out_dir, capsys, "'nope.py'", "does not exist", extra=("--custom-objects", "nope.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    _cli_refuses(path, out_dir, capsys, str(broken), "failed to import", extra=("--custom-objects", str(broken)))


# Sizes and channels -----------------------------------------------------------------


def test_input_smaller_than_the_receptive_field():
    fcn = kfs.convert(small_flatten_cnn(), verify=False)
    grid = kfs.geometry(fcn)
    assert grid.min_input_size == (32, 32)
    with pytest.raises(kfs.ConversionError, match="height of 20 is smaller than the network's minimum of 32"):
        grid.output_size((20, 40))
    with pytest.raises(kfs.ConversionError, match="20x40 pixels is smaller than the network's minimum input of 32x32"):
        kfs.predict_map(fcn, random_images((20, 40, 3)))


def test_wrong_number_of_channels():
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    with pytest.raises(kfs.ConversionError, match="takes 3 channels.*has 4"):
        kfs.predict_map(fcn, random_images((40, 40, 4)))
    gray = kfs.convert(small_flatten_cnn(channels=1), verify=False)
    with pytest.raises(kfs.ConversionError, match=f"'{gray.name}' takes 1 channels but its source .* takes 3"):
        kfs.verify(source, gray)
    with pytest.raises(kfs.ConversionError, match=r"\(height, width\).*channels comes from the model"):
        kfs.verify(source, fcn, input_size=(32, 32, 3))


# Non-finite weights ------------------------------------------------------------------


def _with_value(layer, weight_name, index, value):
    variable = next(w for w in layer.weights if w.name == weight_name)
    array = np.asarray(variable.value).copy()
    array[index] = value
    variable.assign(array)


def test_nan_weights_warn_and_verify_nan_for_nan():
    # Linear logits: a softmax over a NaN logit is NaN everywhere in exact arithmetic, and whether TF's
    # CPU kernel agrees depends on the processor, so a softmax head cannot keep finite classes to compare.
    source = small_flatten_cnn(softmax=False)
    _with_value(source.get_layer("fc2"), "bias", 1, np.nan)
    with pytest.warns(kfs.NonFiniteWeightsWarning, match="'fc2' \\(Dense\\): bias"):
        fcn = kfs.convert(source)  # class 1 is NaN in both models: equal, the rest compared
    result = kfs.verify(source, fcn)
    assert result.passed and result.nonfinite_matched > 0 and result.finite_compared > 0
    assert "NaN/Inf outputs in both" in str(result)


def test_weights_that_make_every_output_nan(out_dir, tmp_path, capsys):
    source = small_flatten_cnn()
    _with_value(source.get_layer("conv1"), "kernel", (0, 0, 0, 0), np.inf)
    unverifiable = "NaN or Inf, so the conversion cannot be verified.*--no-verify"
    with pytest.warns(kfs.NonFiniteWeightsWarning, match="'conv1' \\(Conv2D\\): kernel"):
        with pytest.raises(kfs.VerificationError, match=unverifiable):
            kfs.convert(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfs.NonFiniteWeightsWarning)
        assert not kfs.verify(source, kfs.convert(source, verify=False)).passed
    path = tmp_path / "diverged.keras"
    source.save(path)
    _cli_refuses(path, out_dir, capsys, "warning:", "'conv1' (Conv2D)", "cannot be verified", code=1)


# Mixed precision ----------------------------------------------------------------------


def _global_poolings(model):
    return [layer for layer in model.layers if isinstance(layer, layers.GlobalAveragePooling2D)]


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
@pytest.mark.parametrize("factory", [small_flatten_cnn, valid_gap_cnn], ids=["flatten", "gap"])
def test_mixed_precision_converts_and_verifies(policy, compute, factory):
    keras.config.set_dtype_policy(policy)  # conftest puts float32 back
    source = factory()
    keras.config.set_dtype_policy("float32")
    assert tolerance_for(source) == RELATIVE_TOLERANCE[compute]
    fcn = kfs.convert(source)
    result = kfs.verify(source, fcn)
    assert result.passed and result.tolerance == RELATIVE_TOLERANCE[compute]
    rewritten = [layer for layer in fcn.layers if isinstance(layer, (layers.Conv2D, layers.AveragePooling2D))]
    # Every layer keeps the policy, except the window pooling that replaces a global pooling: it sums a
    # map-sized window, which half precision cannot do within its own tolerance, so it computes in float32.
    window_poolings = [layer for layer in rewritten if layer.name in [s.name for s in _global_poolings(source)]]
    kept = [layer for layer in rewritten if layer not in window_poolings]
    assert kept and all(layer.dtype_policy.name == policy for layer in kept)
    assert all(layer.compute_dtype == "float32" for layer in window_poolings)
    assert len(window_poolings) == len(_global_poolings(source))
    larger = np.asarray(fcn(random_images((1, 40, 44, 3))))
    assert larger.shape[1:3] == kfs.geometry(fcn).output_size((40, 44))
    assert np.all(np.isfinite(larger))


def test_per_layer_policy_in_a_nested_model_sets_the_tolerance():
    inputs = keras.Input((12, 12, 3))
    body = keras.Model(inputs, layers.Conv2D(4, 3, dtype="mixed_bfloat16", name="conv")(inputs), name="body")
    source = keras.Sequential([keras.Input((12, 12, 3)), body, layers.Flatten(), layers.Dense(3, name="fc")])
    assert tolerance_for(source) == RELATIVE_TOLERANCE["bfloat16"]
    assert kfs.convert(source).get_layer("body").get_layer("conv").dtype_policy.name == "mixed_bfloat16"


def test_channels_first_float16_head_without_a_cpu_kernel():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU has the kernel")
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((3, 12, 12))
    x = layers.DepthwiseConv2D(3, data_format="channels_first", name="dw")(inputs)
    x = layers.GlobalAveragePooling2D(data_format="channels_first", name="gap")(x)
    source = keras.Model(inputs, layers.Dense(4, name="fc")(x), name="cf16")
    keras.config.set_dtype_policy("float32")
    source(np.zeros((1, 3, 12, 12), "float32"))  # the source runs on CPU
    if _cpu_runs_channels_first_float16_conv():
        # oneDNN on CPUs with AVX-512 FP16 (seen on an Intel Xeon) has the kernel: the FCN then runs and verifies.
        assert kfs.convert(source).get_layer("fc").dtype_policy.name == "mixed_float16"
        return
    with pytest.raises(kfs.VerificationError, match="'cf16_fcn' fails.*no float16 channels-first.*verify=False"):
        kfs.convert(source)
    assert kfs.convert(source, verify=False).get_layer("fc").dtype_policy.name == "mixed_float16"


def _cpu_runs_channels_first_float16_conv() -> bool:
    """Whether this CPU's TensorFlow has a float16 channels-first convolution (the FCN's 1x1 head)."""
    probe = layers.Conv2D(2, 1, data_format="channels_first", dtype="mixed_float16")
    try:
        probe(np.zeros((1, 3, 2, 2), "float32"))
    except Exception:  # TensorFlow's "no registered kernel" error, whatever its class
        return False
    return True
