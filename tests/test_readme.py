"""Every shell block of the README runs as written: at least, bash parses each one."""

import os
import re
import subprocess

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


@pytest.mark.parametrize("block", _shell_blocks(), ids=lambda block: block.splitlines()[0][:40])
def test_shell_block_parses(block):
    result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"bash -n rejects this README block:\n{block}\n{result.stderr}"
