"""Checks of the paths a command is given, with no Keras or TensorFlow import: the CLI runs them first.

A missing model file or an existing output is answered in a fraction of a
second, before TensorFlow starts (about 5 s).
"""

from __future__ import annotations

import os

from keras_fcn_surgery.errors import ModelFileError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_model_path(path) -> str:
    """``path`` if it names a Keras model file that exists.

    Raises:
        ModelFileError: for a missing path, a folder (saying what kind of
            folder and how to get a model file from it), or another suffix.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"Model file '{path}' does not exist. Check the path.")
    if os.path.isdir(path):
        raise ModelFileError(_folder_message(path))
    if os.path.splitext(path)[1].lower() not in MODEL_SUFFIXES:
        raise ModelFileError(
            f"'{path}' is not a Keras model file: expected a name ending in {', '.join(MODEL_SUFFIXES)}."
        )
    return path


def check_input_file(path, what: str) -> str:
    """``path`` if it names an existing file; else a `ModelFileError` naming it as ``what``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ModelFileError(f"{what} '{path}' {problem}. Check the path.")
    return path


def _folder_message(path: str) -> str:
    """Why a folder cannot be loaded, and how to get a model file from it."""
    if os.path.isfile(os.path.join(path, "keras_metadata.pb")):
        return (
            f"'{path}' is a Keras 2 SavedModel folder (written by tf.keras / tf_keras), whose layer graph Keras 3 "
            "cannot read. Re-save it as a file with Keras 2, then convert that: `pip install tf-keras`, then "
            f"`python -c \"import tf_keras; tf_keras.models.load_model('{path}').save('model.h5')\"` "
            "(a legacy `.h5` file, which Keras 3 loads). Custom layers must be importable there too."
        )
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return (
            f"'{path}' is a TensorFlow SavedModel folder: it holds a TensorFlow graph but no Keras layers, so it "
            "cannot be converted. Convert the `.keras` or `.h5` model it was exported from (`model.save("
            "'model.keras')` before `model.export(...)`)."
        )
    return f"'{path}' is a folder. Give a `.keras` or `.h5` model file."
