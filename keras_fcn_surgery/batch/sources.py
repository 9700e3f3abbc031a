"""Finding the inputs of a batch: files, folders (recursively) and glob patterns."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from keras_fcn_surgery.errors import ModelFileError

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES


@dataclass(frozen=True)
class Source:
    """One input image.

    Attributes:
        path: the file, absolute.
        name: its output name, without suffix: the file's stem, or for a file
            found in a folder its path below that folder (``sub/slide``), so
            outputs mirror the folder's tree.
    """

    path: str
    name: str


def find_sources(inputs) -> list[Source]:
    """The images named by files, folders and glob patterns, in a stable order.

    Folders are searched recursively for files ending in one of
    `IMAGE_SUFFIXES` (case-insensitive); files named directly are taken
    whatever their suffix. A file reached twice is listed once.

    Raises:
        ModelFileError: for an input that names nothing (no such file, a
            pattern that matches nothing, a folder without images), or two
            inputs that would write the same output name.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[str, Source] = {}
    for given in inputs:
        given = os.fspath(given)
        for source in _expand(given):
            found.setdefault(source.path, source)
    by_name: dict[str, str] = {}
    for source in found.values():
        other = by_name.setdefault(source.name, source.path)
        if other != source.path:
            raise ModelFileError(
                f"Inputs '{other}' and '{source.path}' would both write the output '{source.name}'. "
                "Rename one, or run them with different output folders."
            )
    return sorted(found.values(), key=lambda s: s.name)


def _expand(given: str) -> list[Source]:
    if os.path.isdir(given):
        sources = _scan_folder(given)
        if not sources:
            raise ModelFileError(
                f"Folder '{given}' holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)."
            )
        return sources
    if os.path.isfile(given):
        return [_file_source(given)]
    if glob.has_magic(given):
        matches = sorted(glob.glob(given, recursive=True))
        sources = []
        for match in matches:
            sources.extend(_scan_folder(match) if os.path.isdir(match) else [_file_source(match)])
        if not sources:
            raise ModelFileError(f"Pattern '{given}' matches no image file.")
        return sources
    raise ModelFileError(f"Input '{given}' does not exist. Give image files, folders or glob patterns.")


def _file_source(path: str) -> Source:
    path = os.path.abspath(path)
    return Source(path, _stem(os.path.basename(path)))


def _scan_folder(folder: str) -> list[Source]:
    root = os.path.abspath(folder)
    sources = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for file in sorted(files):
            if file.startswith(".") or not file.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(directory, file)
            relative = os.path.relpath(path, root)
            sources.append(Source(path, _stem(relative).replace(os.sep, "/")))
    return sources


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]
