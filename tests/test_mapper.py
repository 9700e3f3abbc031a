"""The prepared mapper (issue 35): the method routed once, options grouped, rebuilt anywhere from its recipe."""

import pickle

import keras
import numpy as np
import pytest
from keras import layers
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference import windowed


def _padded_classifier():
    """A 32 x 32 classifier whose FCN is exact (valid padding): its map is the sliding window's."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(8, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(5, activation="softmax"),
        ],
        name="mapper_classifier",
    )


def _image(size=(80, 72), seed=0):
    return np.random.default_rng(seed).random((*size, 3)).astype("float32")


def test_a_map_routes_its_method_once(monkeypatch):
    # Issue 35: `windowed.route` ran twice per map (predict_map, then plan_prediction).
    model, image = _padded_classifier(), _image()
    calls = []
    real = windowed.route
    monkeypatch.setattr(windowed, "route", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    kfs.predict_map(model, image, tile=48)
    assert len(calls) == 1
    calls.clear()
    kfs.predict_map(model, image, stride=4, method="windowed")
    assert len(calls) == 1


def test_the_mapper_gives_predict_maps_map_and_plan():
    model, image = _padded_classifier(), _image()
    mapper = kfs.prepare(model, tile=48)
    assert mapper.method == "fcn" and mapper.classifier is model and mapper.stride is None
    np.testing.assert_array_equal(mapper.map(image), kfs.predict_map(model, image, tile=48))
    assert mapper.plan(image.shape[:2]).macs == kfs.plan_prediction(model, image.shape[:2], tile=48).macs
    windowed_mapper = kfs.prepare(model, method="windowed", stride=4)
    assert windowed_mapper.method == "windowed" and windowed_mapper.stride == (4, 4)
    scores = windowed_mapper.map(image)
    np.testing.assert_array_equal(scores, kfs.predict_map(model, image, method="windowed", stride=4))
    assert scores.shape[:2] == windowed_mapper.grid.output_size(image.shape[:2])
    certificate = windowed_mapper.certify(image, scores, 4)
    assert certificate.exact and "mapper_classifier" in certificate.against


def test_option_groups_and_flat_keywords_are_the_same_request():
    model, image = _padded_classifier(), _image()
    flat = kfs.predict_map(model, image, tile=48, batch_size=2, engine="tf", preprocess=lambda x: x / 2)
    grouped = kfs.predict_map(
        model,
        image,
        tiling=kfs.Tiling(tile=48, batch_size=2),
        execution=kfs.Execution(engine="tf"),
        inputs=kfs.Inputs(preprocess=lambda x: x / 2),
    )
    np.testing.assert_array_equal(flat, grouped)
    mapper = kfs.prepare(model, tiling=kfs.Tiling(tile=48), batch_size=2)  # a flat keyword overrides its group's
    assert mapper.tiling == kfs.Tiling(tile=48, batch_size=2)
    assert mapper.with_options(tile=64).tiling == kfs.Tiling(tile=64, batch_size=2)


def test_an_unknown_keyword_is_a_type_error_naming_it():
    model, image = _padded_classifier(), _image()
    with pytest.raises(TypeError, match="predict_map.*'tiles'"):
        kfs.predict_map(model, image, tiles=48)
    with pytest.raises(TypeError, match="prepare.*'strid'"):
        kfs.prepare(model, strid=4)
    with pytest.raises(TypeError, match="Tiling"):
        kfs.prepare(model, tiling={"tile": 48})


def test_a_pickled_mapper_rebuilds_with_its_classifier():
    # No process-wide table: the FCN rebuilt from the recipe's bytes knows its classifier from the recipe.
    classifier = _padded_classifier()
    fcn = kfs.convert(classifier)
    image = _image()
    mapper = kfs.prepare(fcn, tile=48)
    assert mapper.classifier is classifier
    rebuilt = pickle.loads(pickle.dumps(mapper))
    assert rebuilt.method == "fcn" and rebuilt.tiling == mapper.tiling
    assert rebuilt.classifier is not None and rebuilt.classifier is not classifier
    scores = rebuilt.map(image)
    np.testing.assert_array_equal(scores, mapper.map(image))
    here, there = mapper.certify(image, scores, 4), rebuilt.certify(image, scores, 4)
    assert there.against == here.against == "classifier 'mapper_classifier'"
    assert there.max_abs_diff == here.max_abs_diff and there.exact
    windowed_mapper = pickle.loads(pickle.dumps(kfs.prepare(classifier, method="windowed", stride=8)))
    assert windowed_mapper.method == "windowed" and windowed_mapper.stride == (8, 8)


@pytest.mark.heavy
def test_a_mapper_on_a_ray_worker_certifies_against_the_same_classifier(tmp_path):
    ray = pytest.importorskip("ray")
    from PIL import Image

    classifier = small_flatten_cnn(input_size=(32, 32), classes=3)  # held: the certificates run it
    fcn = kfs.convert(classifier)
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    local = kfs.predict_images(fcn, [str(tmp_path / "a.png")], tmp_path / "local", certify=4)
    remote = kfs.predict_images(fcn, [str(tmp_path / "a.png")], tmp_path / "ray", certify=4, engine="ray", workers=1)
    assert not ray.is_initialized()
    (here,), (there,) = local.results, remote.results
    assert "against classifier" in here.certificate
    assert there.certificate == here.certificate


def test_a_masked_slide_is_planned_once(tmp_path, monkeypatch):
    # Issue 35: the masked plan of one input was built for the work fraction, the pass and the certificate.
    from PIL import Image

    model = _padded_classifier()
    pixels = np.random.default_rng(5).integers(0, 255, (72, 88, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    mask = np.zeros((72, 88), np.uint8)
    mask[:, :40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    masked = []
    real = windowed.plan_windows
    monkeypatch.setattr(
        windowed, "plan_windows", lambda *a, **k: (masked.append(k.get("keep") is not None), real(*a, **k))[1]
    )
    summary = kfs.predict_images(
        model, [str(tmp_path / "scene.png")], tmp_path / "maps", mask=str(tmp_path / "mask.png"), stride=4, certify=4
    )
    assert summary.ok, summary.failed
    assert "certificate: 4 of" in summary.results[0].certificate
    assert masked.count(True) == 1
