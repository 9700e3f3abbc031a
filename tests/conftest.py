"""Shared fixtures and small model factories for the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns oneDNN on by default only on some x86 CPUs (AVX-512 ones); without it, its CPU
# Conv2D refuses channels-first (NCHW) tensors. Tests run with it on, everywhere, so that results and
# the oneDNN bug pinned in test_upstream_bugs.py do not depend on the processor CI happens to get.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

# In CI (.ci/run sets KFS_FORBID_IMPORT_SKIPS=1) a skip for a package that cannot be imported fails the run.
pytest_plugins = ["skip_guard"]


@pytest.fixture(autouse=True, scope="session")
def _engine_cache_in_tmp(tmp_path_factory):
    """The measured-engine cache (`inference.engines`) goes to a temporary folder, never to the home folder."""
    before = os.environ.get("KFS_ENGINE_CACHE")
    os.environ["KFS_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("engine-cache") / "engines.json")
    yield
    if before is None:
        os.environ.pop("KFS_ENGINE_CACHE", None)
    else:
        os.environ["KFS_ENGINE_CACHE"] = before


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def random_images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def run_tool(name, *args, timeout=300):
    """Run ``tools/<name>`` in a fresh interpreter; returns the CompletedProcess."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    tool = os.path.join(repo, "tools", name)
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, env=env, timeout=timeout)


# --- small FCNs for the tiling and staging tests (test_prediction.py, test_staging.py) -------------------

# Body strides (one 3x3 convolution each) by the network's total stride.
STRIDES = {1: [1, 1], 2: [2, 1], 4: [2, 2], 8: [2, 2, 2], 16: [2, 2, 2, 2], 32: [2, 2, 2, 2, 2]}


def strided_fcn(padding, strides, channels=2, data_format="channels_last", head=1):
    """3x3 tanh convolutions with these strides (a 3x3/1 max pooling after the second), then a head of 3 classes.

    ``head`` is the head convolution's kernel side (same ``padding`` as the body): 1 for a 1x1 head
    (test_prediction), 3 for a head that also looks at neighbouring cells (test_staging).
    """
    shape = (None, None, channels) if data_format == "channels_last" else (channels, None, None)
    inputs = keras.Input(shape)
    x = inputs
    for index, stride in enumerate(strides):
        x = layers.Conv2D(4, 3, strides=stride, padding=padding, activation="tanh", data_format=data_format)(x)
        if index == 1:
            x = layers.MaxPooling2D(3, strides=1, padding=padding, data_format=data_format)(x)
    return keras.Model(inputs, layers.Conv2D(3, head, padding=padding, data_format=data_format)(x))


def whole_map(model, image):
    """The model's map of one image, in one call on the whole image."""
    return np.asarray(model(image[None], training=False))[0]
