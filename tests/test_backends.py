"""Keras's JAX backend: the same conversions, geometry and dense maps as TensorFlow's (issue 26).

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so the JAX side runs in a subprocess
(tests/backend_cases.py), with TensorFlow made unimportable there: the surgery and the maps must not need it.
"""

import os
import re

import numpy as np
import pytest
from other_backends import CLI_WITHOUT_TENSORFLOW, run_under

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.heavy  # about 2-4 min on 2 cores: JAX compiles each eager operation of each new model once
def test_the_fuzz_campaign_under_jax():
    """Random classifiers converted and mapped under JAX: each exact against its source there, or refused by name."""
    environment = {"KFS_FUZZ_EXAMPLES": os.environ.get("KFS_JAX_FUZZ_EXAMPLES", "30")}
    done = run_under(
        "jax",
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
        os.path.join(HERE, "test_fuzz.py"),
        environment=environment,
        timeout=850,  # under the per-test limit (setup.cfg), so that a hang fails here with its output
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.heavy  # about a minute on 2 cores: three command-line runs, each starting JAX
def test_the_command_line_converts_and_maps_under_jax_without_tensorflow(tmp_path, monkeypatch, capsys):
    from models import small_flatten_cnn
    from PIL import Image

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")  # as a user's shell has it: the CLI's quiet TensorFlow import runs
    small_flatten_cnn().save(tmp_path / "classifier.keras")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    convert = run_under("jax", "-c", CLI_WITHOUT_TENSORFLOW, "convert", "classifier.keras", "fcn.keras", cwd=tmp_path)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert "verified" in convert.stdout, convert.stdout
    heatmap = run_under(
        "jax", "-c", CLI_WITHOUT_TENSORFLOW, "heatmap", "fcn.keras", "a.png", "--class", "1", "-o", "map.png",
        "--execution", "jax", "--preprocess", "unit", cwd=tmp_path,
    )  # fmt: skip
    assert heatmap.returncode == 0, heatmap.stderr[-3000:]
    # The same command under TensorFlow (this process): the same picture, pixel for pixel to a level of
    # rounding, and the same heat scale, whose range is not empty (the map shows something).
    from keras_fcn_surgery.cli import main
    from keras_fcn_surgery.inference.heatmap import LEGEND_WIDTH

    # (pixels in [0, 1]: on raw pixels the random classifier's softmax saturates and the map is one colour)
    tf_args = ["heatmap", str(tmp_path / "fcn.keras"), str(tmp_path / "a.png"), "--class", "1", "--preprocess", "unit"]
    assert main([*tf_args, "-o", str(tmp_path / "tf.png"), "--execution", "tf"]) == 0
    with Image.open(tmp_path / "map.png") as jax_png, Image.open(tmp_path / "tf.png") as tf_png:
        got, want = (np.asarray(p.convert("RGB"), dtype=np.int16) for p in (jax_png, tf_png))
    assert got.shape == want.shape and want.shape[1] == 2 * 60 + LEGEND_WIDTH
    assert int(np.abs(got - want).max()) <= 2 and float(np.mean(got != want)) < 0.01
    scale = re.compile(r"heat scale: black = p ([0-9.e-]+), white = p ([0-9.e-]+)")
    (jax_scale,), tf_printed = scale.findall(heatmap.stdout), capsys.readouterr().out
    (tf_scale,) = scale.findall(tf_printed)
    np.testing.assert_allclose(np.float64(jax_scale), np.float64(tf_scale), rtol=2e-3)
    assert float(tf_scale[1]) - float(tf_scale[0]) > 1e-2  # the class's probability varies over the map: heat shows
    refused = run_under(
        "jax", "-c", CLI_WITHOUT_TENSORFLOW, "heatmap", "fcn.keras", "a.png", "--class", "1", "-o", "xla.png",
        "--execution", "xla", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "needs Keras on tensorflow" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


JAX_EXPORT = """
import os, sys
from backend_cases import hide_tensorflow
hide_tensorflow()
import keras, numpy as np, keras_fcn_surgery as kfs
from models import small_flatten_cnn

classifier = small_flatten_cnn()
result = kfs.export(classifier, os.path.join(sys.argv[1], "fcn_ov"), format="openvino")
assert [check.input_shape for check in result.checks] == [(2, 32, 32, 3), (2, 60, 60, 3)], result
assert all(check.passed for check in (*result.checks, *result.output_checks)), result
print(result)


class Doubling(keras.layers.Layer):  # not registered: a TensorFlow process cannot rebuild it
    def call(self, x):
        return x * 2.0


inputs = keras.Input((None, None, 3))
x = Doubling()(keras.layers.Conv2D(4, 3)(inputs))
custom = keras.Model(inputs, keras.layers.Conv2D(2, 1)(x), name="custom")
try:
    options = kfs.ExportOptions(convert=False, input_size=(16, 16))
    kfs.export(custom, os.path.join(sys.argv[1], "custom_ov"), format="openvino", options=options)
except kfs.ExportError as error:
    print("refused:", error)
else:
    raise AssertionError("a layer TensorFlow cannot rebuild was exported")
assert sorted(os.listdir(sys.argv[1])) == ["fcn_ov"], os.listdir(sys.argv[1])
"""


def test_under_jax_an_export_is_written_on_tensorflow_and_checked_against_jax(tmp_path):
    """Every writer traces a tf.function: under JAX the model goes to a TensorFlow process as a .keras file; the
    written file is checked against the model under JAX (this process needs no TensorFlow)."""
    pytest.importorskip("openvino")
    done = run_under("jax", "-c", JAX_EXPORT, str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "verified logits of 'fc2' on (2, 60, 60, 3)" in done.stdout, done.stdout
    refusal = done.stdout.split("refused: ")[1]
    assert "Layer 'doubling' (class Doubling, defined in __main__) cannot be rebuilt" in refusal, refusal
    assert "run the export under KERAS_BACKEND=tensorflow" in refusal and "Traceback" not in refusal, refusal
    assert sorted(os.listdir(tmp_path / "fcn_ov")) == ["model.bin", "model.xml"]
