"""Shift-and-stitch of an FCN's tail (`inference.stitch`): the same map as à trous, as the execution "stitch".

The head runs once to the cut at stride s, the tail (strides kept) on each of the (S/s)^2 shifts of its map, and
the maps are interleaved: for `valid` networks this is the à trous map cell for cell. `engine="stitch"` forces it
(tiles included), `engine="auto"` times it against the à trous pass and keeps the faster, and the plan prints the
multiply-accumulates of each way.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_finer_strides import WINDOW, _map_hwc, _relative, _same_fcn, _valid_classifier

import keras_fcn_surgery as kfs
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.inference.stitch import stitch_cost, stitch_map, stitch_plan, stitch_refusal
from keras_fcn_surgery.surgery.atrous import rarefy


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("stride", [4, 2, 1])
def test_shift_and_stitch_of_the_tail_is_the_a_trous_map(stride, nested):
    fcn = kfs.convert(_valid_classifier(nested=nested))
    plan = stitch_plan(fcn, stride)
    assert plan.shifts == (8 // stride, 8 // stride) and kfs.geometry(plan.head).stride == (stride, stride)
    image = np.random.default_rng(30).random((WINDOW + 23, WINDOW + 18, 3), dtype=np.float32)
    stitched = stitch_map(fcn, image, stride)
    atrous = _map_hwc(rarefy(fcn, stride), image)
    assert stitched.shape == atrous.shape
    assert _relative(stitched, atrous) < 1e-5
    assert stitch_cost(fcn, stride, image.shape[:2]) > 0


def test_forcing_each_way_gives_the_same_map_and_the_plan_prints_both_costs():
    classifier = _valid_classifier()
    image = np.random.default_rng(31).random((WINDOW + 37, WINDOW + 29, 3), dtype=np.float32)
    atrous = kfs.predict_map(classifier, image, stride=2, engine="tf")
    stitched = kfs.predict_map(classifier, image, stride=2, engine="stitch")
    assert _relative(stitched, atrous) < 1e-5
    assert _relative(kfs.predict_map(classifier, image, stride=2, engine="stitch", tile=40), atrous) < 1e-5
    plan = kfs.plan_prediction(classifier, image.shape[:2], stride=2, engine="stitch")
    assert plan.engine == "stitch" and plan.finer.tail_stitch_macs > plan.finer.macs
    assert "shift-and-stitch of the tail (engine 'stitch')" in str(plan) and "à trous" in str(plan)
    assert kfs.plan_prediction(classifier, image.shape[:2], stride=2, engine="tf").engine == "tf"
    with pytest.raises(InputError, match="engine='stitch' cannot run.*not an FCN at a finer stride"):
        kfs.predict_map(classifier, image, engine="stitch")  # the FCN's own stride: nothing to stitch


def test_auto_times_shift_and_stitch_against_the_a_trous_pass(monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)  # measure even this small a pass
    monkeypatch.setenv(engines.CACHE_ENV, "off")  # measured now, not read from a file
    engines.clear_cache()
    classifier = _valid_classifier()
    plan = kfs.plan_prediction(classifier, (WINDOW + 30, WINDOW + 30), stride=2, engine="auto")
    assert "stitch" in plan.engine_reason and "fastest measured" in plan.engine_reason
    assert plan.engine in ("tf", "xla", "blas", "stitch", "fragments")  # any candidate may be the fastest


def test_a_tail_with_same_windows_is_not_stitched():
    fcn = _same_fcn()
    assert "same" in stitch_refusal(rarefy(fcn, 2))
    assert stitch_refusal(fcn) is not None  # not an FCN à trous
    image = np.random.default_rng(32).random((40, 36, 3), dtype=np.float32)
    assert _relative(kfs.predict_map(fcn, image, stride=2), _map_hwc(rarefy(fcn, 2), image)) < 1e-5  # auto: à trous
