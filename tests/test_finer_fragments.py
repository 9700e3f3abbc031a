"""Multi-pooling fragments (`inference.fragments`): the à trous map by space-to-batch, as the execution "fragments".

At each removed stride the map is split into its fragments, stacked in the batch; later windows run undilated on
them; the outputs are interleaved back. The map must be the à trous map cell for cell (valid and `same` networks,
sides that are not multiples of the removed strides, channels last and first, max and average pooling, strided
convolutions, nested models); `engine="fragments"` forces it (tiles included), `engine="auto"` times it against the
other ways, and the plan prints its multiply-accumulates beside theirs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers
from test_finer_strides import (
    WINDOW,
    _crops_reference,
    _map_hwc,
    _relative,
    _runs_channels_first_conv,
    _same_fcn,
    _valid_classifier,
)

import keras_fcn_surgery as kfs
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.inference.fragments import fragments_cost, fragments_map, fragments_plan, fragments_refusal
from keras_fcn_surgery.surgery.atrous import at_stride, rarefy


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("stride", [4, 2, 1, (2, 4), 3])
def test_fragments_give_the_a_trous_map_of_a_valid_network(stride, nested):
    classifier = _valid_classifier(nested=nested)
    fcn = kfs.convert(classifier)
    image = np.random.default_rng(40).random((WINDOW + 23, WINDOW + 18, 3), dtype=np.float32)  # not multiples of 8
    scores = fragments_map(fcn, image, stride)
    atrous = _map_hwc(at_stride(fcn, stride), image)
    assert scores.shape == atrous.shape
    assert _relative(scores, atrous) < 1e-5
    pair = (stride, stride) if isinstance(stride, int) else stride
    assert _relative(scores, _crops_reference(classifier, image, pair, scores.shape[:2])) < 1e-5
    plan = fragments_plan(fcn, stride)
    assert fragments_cost(fcn, stride, image.shape[:2]) >= kfs.plan_prediction(fcn, image.shape[:2]).macs
    assert plan.model(image.shape[:2])[0] is plan.model(image.shape[:2])[0]  # built once per input size


@pytest.mark.parametrize("size", [(48, 44), (47, 45), (45, 42)])
@pytest.mark.parametrize("stride", [2, 1])
def test_fragments_give_the_a_trous_map_of_a_same_network(stride, size):
    """Short fragments' extra cells are zeroed before each `same` window, as the à trous map's padding is."""
    fcn = _same_fcn()
    image = np.random.default_rng(41).random((*size, 3), dtype=np.float32)
    atrous = _map_hwc(rarefy(fcn, stride), image)
    scores = fragments_map(fcn, image, stride)
    assert scores.shape == atrous.shape
    assert _relative(scores, atrous) < 1e-5


def _strided_conv_fcn():
    """Stride 4: a strided `valid` convolution, then a padding and a `same` convolution reading cells that a
    pointwise convolution (a bias: non-zero on zeros) computed from the fragments' padding, a max pooling."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = layers.Conv2D(4, 1, bias_initializer="random_normal")(x)
    x = layers.ZeroPadding2D(((1, 2), (2, 1)))(x)
    x = layers.Conv2D(5, 3, padding="same", activation="relu", bias_initializer="random_normal")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(3, 2)(x)
    return keras.Model(inputs, x, name="strided_conv_net")


@pytest.mark.parametrize("stride", [2, 1])
def test_fragments_after_a_strided_convolution_and_a_padding(stride):
    fcn = _strided_conv_fcn()
    assert kfs.geometry(fcn).stride == (4, 4)
    image = np.random.default_rng(42).random((37, 42, 3), dtype=np.float32)
    atrous = _map_hwc(rarefy(fcn, stride), image)
    scores = fragments_map(fcn, image, stride)
    assert scores.shape == atrous.shape
    assert _relative(scores, atrous) < 1e-5


@pytest.mark.skipif(not _runs_channels_first_conv(), reason="this CPU's TensorFlow runs no channels-first conv")
@pytest.mark.parametrize("stride", [4, 1])
def test_fragments_of_a_channels_first_network(stride):
    fcn = kfs.convert(_valid_classifier("channels_first"))
    image = np.random.default_rng(43).random((3, WINDOW + 9, WINDOW + 6), dtype=np.float32)
    scores = fragments_map(fcn, image, stride)
    atrous = rarefy(fcn, stride).predict(image[None], verbose=0)[0]
    assert scores.shape == atrous.shape
    assert _relative(scores, atrous) < 1e-5


def test_forcing_fragments_gives_the_same_map_tiled_or_whole_and_the_plan_prints_their_cost():
    classifier = _valid_classifier()
    image = np.random.default_rng(44).random((WINDOW + 37, WINDOW + 29, 3), dtype=np.float32)
    atrous = kfs.predict_map(classifier, image, stride=2, engine="tf")
    whole = kfs.predict_map(classifier, image, stride=2, engine="fragments")
    assert _relative(whole, atrous) < 1e-5
    assert _relative(kfs.predict_map(classifier, image, stride=2, engine="fragments", tile=40), whole) < 1e-5
    plan = kfs.plan_prediction(classifier, image.shape[:2], stride=2, engine="fragments")
    assert plan.engine == "fragments" and plan.finer.fragments_macs >= plan.finer.macs
    assert "multi-pooling fragments (engine 'fragments')" in str(plan)
    assert kfs.plan_prediction(classifier, image.shape[:2], stride=2, engine="tf").engine == "tf"
    with pytest.raises(InputError, match="engine='fragments' cannot run.*not an FCN at a finer stride"):
        kfs.predict_map(classifier, image, engine="fragments")  # the FCN's own stride: nothing to fragment


def test_forcing_fragments_on_a_same_network_tiled():
    fcn = _same_fcn()
    image = np.random.default_rng(45).random((53, 46, 3), dtype=np.float32)
    atrous = _map_hwc(rarefy(fcn, 1), image)
    assert fragments_refusal(rarefy(fcn, 1)) is None
    assert _relative(kfs.predict_map(fcn, image, stride=1, engine="fragments"), atrous) < 1e-5
    assert _relative(kfs.predict_map(fcn, image, stride=1, engine="fragments", tile=30), atrous) < 1e-5


def test_auto_times_fragments_against_the_a_trous_pass(monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)  # measure even this small a pass
    monkeypatch.setenv(engines.CACHE_ENV, "off")  # measured now, not read from a file
    engines.clear_cache()
    classifier = _valid_classifier()
    plan = kfs.plan_prediction(classifier, (WINDOW + 30, WINDOW + 30), stride=2, engine="auto")
    assert "fragments" in plan.engine_reason and "fastest measured" in plan.engine_reason
    assert "fragments" in engines.candidates(kfs.prepare(classifier, stride=2).runnable)


def test_the_fcn_at_its_own_stride_is_not_fragmented():
    fcn = kfs.convert(_valid_classifier())
    assert "not an FCN at a finer stride" in fragments_refusal(fcn)
    with pytest.raises(InputError, match="finer than 8x8"):
        fragments_plan(fcn, 8)


def test_fragments_compute_in_float32_only():
    classifier = _valid_classifier()
    image = np.random.default_rng(46).random((WINDOW + 9, WINDOW + 9, 3), dtype=np.float32)
    with pytest.raises(InputError, match="engine='fragments' cannot run.*float32 only"):
        kfs.predict_map(classifier, image, stride=2, engine="fragments", precision="bfloat16")
    assert "fragments" not in engines.candidates(kfs.prepare(classifier, stride=2).runnable, "mixed_bfloat16")


def test_running_by_fragments_does_not_keep_the_fcn_alive():
    import gc
    import weakref

    fcn = kfs.convert(_valid_classifier())
    finer = rarefy(fcn, 2)
    image = np.random.default_rng(47).random((WINDOW + 9, WINDOW + 9, 3), dtype=np.float32)
    kfs.predict_map(finer, image, engine="fragments")
    gone = weakref.ref(fcn)
    del fcn
    gc.collect()
    assert gone() is None
