"""Loading a model from a ``.keras`` or ``.h5`` file, with errors that say what to do."""

from __future__ import annotations

import os
import zipfile

import h5py
import keras

from keras_fcn_surgery.errors import ModelFileError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_model(path, custom_objects=None) -> keras.Model:
    """Load a Keras model file without compiling it.

    Args:
        path: a ``.keras`` (Keras 3 zip) or ``.h5``/``.hdf5`` (legacy HDF5) file.
        custom_objects: dict of custom layer classes or functions the file refers to.

    Raises:
        ModelFileError: for a missing, truncated or foreign file, or one that
            needs custom objects; the message names the file and the way out.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"Model file '{path}' does not exist. Check the path.")
    if os.path.isdir(path):
        raise ModelFileError(
            f"'{path}' is a folder. Give a `.keras` or `.h5` model file; a SavedModel folder cannot be "
            "converted (it holds no Keras layer graph)."
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelFileError(
            f"'{path}' is not a Keras model file: expected a name ending in {', '.join(MODEL_SUFFIXES)}."
        )
    _check_container(path, suffix)
    try:
        return keras.models.load_model(path, custom_objects=custom_objects, compile=False)
    except (TypeError, ValueError) as error:
        text = str(error)
        if "custom" in text.lower() or "Could not locate" in text or "Unknown" in text:
            raise ModelFileError(
                f"Model file '{path}' refers to a class or function Keras does not know ({_first_line(text)}). "
                "Pass it with `custom_objects={'Name': NameClass}` (CLI: `--custom-objects module.py`), "
                "or register it with `@keras.saving.register_keras_serializable()`."
            ) from error
        raise ModelFileError(f"Model file '{path}' could not be loaded: {_first_line(text)}") from error
    except Exception as error:
        raise ModelFileError(
            f"Model file '{path}' could not be loaded ({type(error).__name__}: {_first_line(str(error))}). "
            "It may be truncated or written by an incompatible Keras version; save it again with "
            "`model.save('model.keras')`."
        ) from error


def _check_container(path: str, suffix: str) -> None:
    """Refuse files that are not the container their suffix promises (truncated or foreign)."""
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelFileError(
                f"'{path}' is not a valid `.keras` archive (it is not a readable zip file; it may be "
                "truncated). Save the model again with `model.save(...)`."
            )
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise ModelFileError(f"'{path}' is a damaged `.keras` archive ({error}). Save the model again.") from error
        if bad is not None:
            raise ModelFileError(
                f"'{path}' is a damaged `.keras` archive (entry '{bad}' is corrupt). Save the model again."
            )
    else:
        try:
            with h5py.File(path, "r") as handle:
                if "model_config" not in handle.attrs:
                    raise ModelFileError(
                        f"'{path}' is an HDF5 file without a model config (weights only?). "
                        "Build the model in code and call `model.load_weights(...)`, then convert it."
                    )
        except OSError as error:
            raise ModelFileError(
                f"'{path}' is not a readable HDF5 file ({_first_line(str(error))}); it may be truncated. "
                "Save the model again."
            ) from error


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
