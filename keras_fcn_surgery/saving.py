"""Writing files without ever leaving a partial one behind."""

from __future__ import annotations

import os
import tempfile

from keras_fcn_surgery.errors import ModelFileError


def save_model(model, path, *, overwrite: bool = False) -> None:
    """Save ``model`` to a ``.keras`` file atomically.

    The file is written under a temporary name in the same folder and renamed
    into place, so a failure leaves no partial file and an existing file is
    replaced only with ``overwrite=True``.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ModelFileError(f"Output '{path}' must end in `.keras`.")
    if os.path.exists(path) and not overwrite:
        raise ModelFileError(f"Output '{path}' exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ModelFileError(f"Folder '{folder}' for output '{path}' does not exist.")
    handle, temporary = tempfile.mkstemp(suffix=".keras", prefix=".partial-", dir=folder)
    os.close(handle)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
