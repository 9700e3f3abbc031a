"""The fenced examples of the README and of docs/*.md, run as a reader would run them (issue 25).

A page's fenced blocks run in document order, in one working folder of their own:

- ``python`` blocks in this process, in one namespace per page (a later block continues the session of the
  blocks before it), with tracebacks pointing at the page's own lines;
- ``bash`` blocks with ``bash -euo pipefail``; ``keras-fcn-surgery`` on their PATH runs the command line in
  this process, where TensorFlow is already warm (a fresh process costs 5-10 s of imports per command on 2
  cores), on the block's own stdout and stderr, with its own exit code. ``python`` is this interpreter.
- ``text`` (output samples, synopses) and the other languages in ``NOT_RUN`` are not run; a fence without
  a language, or in a language this module does not know, fails the page's test: a block is either run or
  declared an output. A ``text`` block right after an ``<!-- output -->`` comment is what the run block
  before it prints, exactly (trailing spaces and blank edge lines aside): it is compared, so a printed
  sample that is deterministic cannot drift from what the code prints.

The working folder holds links to the checkout's top-level entries (``examples/``, ``pyproject.toml``...),
so that commands written for a checkout run as written, and the files a page's examples take from the
reader (``model.keras``, ``photo.jpg``, ...). A page names those in an HTML comment, invisible on GitHub and
on the site, e.g. ``<!-- examples: {files: [model.keras, photo.jpg], heavy: true} -->``; ``FILES`` makes
small stand-ins of them (a classifier of 32 x 32 pixels, not VGG16), so that the examples stay fast.
``heavy: true`` moves a page's examples under ``pytest -m heavy``; ``serve: models/fcn`` answers TF
Serving's REST (localhost:8501) and gRPC (localhost:8500) requests from the newest version in that folder.

The set-up commands' ``pip install`` and ``pytest`` are not run here (they install the package and run this
suite): ``pip`` checks that what it is asked to install is installed (the package's extras included), and
``pytest`` that it runs in the checkout; `tests/test_readme.py` checks that `.ci/run` runs the README's
test command itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell"}
NOT_RUN = {"text", "json", "yaml", "toml", "ini", "csv"}

_FENCE = re.compile(
    r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ ]*$",
    re.MULTILINE | re.DOTALL,
)
_SETTINGS = re.compile(r"<!--\s*examples:\s*(?P<yaml>.*?)\s*-->", re.DOTALL)


_OUTPUT_MARK = re.compile(r"<!--\s*output\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # the line of the block's first code line in its file (1-based)
    printed: bool = False  # a text block marked `<!-- output -->`: what the run block before it prints


@dataclasses.dataclass(frozen=True)
class Page:
    path: str
    blocks: tuple[Block, ...]
    files: tuple[str, ...] = ()
    heavy: bool = False
    serve: str | None = None

    @property
    def name(self) -> str:
        return os.path.relpath(self.path, REPO)

    def runnable(self) -> list[Block]:
        return [block for block in self.blocks if block.language in PYTHON | SHELL]


def read_page(path: str) -> Page:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    blocks = []
    for match in _FENCE.finditer(text):
        language = match.group("info").strip().split(" ")[0].strip("{}.").lower()
        line = text.count("\n", 0, match.start("body")) + 1
        printed = language in NOT_RUN and bool(_OUTPUT_MARK.search(text[: match.start()].rstrip()))
        blocks.append(Block(language, textwrap.dedent(match.group("body")), line, printed))
    settings = _SETTINGS.search(text)
    options = yaml.safe_load(settings.group("yaml")) if settings else {}
    unknown = set(options) - {"files", "heavy", "serve"}
    if unknown:
        raise ValueError(f"{path}: unknown examples settings {sorted(unknown)}")
    return Page(path, tuple(blocks), tuple(options.get("files", ())), bool(options.get("heavy")), options.get("serve"))


def doc_pages() -> list[Page]:
    return [read_page(os.path.join(DOCS, name)) for name in sorted(os.listdir(DOCS)) if name.endswith(".md")]


def unlabelled_blocks(page: Page) -> list[str]:
    """Blocks that are neither run nor declared output: a missing or unknown fence language."""
    return [
        f"{page.name}:{block.line - 1}: ```{block.language}"
        for block in page.blocks
        if block.language not in PYTHON | SHELL | NOT_RUN
    ]


# --- the reader's files: small stand-ins -----------------------------------------------------------------


def _classifier(path):
    """A small valid-padding classifier of 32 x 32 RGB patches, 5 classes (stride 4, a 32-pixel window)."""
    import keras
    from keras import layers

    keras.Sequential(
        [
            keras.Input((32, 32, 3), name="image"),
            layers.Conv2D(8, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(12, 3, strides=2, activation="relu", name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(16, activation="relu", name="fc1"),
            layers.Dropout(0.5, name="drop1"),
            layers.Dense(5, activation="softmax", name="fc2"),
        ],
        name="patches",
    ).save(path)


def _photo(path, size=(120, 160), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(235, 4, (*size, 3)), 0, 255)
    pixels[30:90, 40:120] = np.clip(rng.normal(0, 25, (60, 80, 3)) + [200, 110, 160], 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _slides(path):
    """A folder of two inputs: a pyramidal TIFF (3 levels, 0.5 micrometres per pixel) and a PNG."""
    import tifffile

    os.makedirs(path)
    _photo(os.path.join(path, "photo.png"), seed=1)
    rng = np.random.default_rng(2)
    image = np.clip(rng.normal(235, 4, (384, 512, 3)), 0, 255)
    image[64:256, 96:320] = np.clip(rng.normal(0, 25, (192, 224, 3)) + [200, 110, 160], 0, 255)
    image = image.astype(np.uint8)
    with tifffile.TiffWriter(os.path.join(path, "slide.tif"), bigtiff=True) as tif:
        options = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
        tif.write(image, subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
        for factor in (2, 4):
            tif.write(image[::factor, ::factor], subfiletype=1, **options)


def _names(path):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(["background", "stroma", "tumour", "necrosis", "fat"]) + "\n")


FILES = {"model.keras": _classifier, "photo.jpg": _photo, "slides": _slides, "names.txt": _names}


def _prepare(page: Page, folder: str) -> None:
    for entry in os.listdir(REPO):
        if not entry.startswith(".") and entry not in {"site", "out"}:
            os.symlink(os.path.join(REPO, entry), os.path.join(folder, entry))
    for name in page.files:
        if name not in FILES:
            raise ValueError(f"{page.name} asks for {name!r}; tests/markdown_examples.py makes {sorted(FILES)}")
        FILES[name](os.path.join(folder, name))


# --- shell blocks -------------------------------------------------------------------------------------------

_CLI_SHIM = """\
import json, os, socket, sys
connection = socket.socket(socket.AF_UNIX)
connection.connect(os.environ["KFS_EXAMPLES_CLI"])
request = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}).encode()
socket.send_fds(connection, [request], [1, 2])
answer = connection.recv(16)
sys.exit(int(answer) if answer else 98)
"""

_PIP_SHIM = """\
import os, re, sys
from importlib import metadata
try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib
from packaging.requirements import Requirement

args = sys.argv[1:]
if not args or args[0] != "install":
    sys.exit(f"pip shim: the examples only install packages, not `pip {' '.join(args)}`")
wanted = []
for arg in args[1:]:
    if arg.startswith("-"):
        continue
    local = re.fullmatch(r"\\.(?:\\[(.*)\\])?", arg)
    if local:
        with open("pyproject.toml", "rb") as handle:
            project = tomllib.load(handle)["project"]
        wanted += project["dependencies"]
        for extra in filter(None, (local.group(1) or "").split(",")):
            if extra not in project["optional-dependencies"]:
                sys.exit(f"pip shim: pyproject.toml has no extra {extra!r}")
            wanted += project["optional-dependencies"][extra]
        metadata.version(project["name"])
    else:
        wanted.append(arg)
for spec in map(Requirement, wanted):
    if spec.marker is not None and not spec.marker.evaluate():
        continue
    try:
        version = metadata.version(spec.name)
    except metadata.PackageNotFoundError:
        sys.exit(f"pip shim: {spec} is not installed")
    if not spec.specifier.contains(version, prereleases=True):
        sys.exit(f"pip shim: {spec} is wanted, {spec.name} {version} is installed")
"""

_PYTEST_SHIM = """\
import os, sys
if not (os.path.exists("setup.cfg") and os.path.isdir("tests")):
    sys.exit("pytest shim: not in the checkout")
"""


class _InProcessCli:
    """Answers the ``keras-fcn-surgery`` commands of a bash block from this process."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "cli.sock")
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.bind(self.path)
        self.socket.listen()

    def serve_until_done(self, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"the block ran for over {timeout} s")
            ready, _, _ = select.select([self.socket], [], [], 0.05)
            if ready:
                connection, _ = self.socket.accept()
                with connection:
                    self._answer(connection)

    def _answer(self, connection) -> None:
        from keras_fcn_surgery.cli import main

        message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 2)
        request = json.loads(message)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        streams, cwd = (sys.stdout, sys.stderr), os.getcwd()
        code = 97
        try:
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
            os.chdir(request["cwd"])
            with warnings.catch_warnings():
                try:
                    code = main(request["argv"])
                except SystemExit as stop:  # argparse's usage errors
                    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                except BaseException:  # noqa: BLE001 - the reader would see this traceback: fail the block
                    traceback.print_exc()
                    code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.chdir(cwd)
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for fd in fds:
                os.close(fd)
        connection.sendall(str(code).encode())


def _shims(folder: str) -> str:
    bin_dir = os.path.join(folder, "bin")
    os.makedirs(bin_dir)
    for name, code in (("keras-fcn-surgery", _CLI_SHIM), ("pip", _PIP_SHIM), ("pytest", _PYTEST_SHIM)):
        path = os.path.join(bin_dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"#!{sys.executable}\n{code}")
        os.chmod(path, 0o755)
    os.symlink(sys.executable, os.path.join(bin_dir, "python"))
    return bin_dir


def _run_shell(page: Page, block: Block, folder: str, cli: _InProcessCli, bin_dir: str, timeout: float) -> str:
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "KFS_EXAMPLES_CLI": cli.path,
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=folder, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            cli.serve_until_done(process, timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        output = out.read().decode(errors="replace")
    print(output)
    warned = [line for line in output.splitlines() if line.startswith("warning: ")]
    if process.returncode != 0 or warned:
        raise AssertionError(
            f"{page.name}:{block.line}: this bash block exited with {process.returncode}"
            f"{' and warned' if warned else ''}:\n"
            f"{block.code}\n{output[-4000:]}"
        )
    return output


class _Tee(io.StringIO):
    """What a python block prints: kept, and shown as it is printed."""

    def __init__(self, shown):
        super().__init__()
        self.shown = shown

    def write(self, text: str) -> int:
        self.shown.write(text)
        return super().write(text)


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def check_printed(page: Page, block: Block, printed: str | None) -> None:
    """A text block marked `<!-- output -->` equals what the run block before it printed."""
    if printed is None:
        raise AssertionError(f"{page.name}:{block.line}: an `<!-- output -->` block follows no run block")
    if _lines(printed) != _lines(block.code):
        import difflib

        diff = "\n".join(difflib.unified_diff(_lines(block.code), _lines(printed), "the page", "printed", lineterm=""))
        raise AssertionError(f"{page.name}:{block.line}: the output shown is not what the block above prints:\n{diff}")


# --- pages --------------------------------------------------------------------------------------------------


def run_page(page: Page, timeout: float = 600) -> None:
    """Run a page's examples in a fresh folder; an AssertionError or the example's own error names the line."""
    folder = tempfile.mkdtemp(prefix="kfs-examples-")  # short: a Unix socket's path has ~100 characters
    cwd = os.getcwd()
    try:
        _prepare(page, folder)
        bin_dir = _shims(folder)
        cli = _InProcessCli(folder)
        namespace = {"__name__": "__main__"}
        printed: str | None = None  # what the last run block printed
        with _served(page, folder):
            for block in page.blocks:
                if block.printed:
                    check_printed(page, block, printed)
                    continue
                if block.language not in PYTHON | SHELL:
                    continue
                os.chdir(folder)
                start = time.perf_counter()
                if block.language in PYTHON:
                    tee = _Tee(sys.stdout)
                    with warnings.catch_warnings(), contextlib.redirect_stdout(tee):
                        # Our warnings say that something is wrong; an example that shows one catches it.
                        for category in _our_warnings():
                            warnings.simplefilter("error", category)
                        # Blank lines before the code: a traceback's line numbers are the page's own.
                        exec(compile("\n" * (block.line - 1) + block.code, page.path, "exec"), namespace)  # noqa: S102
                    printed = tee.getvalue()
                else:
                    printed = _run_shell(page, block, folder, cli, bin_dir, timeout)
                print(f"{page.name}:{block.line}: {block.language} block, {time.perf_counter() - start:.1f} s")
    finally:
        os.chdir(cwd)
        shutil.rmtree(folder, ignore_errors=True)


def _our_warnings() -> list[type]:
    from keras_fcn_surgery import errors

    return [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Warning)]


@contextlib.contextmanager
def _served(page: Page, folder: str):
    if page.serve is None:
        yield
        return
    from serving_standin import serve_model_base_path

    with serve_model_base_path(os.path.join(folder, page.serve), rest_port=8501, grpc_port=8500):
        yield
