"""Writing files and folders without ever leaving a partial one behind.

Every output is written under a hidden temporary name in the target's own
folder (same file system, so the final rename is atomic) and renamed into
place only when complete. The temporary names carry the writer's process id
and start time, ``.<stem>.partial-<pid>-<start>-XXXX``: an exception (also
`KeyboardInterrupt`, or the CLI's `Interrupted` for SIGTERM) removes the
temporary on its way out, and a temporary left by a process that died without
cleaning up (SIGKILL, power loss) is recognised by its dead writer and removed
by the next write into the same folder. The leading dot keeps TF Serving from
taking a temporary for a model version.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time

from keras_fcn_surgery.errors import ModelFileError

PARTIAL_MARK = ".partial-"

# Test hook: with KFS_TEST_PAUSE_AT=<step> a write stops at that step ("write", "check", "publish"), touches
# the file named by KFS_TEST_PAUSE_READY and waits there, so that a test can signal it at a known point.
PAUSE_AT_ENV = "KFS_TEST_PAUSE_AT"
PAUSE_READY_ENV = "KFS_TEST_PAUSE_READY"
PAUSE_SECONDS = 120.0

# .<stem>.partial-<pid>-<start>-<random>; <stem> may be empty (then the name starts with ".partial-").
_TEMPORARY_NAME = re.compile(r"^\.(?:.*\.)?partial-(?P<pid>[0-9]+)-(?P<start>[0-9a-z]+)-[^/]+$")


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) turned into an exception, so that ``finally`` blocks run.

    A `BaseException`, like `KeyboardInterrupt`, so that no ``except Exception``
    swallows it. Raised by the handler the CLI installs; never by the library
    on its own.

    Attributes:
        signal_number: the signal received.
    """

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


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


def process_start_time(pid: int | None = None) -> str | None:
    """A token for when process ``pid`` (default: this one) started, or None where it cannot be read.

    On Linux: the start time in clock ticks since boot (``/proc/<pid>/stat``),
    in base 36. With the pid it tells a live writer from a recycled pid.
    """
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return _base36(int(fields[19]))
    except (IndexError, ValueError):
        return None


def temporary_prefix(stem: str = "") -> str:
    """The hidden name prefix of this process's temporaries: ``.<stem>.partial-<pid>-<start>-``."""
    start = process_start_time() or "0"
    return f".{stem + '.' if stem else ''}partial-{os.getpid()}-{start}-"


def make_temporary_dir(folder, *, stem: str = "", what: str = "folder") -> str:
    """Create this process's hidden temporary folder in ``folder`` (see the module docstring).

    Raises:
        ModelFileError: when ``folder`` cannot be written.
    """
    folder = os.fspath(folder)
    try:
        return tempfile.mkdtemp(prefix=temporary_prefix(stem), dir=folder)
    except OSError as error:
        raise ModelFileError(f"Cannot write in {what} '{folder}': {error.strerror or error}.") from error


def remove_tree(path, *, patience: float = 10.0, settle: float = 0.0) -> None:
    """Remove the folder ``path`` and everything in it, or nothing when it is absent.

    Retries for up to ``patience`` seconds: after an interruption, a writer
    that runs in another thread (zarr's I/O loop finishing a chunk) can still
    add a file while the folder is being removed, and a single
    ``shutil.rmtree`` then leaves the folder behind. With ``settle`` > 0 the
    folder must also stay absent that long (such a writer may recreate it).
    """
    path = os.fspath(path)
    deadline = time.monotonic() + patience
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) and settle > 0:
            time.sleep(settle)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def is_stale_temporary(name: str) -> bool:
    """True for a temporary name whose writer is no longer running (the pid is gone or now another process)."""
    match = _TEMPORARY_NAME.match(name)
    if match is None:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return match["start"] not in (process_start_time() or "0", "0")
    if not _pid_alive(pid):
        return True
    start = process_start_time(pid)
    return start is not None and match["start"] != "0" and start != match["start"]


def remove_stale_temporaries(folder) -> list[str]:
    """Remove the temporaries in ``folder`` left by writers that died; returns the removed paths.

    Only names of the form ``.<stem>.partial-<pid>-<start>-XXXX`` are touched,
    and only when that pid no longer runs (or runs a process started at
    another time). A temporary of a live export is never removed.
    """
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if is_stale_temporary(name):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path, patience=1.0)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_output(path, *, suffix: str, overwrite: bool = False):
    """Yield a temporary path to write; on success it is renamed to ``path``.

    The temporary file lives in a private hidden folder beside ``path`` (same
    file system, so the rename is atomic; the file gets the usual
    permissions). If the body raises (also on `KeyboardInterrupt` or
    `Interrupted`), nothing is left behind and an existing ``path`` is
    untouched. An existing ``path`` is replaced only with ``overwrite=True``.
    Stale temporaries of dead writers in the same folder are removed first.
    """
    path = check_output_path(path, suffix=suffix, overwrite=overwrite)
    folder = os.path.dirname(path)
    remove_stale_temporaries(folder)
    work = make_temporary_dir(folder, stem=os.path.basename(path))
    try:
        temporary = os.path.join(work, os.path.basename(path))
        yield temporary
        if os.path.exists(path) and not overwrite:  # written by someone else meanwhile
            raise ModelFileError(f"Output '{path}' appeared while writing; pass overwrite=True to replace it.")
        os.replace(temporary, path)
    finally:
        remove_tree(work)


def refuse_foreign_files(path, own_names, *, what: str) -> None:
    """Refuse to replace the folder ``path`` when it holds anything but ``own_names`` (what ``what`` writes).

    ``overwrite`` replaces a previous output, never files the output did not
    write: a folder that holds other files is not a previous output.

    Raises:
        ModelFileError: naming the files that are not ``what``'s.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    foreign = sorted(set(os.listdir(path)) - set(own_names))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ModelFileError(
            f"Folder '{path}' is not a previous {what}: it holds {shown}, which {what} does not write. "
            "overwrite=True (CLI: --overwrite) replaces a previous output only, never other files: "
            "choose a new folder, or move those files out."
        )


@contextlib.contextmanager
def atomic_folder(path, *, overwrite: bool = False, what: str = "folder", own_names=None, output_what: str = "output"):
    """Yield a temporary folder path to fill; on success it is renamed to ``path``.

    Like `atomic_output`, for a folder output (a SavedModel version): the
    temporary is a hidden ``.<name>.partial-<pid>-<start>-XXXX`` folder beside
    ``path``; an existing ``path`` (with ``overwrite=True``) is moved aside
    and restored if the final rename fails. ``path``'s parent must exist.
    With ``own_names`` (the names the output writes), an existing ``path``
    that holds anything else is refused (`refuse_foreign_files`, naming it
    ``output_what``).
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    _refuse_existing_folder(path, overwrite)
    if own_names is not None:
        refuse_foreign_files(path, own_names, what=output_what)
    remove_stale_temporaries(folder)
    work = make_temporary_dir(folder, stem=os.path.basename(path), what=what)
    try:
        written = os.path.join(work, "new")
        yield written
        if not os.path.isdir(written):
            raise ModelFileError(f"Nothing was written for '{path}'.")
        _refuse_existing_folder(path, overwrite)  # another writer may have published meanwhile
        if own_names is not None:
            refuse_foreign_files(path, own_names, what=output_what)
        _publish_folder(written, path, work, overwrite)
    finally:
        remove_tree(work)


def pause_point(step: str) -> None:
    """Test hook: wait here when ``KFS_TEST_PAUSE_AT`` names this step (see `PAUSE_AT_ENV`)."""
    if os.environ.get(PAUSE_AT_ENV) != step:
        return
    ready = os.environ.get(PAUSE_READY_ENV)
    if ready:
        with open(ready, "w") as handle:
            handle.write(str(os.getpid()))
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _refuse_existing_folder(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise ModelFileError(
            f"Folder '{path}' already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or leave out the version to write the next one."
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ModelFileError(f"'{path}' exists and is not a folder; remove it first.")


def _publish_folder(written: str, final: str, work: str, overwrite: bool) -> None:
    """Rename ``written`` to ``final``; an existing ``final`` is moved aside first and restored on failure."""
    previous = os.path.join(work, "previous")
    moved_aside = False
    try:
        if overwrite and os.path.lexists(final):
            os.rename(final, previous)
            moved_aside = True
        os.rename(written, final)
    except BaseException as error:
        if moved_aside and not os.path.lexists(final):
            os.rename(previous, final)
        if isinstance(error, OSError):
            raise ModelFileError(
                f"Could not move the new output into '{final}': {error.strerror or error}. "
                "(Another process may have written it meanwhile.)"
            ) from error
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True
    return True


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text
