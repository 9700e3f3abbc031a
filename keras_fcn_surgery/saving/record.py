"""What a converted model's file records of the classifier it was converted from, so that an FCN saved and
loaded again certifies its cells on the crops the in-memory one does.

`save_model` writes the record into the ``.keras`` file (a JSON entry beside
Keras's own, which Keras ignores: the file still loads with
`keras.models.load_model`); `loading.load_model` reads it back; and
`source_input_size` answers for an FCN converted in this process and for one
loaded from such a file alike. A file written by ``model.save`` carries no
record (then pass the classifier's input size, CLI: ``--input-size HxW``).
"""

from __future__ import annotations

from keras_fcn_surgery.graph import source_of
from keras_fcn_surgery.saving.atomic import atomic_output, pause_point
from keras_fcn_surgery.saving.loading import recorded_source, write_record


def source_input_size(model) -> tuple[int, int] | None:
    """The ``(H, W)`` of the classifier ``model`` was converted from: known for an FCN converted in this
    process, and for one loaded from a file `save_model` wrote; else None."""
    size = source_of(model)[1]
    if size is not None:
        return size
    record = recorded_source(model)
    return None if record is None else record["input_size"]


def save_model(model, path, *, overwrite: bool = False) -> None:
    """Save ``model`` to a ``.keras`` file atomically, with what the file's certificates need of its classifier.

    Like ``model.save(path)``, written under a hidden temporary name and renamed
    into place when complete; an FCN's file also records its classifier's
    input size (`source_input_size`), so that `certify_map`, ``predict
    --certify`` and ``heatmap`` on the loaded FCN check each cell against the
    crop it stands for, as on the in-memory FCN.

    Args:
        model: any Keras model (an FCN from `convert`, a classifier...).
        path: the ``.keras`` file to write; its folder must exist.
        overwrite: replace an existing file.

    Raises:
        ModelFileError: for an existing file without ``overwrite``, or a path that cannot be written.
    """
    size = source_input_size(model)
    with atomic_output(path, suffix=".keras", overwrite=overwrite) as temporary:
        model.save(temporary)
        if size is not None:
            write_record(temporary, {"input_size": list(size)})
        pause_point("publish")
