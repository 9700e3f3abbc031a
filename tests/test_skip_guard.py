"""The CI guard (tests/skip_guard.py): a skip for a package that cannot be imported fails a run that forbids it."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SKIPPING = """
import pytest

pytest.importorskip("kfs_package_not_installed")


def test_in_a_module_that_needs_it():
    pass
"""

SKIPPING_ONE_TEST = """
import pytest


def test_needs_it():
    pytest.importorskip("kfs_other_package_not_installed.sub")


def test_that_passes():
    pass
"""


def _pytest(folder, forbid: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": HERE, "KFS_FORBID_IMPORT_SKIPS": "1" if forbid else ""}
    command = [sys.executable, "-m", "pytest", "-p", "skip_guard", "-p", "no:cacheprovider", "--noconftest", "-q"]
    command += ["-n", "0", "--rootdir", str(folder), "-c", os.devnull, str(folder)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(folder), timeout=120)


def test_a_skip_for_a_package_that_cannot_be_imported_fails_a_run_that_forbids_it(tmp_path):
    (tmp_path / "test_module_skip.py").write_text(SKIPPING)
    (tmp_path / "test_one_skip.py").write_text(SKIPPING_ONE_TEST)
    allowed = _pytest(tmp_path, forbid=False)
    assert allowed.returncode == 0 and "1 passed, 2 skipped" in allowed.stdout, allowed.stdout
    forbidden = _pytest(tmp_path, forbid=True)
    assert forbidden.returncode == 1, forbidden.stdout
    out = forbidden.stdout
    assert "KFS_FORBID_IMPORT_SKIPS: 2 skipped for a package that could not be imported" in out, out
    assert "test_module_skip.py: could not import 'kfs_package_not_installed'" in out
    assert "test_one_skip.py::test_needs_it: could not import 'kfs_other_package_not_installed.sub'" in out
    assert "pip install -e '.[test]'" in out
