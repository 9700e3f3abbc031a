"""Shared fixtures and small model factories for the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
