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
