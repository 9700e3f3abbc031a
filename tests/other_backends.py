"""Running this checkout under another Keras backend (JAX, PyTorch), for tests/test_backends.py and test_torch.py.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so each other backend runs in a subprocess, on the
CPU, with TensorFlow made unimportable there where a test says so (`CLI_WITHOUT_TENSORFLOW`,
tests/backend_cases.py): the surgery and the maps must not need it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_under(backend, *args, environment=None, timeout=600, cwd=HERE):
    """``python *args`` under ``KERAS_BACKEND=backend`` on the CPU, this checkout first on the import path."""
    pytest.importorskip(backend)  # the `jax` and `torch` extras (in the test extra: CI has both)
    environment = {
        **os.environ,
        **(environment or {}),
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], env=environment, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def compare_with_tensorflow(backend, folder, cases, tf_arrays, tf_texts) -> None:
    """Run tests/backend_cases.py on ``folder`` under ``backend`` and check it against TensorFlow's results."""
    out = os.path.join(folder, f"{backend}.npz")
    done = run_under(backend, os.path.join(HERE, "backend_cases.py"), folder, out, cases)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out + ".json") as handle:
        texts = json.load(handle)
    arrays = dict(np.load(out))
    assert texts.pop("backend") == backend
    assert texts.pop("tensorflow_imported") is False
    assert tf_texts.pop("backend") == "tensorflow"
    for key, text in tf_texts.items():
        if key.endswith("-engine"):  # below the measuring threshold: each backend's own execution
            assert (text, texts[key]) == ("tf", backend), key
        else:
            assert texts[key] == text, key
    assert sorted(arrays) == sorted(tf_arrays)
    for key, expected in tf_arrays.items():
        assert arrays[key].shape == expected.shape, key
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(arrays[key], expected, rtol=0, atol=1e-5 * scale, err_msg=key)


# Run with ``run_under(backend, "-c", ENGINES)``: prints "ok" when the backend's own engine and the BLAS one run
# and agree, and every engine of another backend is refused by name.
ENGINES = """
import keras, numpy as np, keras_fcn_surgery as kfs
from keras import layers
from keras_fcn_surgery.inference import engines

native = keras.backend.backend()
head = [layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(64, activation="relu"), layers.Dense(5)]
classifier = keras.Sequential([keras.Input((14, 14, 3)), layers.Conv2D(8, 3, strides=2, activation="relu"), *head])
fcn = kfs.as_fcn(classifier)  # its head: a 6 x 6 convolution of 512 filters, which the BLAS engine runs
image = np.random.default_rng(0).uniform(0, 1, (150, 140, 3)).astype("float32")
reference = kfs.predict_map(fcn, image, engine=native)
assert isinstance(reference, np.ndarray) and reference.dtype == np.float32, type(reference)
np.testing.assert_allclose(kfs.predict_map(fcn, image, engine="blas"), reference, atol=1e-5 * abs(reference).max())
assert engines.native() == native and engines.candidates(fcn) == (native, "blas"), engines.candidates(fcn)
choice = engines.choose_engine(fcn, (1, 150, 140, 3))
assert choice.engine == native, choice
timings = engines.time_engines(fcn, (native, "blas"), (1, 150, 140, 3), rounds=1)
assert set(timings) == {native, "blas"} and all(np.isfinite(list(timings.values()))), timings
for engine in sorted({"tf", "xla", "jax", "torch"} - {native}):
    try:
        kfs.predict_map(fcn, image, engine=engine)
    except kfs.InputError as error:
        assert "needs Keras on" in str(error) and "KERAS_BACKEND" in str(error), error
    else:
        raise AssertionError(engine + " ran under " + native)
print("ok")
"""

# ``run_under(backend, "-c", CLI_WITHOUT_TENSORFLOW, *arguments)``: the command line, TensorFlow unimportable.
CLI_WITHOUT_TENSORFLOW = """
import sys
from backend_cases import hide_tensorflow
hide_tensorflow()
from keras_fcn_surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""
