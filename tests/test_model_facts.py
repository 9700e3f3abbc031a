"""What the package learns about a model is kept on the model (`graph.model_facts`), not in process-wide tables
(issue 35): it dies with the model and changes nothing Keras sees (weights, configuration, file, pickle)."""

import copy
import gc
import pickle
import weakref

import keras
import numpy as np
from conftest import random_images
from keras import layers
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.graph import model_facts, source_of, traced_from, traced_model


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3)
        self.flatten = layers.Flatten()
        self.logits = layers.Dense(3)

    def call(self, x):
        return self.logits(self.flatten(self.conv(x)))


def _subclassed():
    model = _Subclassed()
    model(random_images((1, 12, 12, 3)))
    return model


def test_a_subclassed_model_and_its_traced_twin_are_freed_together():
    model = _subclassed()
    twin = traced_model(model)
    assert traced_model(model) is twin and traced_from(twin) is model
    gone, twin_gone = weakref.ref(model), weakref.ref(twin)
    del model, twin
    gc.collect()
    assert gone() is None and twin_gone() is None, "a process-wide table keeps the model or its twin alive"


def test_a_classifier_and_its_conversions_are_freed_together():
    classifier = small_flatten_cnn()
    fcn = kfs.as_fcn(classifier)
    assert kfs.as_fcn(classifier) is fcn and source_of(fcn)[0] is classifier
    gone, fcn_gone = weakref.ref(classifier), weakref.ref(fcn)
    del classifier, fcn
    gc.collect()
    assert gone() is None and fcn_gone() is None


def test_facts_change_no_weight_configuration_file_or_pickle(tmp_path):
    classifier = small_flatten_cnn()
    before = (len(classifier.weights), classifier.get_config())
    fcn = kfs.as_fcn(classifier)  # facts on both: the conversion on the classifier, the source on the FCN
    assert model_facts(classifier).conversions and model_facts(fcn).source is not None
    assert (len(classifier.weights), classifier.get_config()) == before
    path = str(tmp_path / "fcn.keras")
    fcn.save(path)  # the weak reference to the classifier is not saved (it could not be)
    loaded = keras.models.load_model(path, compile=False)
    assert [w.shape for w in loaded.weights] == [w.shape for w in fcn.weights]
    again = pickle.loads(pickle.dumps(fcn))
    image = random_images((1, 40, 36, 3), seed=3)
    np.testing.assert_allclose(np.asarray(again(image)), np.asarray(fcn(image)), rtol=1e-6, atol=1e-6)
    assert source_of(again) == (None, None), "an unpickled model is another object: it knows no source"


def test_a_copy_of_a_model_starts_without_facts():
    facts = model_facts(small_flatten_cnn())
    facts.record = {"input_size": (32, 32)}
    assert copy.copy(facts).record is None and copy.deepcopy(facts).record is None
    assert pickle.loads(pickle.dumps(facts)).record is None


def test_thin_callers_in_a_loop_convert_plan_and_compile_once():
    classifier = small_flatten_cnn()
    image = random_images((70, 66, 3), seed=4)
    first = kfs.predict_map(classifier, image, tile=48)
    fcn = kfs.as_fcn(classifier)
    facts = model_facts(fcn)
    plans, stages = dict(facts.plans), dict(facts.stages)
    forwards = {id(model): dict(model_facts(model).forwards) for model in [fcn, *stages.values()]}
    again = kfs.predict_map(classifier, image, tile=48)
    np.testing.assert_array_equal(again, first)
    assert kfs.as_fcn(classifier) is fcn and facts.plans == plans and facts.stages == stages
    assert forwards == {id(model): model_facts(model).forwards for model in [fcn, *stages.values()]}
    assert any(forwards.values()), "no compiled forward was kept"
