"""The same conversions, geometry and dense maps on any Keras backend, for tests/test_backends.py.

`save_models` writes small classifiers and an FCN as ``.keras`` files (a format every backend reads);
`results` converts and runs them on the backend of the process that calls it. The test calls it under
TensorFlow and runs this file as a script under ``KERAS_BACKEND=jax``, with TensorFlow made unimportable,
so the JAX side also shows that the surgery and the maps need no TensorFlow:

    KERAS_BACKEND=jax python tests/backend_cases.py MODELS_DIR OUT.npz [applications]

(``applications``: MobileNetV2 and ResNet50 from `save_applications` instead of the small models.)
"""

import json
import os
import sys

MODELS = ("flatten_cnn", "bn_residual_gap", "strided_fcn", "two_outputs")


def save_models(folder) -> None:
    """The test models, with seeded random weights, as ``.keras`` files in ``folder``."""
    import keras
    from conftest import STRIDES, strided_fcn
    from keras import layers
    from models import small_flatten_cnn

    keras.utils.set_random_seed(26)
    inputs = keras.Input((28, 28, 3))
    x = layers.Conv2D(8, 3, activation="relu")(inputs)
    y = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x))
    x = layers.Activation("relu")(layers.Add()([x, y]))
    x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(12, 3, activation="relu")(x))
    residual = keras.Model(inputs, layers.Dense(4, activation="softmax")(x), name="bn_residual_gap")
    # BatchNormalization's moving statistics away from 0 and 1, so that its non-trainable weights matter.
    batch_norm = next(layer for layer in residual.layers if isinstance(layer, layers.BatchNormalization))
    gamma, beta, mean, variance = batch_norm.get_weights()
    batch_norm.set_weights([gamma * 1.5, beta + 0.2, mean + 0.3, variance * 2.0])
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    score = layers.Conv2D(3, 1, activation="softmax", name="score")(x)
    box = layers.Conv2D(4, 1, name="box")(x)
    models = {
        "two_outputs": keras.Model(inputs, [score, box], name="two_outputs"),
        "flatten_cnn": small_flatten_cnn(),
        "bn_residual_gap": residual,
        "strided_fcn": strided_fcn("same", STRIDES[8], head=3),
    }
    for name, model in models.items():
        model.save(os.path.join(folder, f"{name}.keras"))
    import keras_fcn_surgery as kfs

    kfs.segmenter(models["flatten_cnn"], num_classes=3).save(os.path.join(folder, "segmenter.keras"))
    from test_windowed import se_classifier

    se_classifier().save(os.path.join(folder, "se_classifier.keras"))


def results(folder) -> tuple[dict, dict]:
    """``(arrays, texts)``: the maps of the models in ``folder`` and what the library says about them."""
    import keras
    import numpy as np

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.inference.predict import plan_prediction

    def path(name):
        return os.path.join(folder, f"{name}.keras")

    rng = np.random.default_rng(26)
    arrays, texts = {}, {"backend": keras.backend.backend()}
    image = rng.uniform(0, 1, (77, 90, 3)).astype("float32")
    for name, head in (("flatten_cnn", "window"), ("bn_residual_gap", "window"), ("bn_residual_gap", "dense")):
        key = f"{name}-{head}"
        texts[f"{key}-plan"] = str(kfs.plan(path(name), head=head))
        fcn = kfs.convert(path(name), head=head)  # verified against the classifier on this backend
        texts[f"{key}-geometry"] = str(kfs.geometry(fcn))
        arrays[f"{key}-whole"] = kfs.predict_map(fcn, image)
        arrays[f"{key}-tiled"] = kfs.predict_map(fcn, image, tile=40, batch_size=3)
        cells = arrays[f"{key}-whole"].shape[:2]
        keep = np.zeros(cells, bool)
        keep[: cells[0] // 2, cells[1] // 3 :] = True
        arrays[f"{key}-masked"] = np.nan_to_num(kfs.predict_map(fcn, image, tile=40, keep=keep), nan=-1.0)
        texts[f"{key}-engine"] = plan_prediction(fcn, image.shape[:2], engine="auto").engine
    fcn = keras.models.load_model(path("strided_fcn"))
    strided = rng.standard_normal((131, 101, 2)).astype("float32")
    texts["strided_fcn-geometry"] = str(kfs.geometry(fcn))
    arrays["strided_fcn-whole"] = kfs.predict_map(fcn, strided)
    arrays["strided_fcn-staged"] = kfs.predict_map(fcn, strided, tile=60, staged=True, batch_size=2)
    texts["strided_fcn-stages"] = str(len(plan_prediction(fcn, strided.shape[:2], tile=60, staged=True).stages))
    # A segmenter built on this backend: the same layers as TensorFlow's (its new layers' random initial weights
    # differ by backend: those of the one built there are set), the same per-pixel maps, whole and tiled.
    built = kfs.segmenter(path("flatten_cnn"), num_classes=3)
    saved = keras.models.load_model(path("segmenter"))
    texts["segmenter-layers"] = " ".join(f"{type(layer).__name__}:{layer.name}" for layer in built.layers)
    built.set_weights(saved.get_weights())
    pixels = rng.standard_normal((101, 93, 3)).astype("float32")
    arrays["segmenter-whole"] = kfs.segment_image(built, pixels)
    arrays["segmenter-tiled"] = kfs.segment_image(saved, pixels, tile=72)
    se = keras.models.load_model(path("se_classifier"))  # squeeze-and-excitation: a windowed map, tiled or not
    windows = rng.standard_normal((33 + 3 * 4, 29 + 5 * 4, 3)).astype("float32")
    for kind, tile in (("whole", None), ("tiled", 44)):
        arrays[f"windowed-{kind}"] = kfs.predict_map(se, windows, stride=4, tile=tile, method="windowed")
    fcn = keras.models.load_model(path("two_outputs"))  # a map per output, by name
    for kind, tile in (("whole", None), ("tiled", 40)):
        for output, scores in kfs.predict_map(fcn, image, tile=tile).items():
            arrays[f"two_outputs-{kind}-{output}"] = scores
    return arrays, texts


# keras.applications networks compared across backends (random weights, logits), the sizes they are built at.
APPLICATIONS = (("MobileNetV2", 64), ("ResNet50", 64))


def save_applications(folder) -> None:
    """`APPLICATIONS` with seeded random weights, as ``.keras`` files in ``folder``."""
    import keras

    for name, size in APPLICATIONS:
        keras.utils.set_random_seed(40)
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        model.save(os.path.join(folder, f"{name}.keras"))


def application_results(folder) -> tuple[dict, dict]:
    """``(arrays, texts)``: the applications in ``folder`` converted (verified on this backend) and mapped."""
    import keras
    import numpy as np

    import keras_fcn_surgery as kfs

    arrays, texts = {}, {"backend": keras.backend.backend()}
    image = np.random.default_rng(40).uniform(-1, 1, (100, 84, 3)).astype("float32")
    for name, _ in APPLICATIONS:
        fcn = kfs.convert(os.path.join(folder, f"{name}.keras"))
        texts[f"{name}-geometry"] = str(kfs.geometry(fcn))
        arrays[f"{name}-whole"] = kfs.predict_map(fcn, image)
        arrays[f"{name}-tiled"] = kfs.predict_map(fcn, image, tile=80, batch_size=2)
    return arrays, texts


class _NoTensorFlow:
    """A finder that makes ``import tensorflow`` (and its submodules) fail as if it were not installed.

    The failure comes when the module would load, not when it is looked for: PyTorch's dynamo looks up
    ``tensorflow`` with `importlib.util.find_spec` at import (to skip it when tracing) and must not fail there.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (hidden by tests/backend_cases.py)", name=spec.name)

    def exec_module(self, module):  # pragma: no cover - create_module always raises
        raise AssertionError(module)


def hide_tensorflow() -> None:
    """From now on, this process cannot import TensorFlow."""
    sys.meta_path.insert(0, _NoTensorFlow())


def main(models_dir, out_path, cases="small") -> None:
    hide_tensorflow()
    import numpy as np

    arrays, texts = (application_results if cases == "applications" else results)(models_dir)
    np.savez(out_path, **arrays)
    with open(out_path + ".json", "w") as handle:
        json.dump({**texts, "tensorflow_imported": "tensorflow" in sys.modules}, handle)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest.py, models.py
    main(*sys.argv[1:])
