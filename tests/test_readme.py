"""The README: its two set-up commands, its length, and every example in it runs as written (issue 25).

The examples run through tests/markdown_examples.py, as the documentation site's do (tests/test_docs.py).
"""

import os
import re
import shlex

from markdown_examples import README, REPO, SHELL, read_page, run_page, unlabelled_blocks

PAGE = read_page(README)
DEMO_COMMAND = "pip install . && keras-fcn-surgery demo"


def _setup_commands() -> list[str]:
    return [block.code.strip() for block in PAGE.blocks if block.language in SHELL and "pip install" in block.code]


def test_the_readme_has_exactly_the_two_setup_commands():
    demo, tests = _setup_commands()
    assert demo == DEMO_COMMAND
    assert tests.startswith('pip install -e ".[test]" && ') and tests.endswith(" && pytest"), tests


def _normalised(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["python", "-m"]:
        words = words[2:]
    return [word for word in words if word != "-q"]


def test_ci_runs_the_readme_test_command():
    _, tests = _setup_commands()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as handle:
        ci = [_normalised(line) for line in handle.read().splitlines() if line.strip() and not line.startswith("#")]
    for part in tests.split("&&"):
        assert _normalised(part) in ci, f".ci/run does not run `{part.strip()}` from the README's test command"


def test_the_readme_is_short_and_links_to_existing_pages():
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    assert text.count("\n") <= 250
    links = re.findall(r"\]\((?!https?://|#)([^)#]+)", text)
    assert links and [link for link in links if not os.path.exists(os.path.join(REPO, link))] == []


def test_every_block_is_run_or_declared_output():
    assert unlabelled_blocks(PAGE) == []


def test_the_readme_examples_run_as_written():
    run_page(PAGE)
