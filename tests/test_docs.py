"""The documentation site (docs/, mkdocs.yml): every example runs, every page is reachable, and the reference
pages cover the public API and the command line (issue 25). `.ci/run` builds the site with `mkdocs build --strict`."""

import os
import re

import pytest
import yaml
from markdown_examples import DOCS, REPO, doc_pages, read_page, run_page, unlabelled_blocks

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import build_parser

PAGES = doc_pages()


@pytest.mark.parametrize(
    "page",
    [pytest.param(page, id=page.name, marks=[pytest.mark.heavy] if page.heavy else []) for page in PAGES
     if page.runnable()],
)
def test_the_page_examples_run_as_written(page):
    run_page(page)


def test_a_marked_output_block_must_be_what_the_block_before_it_prints(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nprint('a  ')\nprint('b')\n```\n\n<!-- output -->\n```text\na\nb\n```\n\n"
        "```bash\necho c\n```\n\n<!-- output -->\n```text\nc\n```\n\n```text\nnot compared\n```\n"
    )
    run_page(read_page(str(page)))
    page.write_text(page.read_text().replace("a\nb\n```", "a\nB\n```"))
    with pytest.raises(AssertionError, match=r"page.md:8: the output shown is not what the block above prints"):
        run_page(read_page(str(page)))


def test_every_block_is_run_or_declared_output():
    assert [line for page in PAGES for line in unlabelled_blocks(page)] == []


def _nav_files(entries) -> list[str]:
    files = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def test_every_page_is_in_the_navigation_once():
    with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as handle:
        nav = _nav_files(yaml.safe_load(handle)["nav"])
    assert sorted(nav) == sorted(name for name in os.listdir(DOCS) if name.endswith(".md"))


def test_the_api_page_documents_exactly_the_public_api():
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as handle:
        names = re.findall(r"^::: keras_fcn_surgery\.(\w+)$", handle.read(), re.MULTILINE)
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(kfs.__all__)


def _commands(parser, prefix="keras-fcn-surgery"):
    """(command line, its parser) for every command, sub-commands included (``show filters``)."""
    found = []
    for action in parser._actions:  # argparse keeps subcommands here; no public accessor exists
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                found.append((f"{prefix} {name}", sub))
                found += _commands(sub, f"{prefix} {name}")
    return found


def test_the_cli_page_names_every_command_and_option():
    with open(os.path.join(DOCS, "cli.md"), encoding="utf-8") as handle:
        page = handle.read()
    missing = []
    for command, parser in _commands(build_parser()):
        if f"## `{command}`" not in page and not any(c.startswith(command + " ") for c, _ in _commands(parser)):
            missing.append(f"a section '## `{command}`'")
        section = page.split(f"## `{command}`", 1)[-1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in section:
                    missing.append(f"{command} {option}")
    assert missing == []
