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
# DICOM instances: a slide is a folder of them (often named by UID, without this suffix), read as one input.
DICOM_SUFFIXES = (".dcm",)


@dataclass(frozen=True)
class Source:
    """One input image.

    Attributes:
        path: the file, or the folder of a DICOM slide's instances, absolute.
        name: its output name, without suffix: the file's stem, or for a file
            found in a folder its path below that folder (``sub/slide``), so
            outputs mirror the folder's tree; a DICOM folder's name is its path
            below the folder searched (its own name when it is that folder).
    """

    path: str
    name: str


def find_sources(inputs) -> list[Source]:
    """The images named by files, folders and glob patterns, in a stable order.

    Folders are searched recursively for files ending in one of
    `IMAGE_SUFFIXES` (case-insensitive); files named directly are taken
    whatever their suffix. A file reached twice is listed once. A folder
    that holds DICOM files (`is_dicom`) is one input, a DICOM whole-slide
    image, besides the images it holds; a DICOM file named directly reads
    its slide too.

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
                f"Folder '{given}' holds no images (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM files, "
                "recursively)."
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
        if any(is_dicom(os.path.join(directory, f)) for f in files if not f.startswith(".")):
            relative = os.path.relpath(directory, root)
            name = os.path.basename(root) if relative == os.curdir else relative.replace(os.sep, "/")
            sources.append(Source(directory, name))
        for file in sorted(files):
            if file.startswith(".") or not file.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(directory, file)
            relative = os.path.relpath(path, root)
            sources.append(Source(path, _stem(relative).replace(os.sep, "/")))
    return sources


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def is_dicom(path: str) -> bool:
    """A DICOM file: named ``*.dcm``, or (images' suffixes aside) holding DICOM's ``DICM`` marker at byte 128."""
    name = os.path.basename(path).lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.endswith(IMAGE_SUFFIXES):
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str) -> list[str]:
    """The DICOM files directly in ``folder``, sorted by name."""
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith(".")]
    return [p for p in paths if os.path.isfile(p) and is_dicom(p)]
