"""Region readers for images and pyramidal slides behind one interface.

A reader lists its pyramid `levels` (level 0 is full resolution), the
resolution of level 0 in microns per pixel when the file records it, and reads
rectangular regions of any level. `LevelArray` exposes one level as a lazy
array (``shape`` and slicing), so `predict_map` reads only the tiles it needs
and memory stays bounded whatever the slide's size.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.batch.sources import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, dicom_files, is_dicom
from keras_fcn_surgery.errors import InputError, ModelFileError, first_line
from keras_fcn_surgery.layout import Layout

SLIDES_EXTRA = "pip install 'keras-fcn-surgery[slides]'"


@dataclass(frozen=True)
class Level:
    """One pyramid level: ``size`` ``(H, W)`` in pixels, ``downsample`` ``(dy, dx)`` from level 0."""

    size: tuple[int, int]
    downsample: tuple[float, float]


class Reader:
    """The interface every reader implements."""

    path: str
    levels: tuple[Level, ...]
    channels: int
    mpp: float | None = None

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels ``(height, width, channels)`` of ``level`` starting at ``(top, left)`` in that level's pixels."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_reader(path) -> Reader:
    """The reader for a file, chosen by its suffix.

    TIFF files (BigTIFF, tiled, pyramidal with SubIFDs or pages) are read with
    tifffile region by region; OpenSlide formats (SVS, NDPI, MRXS...) with
    openslide-python, and so are DICOM whole-slide images (a folder of a
    slide's instances, or one of them; OpenSlide 4); anything else with
    Pillow, whole.

    Raises:
        ModelFileError: for a file that cannot be opened, naming it, or a
            format whose optional dependency is missing (naming the extra).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    opener: Callable[[str], Reader] = _PillowReader
    if suffix in TIFF_SUFFIXES:
        opener = _TiffReader
    elif suffix in OPENSLIDE_SUFFIXES:
        opener = _OpenSlideReader
    elif os.path.isdir(path) or is_dicom(path):
        opener = _DicomReader
    try:
        return opener(path)
    except ModelFileError:
        raise
    except _pillow_bomb_error() as error:
        raise ModelFileError(
            f"Image '{path}' is too large for Pillow ({first_line(str(error))}). Convert it to a tiled, pyramidal "
            "TIFF (for example `vips tiffsave in.png out.tif --tile --pyramid`), which is read region by region."
        ) from error
    except Exception as error:
        raise ModelFileError(
            f"Image '{path}' could not be read ({type(error).__name__}: {first_line(str(error))})."
        ) from error


def _pillow_bomb_error() -> type[Exception]:
    from PIL import Image

    return Image.DecompressionBombError


def choose_level(reader: Reader, *, level: int | None = None, mpp: float | None = None) -> int:
    """The pyramid level to use: ``level``, or the one nearest ``mpp`` microns per pixel, or 0.

    Raises:
        ModelFileError: for a level the file lacks, or ``mpp`` on a file that
            records no resolution.
    """
    if level is not None and mpp is not None:
        raise InputError("Give a pyramid level or a resolution in microns per pixel, not both.")
    if level is not None:
        if not 0 <= level < len(reader.levels):
            raise ModelFileError(
                f"Image '{reader.path}' has {len(reader.levels)} pyramid level(s) (0 to {len(reader.levels) - 1}); "
                f"level {level} does not exist."
            )
        return level
    if mpp is not None:
        if mpp <= 0:
            raise InputError(f"Expected a positive resolution in microns per pixel. Received: mpp={mpp}")
        if reader.mpp is None:
            raise ModelFileError(
                f"Image '{reader.path}' records no resolution (microns per pixel); choose a pyramid level instead "
                "(CLI: --level N)."
            )
        errors = [abs(math.log(reader.mpp * max(lv.downsample) / mpp)) for lv in reader.levels]
        return int(np.argmin(errors))
    return 0


class LevelArray:
    """One pyramid level as a lazy image array for `predict_map`.

    ``shape`` is ``(H, W, C)`` (``(C, H, W)`` for a channels-first layout) with
    ``C`` the model's channel count; ``view[rows, cols, :]`` reads just that
    region. Grey images are repeated to three channels, colour ones reduced to
    grey (ITU-R 601 luma) for one-channel models, and an alpha channel is
    composited onto white (the glass of a slide).
    """

    def __init__(self, reader: Reader, level: int, channels: int, layout: Layout | None = None):
        layout = layout or Layout()
        self.reader, self.level, self.channels, self.layout = reader, level, channels, layout
        height, width = reader.levels[level].size
        if channels not in (1, 3) and channels != reader.channels:
            raise ModelFileError(
                f"The model takes {channels} channels; image '{reader.path}' has {reader.channels}. "
                "Only 1- and 3-channel models can read images of another channel count."
            )
        self.shape = layout.image_shape(height, width, channels)

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple) or len(index) != 3:
            raise TypeError(f"Index a LevelArray with three slices. Received: {index!r}")
        rows, cols = (index[axis] for axis in self.layout.image_spatial_axes)
        height, width = self.reader.levels[self.level].size
        top, bottom, _ = rows.indices(height)
        left, right, _ = cols.indices(width)
        region = self.reader.read_region(self.level, top, left, max(bottom - top, 0), max(right - left, 0))
        region = adapt_channels(region, self.channels)
        region = region[..., index[self.layout.image_channel_axis]]
        return self.layout.image_from_channels_last(region)


def adapt_channels(region: np.ndarray, channels: int) -> np.ndarray:
    """``(h, w, c)`` pixels as ``(h, w, channels)``: alpha composited on white, grey <-> RGB."""
    if region.ndim == 2:
        region = region[..., None]
    have = region.shape[-1]
    if have in (2, 4):  # grey + alpha, RGBA
        alpha = region[..., -1:].astype(np.float32) / _full_scale(region.dtype)
        colour = region[..., :-1].astype(np.float32)
        region = colour * alpha + _full_scale(region.dtype) * (1 - alpha)
        have -= 1
    if have == channels:
        return region
    if have == 1 and channels == 3:
        return np.repeat(region, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = region.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return luma[..., None]
    raise InputError(f"Cannot turn {have}-channel pixels into the model's {channels} channels.")


def _full_scale(dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


class _PillowReader(Reader):
    """PNG, JPEG and other Pillow formats: one level, decoded whole on opening."""

    def __init__(self, path: str):
        from PIL import Image

        self.path = path
        with Image.open(path) as opened:
            opened.load()
            picture: Image.Image = opened
            if picture.mode not in ("L", "RGB", "RGBA", "LA", "I;16", "I", "F"):
                picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
            pixels = np.asarray(picture)
        self._pixels = pixels if pixels.ndim == 3 else pixels[..., None]
        self.channels = int(self._pixels.shape[-1]) - (1 if self._pixels.shape[-1] in (2, 4) else 0)
        self.levels = (Level((int(pixels.shape[0]), int(pixels.shape[1])), (1.0, 1.0)),)

    def read_region(self, level, top, left, height, width):
        return self._pixels[top : top + height, left : left + width]


class _TiffReader(Reader):
    """TIFF and BigTIFF, tiled or striped, with pyramids as SubIFDs or pages, read region by region."""

    def __init__(self, path: str):
        tifffile = _require("tifffile", "TIFF images")
        zarr = _require("zarr", "TIFF images")
        self.path = path
        self._file = tifffile.TiffFile(path)
        try:
            series = self._file.series[0]
            axes = series.axes
            if axes not in ("YX", "YXS"):
                raise ModelFileError(
                    f"Image '{path}' holds a TIFF series with axes '{axes}'; only 2-D grey (YX) or colour (YXS) "
                    "images can be read. Save one plane as its own TIFF."
                )
            shapes = [(int(lv.shape[0]), int(lv.shape[1])) for lv in series.levels]
            base = shapes[0]
            self.levels = tuple(Level(s, (base[0] / s[0], base[1] / s[1])) for s in shapes)
            self.channels = int(series.shape[2]) if axes == "YXS" else 1
            self.channels -= 1 if self.channels in (2, 4) else 0
            self.mpp = _ome_mpp(self._file)
            if self.mpp is None:
                self.mpp = _tiff_mpp(self._file.pages[0])
            self._arrays = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(shapes))]
        except BaseException:
            self._file.close()
            raise

    def read_region(self, level, top, left, height, width):
        return np.asarray(self._arrays[level][top : top + height, left : left + width])

    def close(self):
        self._file.close()


# OME's length units (its UnitsLength) in micrometres; "µm" is written with the micro sign or the Greek mu.
_OME_MICROMETRES = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "dm": 1e5,
    "m": 1e6,
}


def _ome_mpp(tiff) -> float | None:
    """The first image's PhysicalSizeX in an OME-TIFF's OME-XML, in microns (None when absent or unusable)."""
    if not tiff.is_ome:
        return None
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(tiff.ome_metadata)
    except ElementTree.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    factor = _OME_MICROMETRES.get(pixels.attrib.get("PhysicalSizeXUnit", "µm"))
    try:
        size = float(pixels.attrib["PhysicalSizeX"])
    except ValueError:
        return None
    return size * factor if factor is not None and size > 0 else None


def _tiff_mpp(page) -> float | None:
    description = str(getattr(page, "description", "") or "")
    found = re.search(r"\bMPP\s*=\s*([0-9.]+)", description)  # Aperio SVS
    if found:
        return float(found.group(1))
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not numerator or not denominator or unit not in (2, 3):  # 2 inch, 3 centimetre; 1 means unknown
        return None
    pixels_per_unit = numerator / denominator
    return (25400.0 if unit == 2 else 10000.0) / pixels_per_unit


class _OpenSlideReader(Reader):
    """Whole-slide formats through OpenSlide (SVS, NDPI, MRXS, SCN...)."""

    def __init__(self, path: str):
        openslide = _require("openslide", "OpenSlide slides (SVS, NDPI, MRXS...)")
        self.path = path
        self._slide = openslide.OpenSlide(path)
        self.levels = tuple(
            Level((int(h), int(w)), (float(d), float(d)))
            for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        )
        self.channels = 3
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp else None

    def read_region(self, level, top, left, height, width):
        downsample = self.levels[level].downsample
        origin = (int(round(left * downsample[1])), int(round(top * downsample[0])))
        region = self._slide.read_region(origin, level, (int(width), int(height)))
        return np.asarray(region)  # RGBA; LevelArray composites the alpha onto white

    def close(self):
        self._slide.close()


class _DicomReader(_OpenSlideReader):
    """A DICOM whole-slide image through OpenSlide 4: a folder of one slide's instances, or one instance file
    (OpenSlide finds the slide's other instances beside it)."""

    def __init__(self, path: str):
        openslide = _require("openslide", "DICOM whole-slide images")
        candidates = dicom_files(path) if os.path.isdir(path) else [path]
        if not candidates:
            raise ModelFileError(f"Folder '{path}' holds no images and no DICOM files.")
        readable = [file for file in candidates if openslide.OpenSlide.detect_format(file) == "dicom"]
        if not readable:
            raise ModelFileError(
                f"'{path}' holds no DICOM whole-slide image that OpenSlide {openslide.__library_version__} reads. "
                "OpenSlide 4 reads DICOM WSI (VL Whole Slide Microscopy Image instances): "
                "pip install 'openslide-bin>=4'."
            )
        super().__init__(readable[0])
        self.path = path


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"Reading {what} needs the `{module}` package: {SLIDES_EXTRA}.") from error
