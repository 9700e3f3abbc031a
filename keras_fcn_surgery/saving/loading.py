"""Loading a model from a ``.keras`` or ``.h5`` file, with errors that say what to do."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys
import zipfile

import h5py
import keras

from keras_fcn_surgery.errors import ModelFileError, first_line
from keras_fcn_surgery.graph import model_facts, traced_from, traced_model
from keras_fcn_surgery.saving.paths import check_model_path

# The JSON entry of a `.keras` file in which `saving.record.save_model` records an FCN's classifier (Keras
# ignores it); a loaded model keeps what its file recorded (`graph.model_facts`).
RECORD_NAME = "keras_fcn_surgery.json"


def load_model(path, custom_objects=None) -> keras.Model:
    """Load a Keras model file without compiling it.

    Args:
        path: a ``.keras`` (Keras 3 zip) or ``.h5``/``.hdf5`` (legacy HDF5) file.
        custom_objects: dict of custom layer classes or functions the file refers to.

    Raises:
        ModelFileError: for a missing, truncated or foreign file, or one that
            needs custom objects; the message names the file and the way out.
    """
    path = check_model_path(path)
    suffix = os.path.splitext(path)[1].lower()
    _check_container(path, suffix)
    try:
        model = keras.models.load_model(path, custom_objects=custom_objects, compile=False)
    except (TypeError, ValueError) as error:
        text = str(error)
        if "custom" in text.lower() or "Could not locate" in text or "Unknown" in text:
            missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
            what = f"'{missing.group(1)}'" if missing else f"a class or function ({first_line(text)})"
            name = missing.group(1) if missing else "Name"
            raise ModelFileError(
                f"Model file '{path}' refers to {what} that Keras does not know. Pass it with "
                f"`custom_objects={{'{name}': {name}}}` (CLI: `--custom-objects module.py`, a Python file "
                "defining it), or register it with `@keras.saving.register_keras_serializable()` and import "
                "it before loading."
            ) from error
        raise ModelFileError(f"Model file '{path}' could not be loaded: {first_line(text)}") from error
    except Exception as error:
        raise ModelFileError(
            f"Model file '{path}' could not be loaded ({type(error).__name__}: {first_line(str(error))}). "
            "It may be truncated or written by an incompatible Keras version; save it again with "
            "`model.save('model.keras')`."
        ) from error
    record = _read_record(path) if suffix == ".keras" else None
    if record is not None:
        model_facts(model).record = record
    return model


def write_record(path: str, record: dict) -> None:
    """Add ``record`` (what a converted model knows of its classifier) to the ``.keras`` file ``path``."""
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(RECORD_NAME, json.dumps({"source": record}))


def recorded_source(model) -> dict | None:
    """What the file ``model`` was loaded from recorded of its classifier (``{"input_size": (H, W)}``), or None."""
    record = model_facts(model).record
    if record is None and traced_from(model) is not None:
        record = model_facts(traced_from(model)).record
    return record


def _read_record(path: str) -> dict | None:
    """The record in a ``.keras`` file, or None (none written, or one this version cannot read: ignored)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if RECORD_NAME not in archive.namelist():
                return None
            source = json.loads(archive.read(RECORD_NAME))["source"]
        height, width = source["input_size"]
        return {"input_size": (int(height), int(width))}
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


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
                f"'{path}' is not a readable HDF5 file ({first_line(str(error))}); it may be truncated. "
                "Save the model again."
            ) from error


def custom_objects_from_file(path) -> dict:
    """The custom objects a Python file defines, for `load_model`'s ``custom_objects``.

    The file is imported as a module named after it. Its ``CUSTOM_OBJECTS``
    dict is used when it has one; otherwise every public class and function
    defined in the file itself (not imported into it), by name.

    Raises:
        ModelFileError: for a missing file, one that is not ``.py``, or one that
            fails to import; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Custom objects file '{path}' does not exist. Check the path.")
    if not path.endswith(".py"):
        raise ModelFileError(f"Custom objects file '{path}' must be a Python file ending in `.py`.")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"Custom objects file '{path}' cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # classes pickled or serialized by module name find it
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise ModelFileError(
            f"Custom objects file '{path}' failed to import ({type(error).__name__}: {first_line(str(error))})."
        ) from error
    declared = getattr(module, "CUSTOM_OBJECTS", None)
    if declared is not None:
        if not isinstance(declared, dict):
            raise ModelFileError(f"`CUSTOM_OBJECTS` in '{path}' must be a dict of names to classes or functions.")
        return dict(declared)
    return {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    }


def as_model(model, custom_objects=None, error_class: type[Exception] = ModelFileError) -> keras.Model:
    """A `keras.Model` given as itself or as a path to a model file (loaded with `load_model`).

    A subclassed model (or one that calls subclassed models) comes back as its
    functional twin (`graph.traced_model`): same layers, same weights.

    Raises:
        ModelFileError: for a path that cannot be loaded.
        error_class: for anything that is neither a model nor a path.
        ConversionError: for a subclassed model whose ``call`` does not trace.
    """
    if isinstance(model, (str, os.PathLike)):
        return traced_model(load_model(model, custom_objects=custom_objects))
    if not isinstance(model, keras.Model):
        raise error_class(
            f"Expected a `keras.Model` or a path to a `.keras`/`.h5` file. Received: {type(model).__name__}"
        )
    return traced_model(model)
