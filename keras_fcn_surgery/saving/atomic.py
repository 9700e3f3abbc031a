"""Writing files without ever leaving a partial one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from keras_fcn_surgery.errors import ModelFileError


def check_output_path(path, *, suffix: str, overwrite: bool = False) -> str:
    """Refuse an output path before any work is done: wrong suffix, missing folder, existing file.

    Returns:
        The absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(suffix):
        raise ModelFileError(f"Output '{path}' must end in `{suffix}`.")
    if os.path.isdir(path):
        raise ModelFileError(f"Output '{path}' is a folder; give a file name ending in `{suffix}`.")
    if os.path.exists(path) and not overwrite:
        raise ModelFileError(f"Output '{path}' exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ModelFileError(f"Folder '{folder}' for output '{path}' does not exist.")
    return path


@contextlib.contextmanager
def atomic_output(path, *, suffix: str, overwrite: bool = False):
    """Yield a temporary path to write; on success it is renamed to ``path``.

    The temporary file lives in a private folder beside ``path`` (same file
    system, so the rename is atomic; the file gets the usual permissions). If
    the body raises, nothing is left behind and an existing ``path`` is
    untouched. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = check_output_path(path, suffix=suffix, overwrite=overwrite)
    folder = os.path.dirname(path)
    try:
        work = tempfile.mkdtemp(prefix=".partial-", dir=folder)
    except OSError as error:
        raise ModelFileError(f"Cannot write in folder '{folder}': {error.strerror or error}.") from error
    try:
        temporary = os.path.join(work, os.path.basename(path))
        yield temporary
        if os.path.exists(path) and not overwrite:  # written by someone else meanwhile
            raise ModelFileError(f"Output '{path}' appeared while writing; pass overwrite=True to replace it.")
        os.replace(temporary, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_model(model, path, *, overwrite: bool = False) -> None:
    """Save ``model`` to a ``.keras`` file atomically (see `atomic_output`)."""
    with atomic_output(path, suffix=".keras", overwrite=overwrite) as temporary:
        model.save(temporary)
