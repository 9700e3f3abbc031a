"""The one execution loop (`runner.run_batches`): every batched pass reads its next batch while the model runs."""

import threading

import numpy as np
import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference import runner


@pytest.fixture(scope="module")
def classifier():
    import keras

    keras.utils.set_random_seed(3)
    return small_flatten_cnn(input_size=(32, 32), classes=3)


def recording(threads: list):
    def preprocess(pixels):
        threads.append(threading.current_thread().name)
        return pixels / 255.0

    return preprocess


def test_run_batches_writes_in_order_and_loads_ahead_on_a_thread():
    loads, written = [], []

    def load(batch):
        loads.append(threading.current_thread().name)
        return np.full((1, 2), batch, dtype=np.float32)

    runner.run_batches(lambda x: x * 2, range(5), load, lambda b, r: written.append((b, float(r[0, 0]))), prefetch=True)
    assert written == [(b, 2.0 * b) for b in range(5)]
    assert set(loads) != {threading.current_thread().name}


def test_predict_maps_prefetches_its_whole_image_batches_and_keeps_the_maps(classifier):
    images = [np.random.default_rng(i).uniform(0, 255, (48, 48, 3)).astype(np.float32) for i in range(3)]
    fcn = kfs.convert(classifier)
    threads: list = []
    fetched = kfs.predict_maps(fcn, images, batch_size=1, preprocess=recording(threads))
    plain = kfs.predict_maps(fcn, images, batch_size=1, preprocess=recording([]), prefetch=False)
    assert any(name.startswith("kfs-prefetch") for name in threads)
    for a, b in zip(fetched, plain):
        np.testing.assert_array_equal(a, b)


def test_the_sliding_window_prefetches(classifier):
    image = np.random.default_rng(0).uniform(0, 255, (40, 40, 3)).astype(np.float32)
    threads: list = []
    scores = kfs.sliding_window_predict(classifier, image, 4, batch_size=2, preprocess=recording(threads))
    assert any(name.startswith("kfs-prefetch") for name in threads)
    assert scores.shape[:2] == (3, 3)
