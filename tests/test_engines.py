"""The execution of a forward pass (tf, xla, blas) chosen by measurement: same maps, cached choices, options."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cost import pass_cost
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.graph import model_facts
from keras_fcn_surgery.inference import engines


def _head_model(branch=False, channels=2):
    """conv + pooling, a 5x5 "fc6" of 512 filters (a large-kernel head), a 1x1 "fc7"; optionally a skip around fc6."""
    inputs = keras.Input((None, None, channels))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    y = layers.Conv2D(512, 5, activation="relu", name="fc6")(x)
    if branch:  # the graph cannot be split at fc6: no BLAS head
        y = layers.Concatenate()([y, layers.Cropping2D(2)(x)])
    return keras.Model(inputs, layers.Conv2D(3, 1, name="fc7")(y))


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "engines.json"
    monkeypatch.setenv(engines.CACHE_ENV, str(path))
    engines.clear_cache()
    yield path
    engines.clear_cache()


@pytest.fixture
def timed(monkeypatch):
    """Every probe is recorded: the engines and shape it timed."""
    calls = []
    real = engines.time_engines

    def recorded(model, names, shape, *args, **kwargs):
        calls.append((tuple(names), tuple(shape)))
        return real(model, names, shape, *args, **kwargs)

    monkeypatch.setattr(engines, "time_engines", recorded)
    return calls


def test_every_engine_gives_the_map_of_tf():
    model = _head_model()
    image = random_images((77, 69, 2), seed=3)
    reference = kfs.predict_map(model, image, engine="tf")
    scale = np.abs(reference).max()
    assert scale > 0
    for engine in ("xla", "blas", "auto"):
        for options in ({}, {"tile": 44}, {"tile": 44, "staged": False}):
            result = kfs.predict_map(model, image, engine=engine, **options)
            np.testing.assert_allclose(result, reference, atol=1e-5 * scale, err_msg=f"{engine} {options}")
        maps = kfs.predict_maps(model, [image, image[:45, :45]], engine=engine)
        np.testing.assert_allclose(maps[0], reference, atol=1e-5 * scale, err_msg=engine)
    for engine in ("tf", "xla", "blas"):
        assert (engine, None) in model_facts(model).forwards, f"{engine} was not run"


def test_auto_runs_tf_untimed_below_the_threshold(cache_file, timed):
    model = _head_model()
    image = random_images((61, 53, 2), seed=4)
    choice = engines.choose_engine(model, (1, 61, 53, 2))
    assert choice.engine == "tf" and "below" in choice.reason and choice.timings == {}
    kfs.predict_map(model, image)
    kfs.predict_map(model, image, tile=40)
    plan = kfs.plan_prediction(model, image.shape[:2], engine="auto")
    assert plan.engine == "tf" and "engine tf: " in str(plan) and "below the 4 GMAC" in str(plan)
    assert kfs.plan_prediction(model, image.shape[:2]).engine is None
    assert timed == [], "a small pass was timed"
    assert not cache_file.exists(), "nothing measured, nothing written"


def test_auto_measures_once_keeps_the_fastest_and_caches_it(cache_file, timed, monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    model = _head_model()
    image = random_images((61, 53, 2), seed=5)
    whole = kfs.predict_map(model, image, engine="tf")
    result = kfs.predict_map(model, image)
    np.testing.assert_allclose(result, whole, atol=1e-5 * np.abs(whole).max())
    assert timed == [(("tf", "xla", "blas"), (1, 61, 53, 2))], "one probe of every candidate at the real shape"
    choice = engines.choose_engine(model, (1, 61, 53, 2))
    assert choice.engine in ("tf", "xla", "blas") and "fastest measured" in choice.reason
    assert set(choice.timings) == {"tf", "xla", "blas"}
    assert choice.timings[choice.engine] == min(choice.timings.values())
    kfs.predict_map(model, image)
    plan = kfs.plan_prediction(model, image.shape[:2], engine="auto")
    assert plan.engine == choice.engine and f"engine {choice.engine}: fastest measured" in str(plan)
    assert len(timed) == 1, "the second call timed again"
    # On disk: one entry; a new model of the same architecture (another object) reads it, untimed.
    entries = json.loads(cache_file.read_text())["entries"]
    assert [entry["engine"] for entry in entries.values()] == [choice.engine]
    assert not [name for name in os.listdir(cache_file.parent) if name != cache_file.name], "a temporary was left"
    engines.clear_cache()
    again = engines.choose_engine(_head_model(), (1, 61, 53, 2))
    assert again.engine == choice.engine and "measured earlier" in again.reason and again.timings == choice.timings
    assert len(timed) == 1
    # Another input shape is another measurement.
    engines.choose_engine(model, (2, 61, 53, 2))
    assert len(timed) == 2 and len(json.loads(cache_file.read_text())["entries"]) == 2


def test_a_new_process_reads_the_cache_file(cache_file, monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    first = engines.choose_engine(_head_model(), (1, 45, 45, 2))
    assert "fastest measured" in first.reason
    script = "\n".join(
        [
            "import sys",
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})",
            "from test_engines import _head_model",
            "from keras_fcn_surgery.inference import engines",
            "engines.MEASURE_MACS = 0",
            "engines.time_engines = None  # a measurement would fail",
            "choice = engines.choose_engine(_head_model(), (1, 45, 45, 2))",
            "print('CHOICE', choice.engine, '|', choice.reason)",
        ]
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", engines.CACHE_ENV: str(cache_file)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("CHOICE"))
    assert line.startswith(f"CHOICE {first.engine} |") and "measured earlier" in line


def test_a_broken_or_disabled_cache_file_only_costs_a_measurement(tmp_path, monkeypatch, timed):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    path = tmp_path / "engines.json"
    path.write_text("{not json")
    monkeypatch.setenv(engines.CACHE_ENV, str(path))
    engines.clear_cache()
    assert "fastest measured" in engines.choose_engine(_head_model(), (1, 45, 45, 2)).reason
    assert json.loads(path.read_text())["version"] == 1, "the broken file was replaced"
    monkeypatch.setenv(engines.CACHE_ENV, "off")
    engines.clear_cache()
    assert engines.cache_path() is None
    assert "fastest measured" in engines.choose_engine(_head_model(), (1, 45, 45, 2)).reason
    assert len(timed) == 2
    monkeypatch.delenv(engines.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engines.cache_path() == str(tmp_path / "xdg" / "keras_fcn_surgery" / "engines.json")
    engines.clear_cache()


def test_clear_cache_makes_a_model_measure_again(monkeypatch, timed):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    monkeypatch.setenv(engines.CACHE_ENV, "off")
    model = _head_model()
    first = engines.choose_engine(model, (1, 45, 45, 2))
    assert engines.choose_engine(model, (1, 45, 45, 2)) is first and len(timed) == 1, "kept on the model"
    engines.clear_cache()
    assert "fastest measured" in engines.choose_engine(model, (1, 45, 45, 2)).reason
    assert len(timed) == 2, "a choice made before clear_cache was kept"


def test_a_huge_pass_is_probed_at_a_capped_size(monkeypatch, cache_file, timed):
    model = _head_model()
    full = 4 * pass_cost(model, (1, 301, 299, 2)).macs
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    monkeypatch.setattr(engines, "PROBE_MACS", full // 10)
    probe = engines.probe_shape(model, (4, 301, 299, 2))
    assert probe[0] == 1 and probe[3] == 2 and probe[1] < 301 and probe[2] < 299
    assert pass_cost(model, probe).macs <= full // 10 * 1.1 and engines.call_macs(model, probe) > full // 40
    assert engines.probe_shape(model, (2, 45, 45, 2)) == (2, 45, 45, 2)
    engines.choose_engine(model, (4, 301, 299, 2))
    assert timed[0][1] == probe


def test_jit_compile_still_works_with_a_deprecation_warning():
    model = _head_model()
    image = random_images((45, 45, 2), seed=6)
    reference = kfs.predict_map(model, image, engine="tf")
    for jit, engine in ((True, "xla"), (False, "tf")):
        with pytest.warns(DeprecationWarning, match="engine="):
            result = kfs.predict_map(model, image, jit_compile=jit)
        np.testing.assert_allclose(result, reference, atol=1e-5 * np.abs(reference).max())
        assert (engine, None) in model_facts(model).forwards
        with pytest.warns(DeprecationWarning, match="engine="):
            kfs.predict_maps(model, [image], jit_compile=jit)
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="not both"):
        kfs.predict_map(model, image, engine="tf", jit_compile=True)


def test_engine_errors():
    model = _head_model()
    image = random_images((45, 45, 2), seed=7)
    for bad in ("cuda", None, "TF"):
        with pytest.raises(InputError, match="'auto', 'tf', 'xla', 'blas'"):
            kfs.predict_map(model, image, engine=bad)
    with pytest.raises(InputError, match="'auto', 'tf', 'xla', 'blas'"):
        kfs.predict_maps(model, [image], engine="fast")
    with pytest.raises(InputError, match="'auto', 'tf', 'xla', 'blas'"):
        kfs.plan_prediction(model, (45, 45), engine="gpu")
    with pytest.raises(InputError, match="no head convolution"):
        kfs.predict_map(_head_model(branch=True), image, engine="blas")
    with pytest.raises(InputError, match="float32 only"):
        kfs.predict_map(model, image, engine="blas", mixed_precision=True)
    assert engines.candidates(_head_model(branch=True)) == ("tf", "xla")
    assert engines.candidates(model) == ("tf", "xla", "blas")


def test_predict_images_and_the_cli_take_an_execution(tmp_path):
    from PIL import Image

    from keras_fcn_surgery.batch.run import predict_images
    from keras_fcn_surgery.cli import main

    model = _head_model(channels=3)
    image = np.random.default_rng(8).integers(0, 256, (45, 45, 3)).astype("uint8")
    Image.fromarray(image).save(tmp_path / "image.png")
    with pytest.raises(InputError, match="'auto', 'tf', 'xla', 'blas'"):
        predict_images(model, [str(tmp_path / "image.png")], tmp_path / "out", execution="fast")
    summary = predict_images(model, [str(tmp_path / "image.png")], tmp_path / "out", execution="xla")
    assert summary.ok, summary.line()
    assert ("xla", None) in model_facts(model).forwards
    scores = np.load(tmp_path / "out" / "image.npz")["scores"]
    reference = kfs.predict_map(model, image.astype("float32"), engine="tf")
    np.testing.assert_allclose(scores, reference, atol=1e-5 * np.abs(reference).max())
    with pytest.raises(SystemExit):
        main(["predict", "model.keras", "image.npy", "-o", str(tmp_path), "--execution", "fast"])


def test_each_stage_of_a_staged_plan_is_chosen_for_on_its_own(cache_file, timed, monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)
    model = _head_model()
    image = random_images((150, 140, 2), seed=6)
    plan = kfs.plan_prediction(model, image.shape[:2], tile=60, staged=True, engine="auto")
    assert plan.staged
    # One probe per stage, each on its own model's call shape (the conv stage holds no head: no "blas").
    assert timed == [(tuple(engines.candidates(run.model)), run.call_shape()) for run in plan._runs]
    assert "blas" not in timed[0][0] and "blas" in timed[-1][0]
    assert all(stage.engine in ("tf", "xla", "blas") for stage in plan.stages)
    assert plan.engine == "+".join(dict.fromkeys(stage.engine for stage in plan.stages))
    assert plan.engine_reason.startswith("stage 1: ") and " engine" in str(plan).splitlines()[2]
    whole = kfs.predict_map(model, image, engine="tf")
    staged = kfs.predict_map(model, image, tile=60, staged=True)
    np.testing.assert_allclose(staged, whole, atol=1e-5 * np.abs(whole).max())
    assert len(timed) == len(plan.stages), "running the plan timed again"
    blas = kfs.plan_prediction(model, image.shape[:2], tile=60, staged=True, engine="blas")
    assert [stage.engine for stage in blas.stages] == ["tf"] * (len(blas.stages) - 1) + ["blas"]


def test_many_models_traced_once_each_warn_of_no_retracing(caplog):
    """Each model (a staged pass's stages, say) gets a `tf.function` of its own, traced once per shape: TensorFlow
    must not count them as one function retraced ("5 out of the last 5 calls ... triggered tf.function retracing")."""
    models = []
    for width in range(3, 11):
        models.append(keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(width, 3)]))
    image = random_images((1, 8, 8, 3))
    with caplog.at_level("WARNING", logger="tensorflow"):
        for model in models:
            engines.forward(model, "tf")(image)
    assert not [record for record in caplog.records if "retracing" in record.getMessage()]
