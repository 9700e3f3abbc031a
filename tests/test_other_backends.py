"""Keras on JAX and on PyTorch: the same conversions, geometry and dense maps as on TensorFlow (issues 26, 40).

Each backend runs in a subprocess (tests/other_backends.py) with TensorFlow made unimportable there: the
surgery and the maps must not need it. What is particular to one backend is in tests/test_backends.py (JAX)
and tests/test_torch.py (PyTorch).
"""

import numpy as np
import pytest
from backend_cases import results, save_models
from other_backends import ENGINES, compare_with_tensorflow, run_under

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference import engines

BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module")
def tensorflow_results(tmp_path_factory):
    """The test models' folder and TensorFlow's ``(arrays, texts)`` on them: made once for both backends."""
    folder = str(tmp_path_factory.mktemp("backend-models"))
    save_models(folder)
    return folder, *results(folder)


# One subprocess per backend in the default suite (the slow start and JAX's compiling of each new operation: over
# a minute on 2 cores); the other one under `-m heavy`. The default suite still maps without TensorFlow under JAX
# (tests/test_backends.py's export) and runs PyTorch's engine (its `auto` choice here), and the heavy run has all four.
@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.heavy)])
def test_the_backend_converts_and_maps_as_tensorflow_does_without_tensorflow(backend, tensorflow_results):
    folder, arrays, texts = tensorflow_results
    compare_with_tensorflow(backend, folder, "small", dict(arrays), dict(texts))  # copies: it pops from them


@pytest.mark.parametrize("backend", ["jax", pytest.param("torch", marks=pytest.mark.heavy)])
def test_the_backends_own_engine_and_blas_run_and_the_others_are_refused(backend):
    done = run_under(backend, "-c", ENGINES)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_tensorflow_the_backends_engine_is_refused(backend):
    from models import small_flatten_cnn

    fcn = kfs.as_fcn(small_flatten_cnn())
    with pytest.raises(kfs.InputError, match=f"engine='{backend}' needs Keras on {backend} .*use 'auto' or 'tf'"):
        kfs.predict_map(fcn, np.zeros((40, 40, 3), "float32"), engine=backend)
    assert engines.native() == "tf" and backend not in engines.candidates(fcn)
