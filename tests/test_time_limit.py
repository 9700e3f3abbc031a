"""The per-test time limit (pytest-timeout, set in setup.cfg): a test that never ends fails instead of hanging."""

import subprocess
import sys

ENDLESS = '''
def test_endless():
    while True:
        pass


def test_after_it_still_runs():
    assert True
'''


def test_the_default_configuration_limits_every_test(pytestconfig):
    assert 60 <= float(pytestconfig.getini("timeout")) <= 1800


def test_an_endless_loop_fails_its_test_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_endless.py").write_text(ENDLESS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "--timeout=2"]
        + ["test_endless.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Timeout" in result.stdout and "1 failed, 1 passed" in result.stdout, result.stdout
