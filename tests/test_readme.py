"""Every shell block of the README runs as written: at least, bash parses each one."""

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _shell_blocks() -> list[str]:
    with open(README, encoding="utf-8") as handle:
        return _SHELL_BLOCK.findall(handle.read())


def test_the_readme_has_the_two_setup_commands():
    blocks = _shell_blocks()
    assert any("pip install" in block and "keras-fcn-surgery demo" in block for block in blocks)
    assert any("pip install" in block and "pytest" in block for block in blocks)


def test_the_python_tour_runs_as_written(tmp_path):
    # Issue 28: the tour used an undefined `images_320`. The other Python blocks continue a session
    # (`classifier`, `image`, files of the reader's own) and are not run alone.
    with open(README, encoding="utf-8") as handle:
        tour = re.search(r"^## Python API\n+```python\n(.*?)^```", handle.read(), re.MULTILINE | re.DOTALL).group(1)
    check = "\nassert scores.shape == (2, 4, 4, 1000) and tuple(grid.output_size((320, 320))) == (4, 4)\n"
    result = subprocess.run([sys.executable, "-c", tour + check], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("block", _shell_blocks(), ids=lambda block: block.splitlines()[0][:40])
def test_shell_block_parses(block):
    result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"bash -n rejects this README block:\n{block}\n{result.stderr}"
