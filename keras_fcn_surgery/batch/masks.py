"""Tissue (foreground) masks and which score-map cells they keep.

A mask is a boolean image covering the whole level-0 extent at any
resolution: computed from a low-resolution level (`tissue_mask`) or read from
a file (`read_mask`). `cell_mask` maps it onto the score map's grid.
"""

from __future__ import annotations

import math

import numpy as np

from keras_fcn_surgery.batch.cells import cell_edges
from keras_fcn_surgery.batch.readers import SLIDES_EXTRA, Reader, adapt_channels
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.grid.geometry import MapGrid
from keras_fcn_surgery.grid.tiling import box_counts
from keras_fcn_surgery.saving.images import read_image

# Longest side of the picture a tissue mask is computed on.
THUMBNAIL_SIDE = 2048
# Rows read at a time while shrinking a level too large for a thumbnail.
_BAND_ROWS = 256


def thumbnail(reader: Reader, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """A small RGB picture of the whole image, from its smallest pyramid level.

    A level larger than ``max_side`` is shrunk by block averaging, read in
    bands of rows so that memory stays bounded.
    """
    level = len(reader.levels) - 1
    height, width = reader.levels[level].size
    factor = max(1, math.ceil(max(height, width) / max_side))
    fy, fx = min(factor, height), min(factor, width)
    rows_out, cols_out = height // fy, width // fx
    picture = np.empty((rows_out, cols_out, 3), dtype=np.float32)
    band = max(1, _BAND_ROWS // fy)  # output rows per read
    for first in range(0, rows_out, band):
        count = min(band, rows_out - first)
        pixels = reader.read_region(level, first * fy, 0, count * fy, cols_out * fx)
        pixels = adapt_channels(pixels, 3).astype(np.float32)
        picture[first : first + count] = pixels.reshape(count, fy, cols_out, fx, 3).mean(axis=(1, 3))
    return picture


def tissue_mask(picture: np.ndarray, *, min_object_fraction: float = 5e-4) -> np.ndarray:
    """Foreground of a picture of a slide or scene: Otsu's threshold, then small specks and holes removed.

    Colour pictures are thresholded on saturation (stained tissue is coloured,
    glass is grey or white); grey ones (or colour ones whose saturation does
    not vary) on darkness (objects darker than the bright background).

    Args:
        picture: ``(h, w, 3)`` or ``(h, w)`` pixels, any scale.
        min_object_fraction: objects and holes smaller than this fraction of
            the picture are removed.

    Returns:
        A boolean ``(h, w)`` mask, True on foreground.
    """
    filters = _skimage("filters")
    morphology = _skimage("morphology")
    color = _skimage("color")
    picture = np.asarray(picture, dtype=np.float32)
    if picture.ndim == 3 and picture.shape[-1] == 1:
        picture = picture[..., 0]
    scale = max(float(picture.max()), 1e-12)
    mask = None
    if picture.ndim == 3:
        saturation = color.rgb2hsv(np.clip(picture / scale, 0, 1))[..., 1]
        if float(np.ptp(saturation)) > 0.05:
            mask = saturation > filters.threshold_otsu(saturation)
    if mask is None:
        grey = picture if picture.ndim == 2 else picture.mean(axis=-1)
        if float(np.ptp(grey)) <= 0.02 * scale:  # a uniform picture: nothing stands out
            return np.zeros(grey.shape, dtype=bool)
        mask = grey < filters.threshold_otsu(grey)
    smallest = max(1, int(min_object_fraction * mask.size))
    mask = morphology.remove_small_objects(mask, max_size=smallest)
    return morphology.remove_small_holes(mask, max_size=smallest)


def read_mask(path) -> np.ndarray:
    """A binary mask image (any resolution; non-zero is foreground) as a boolean array.

    Raises:
        ModelFileError: for a file Pillow cannot read, naming it.
    """

    return read_image(path, 1)[..., 0] > 0


def cell_mask(mask: np.ndarray, image_size, grid: MapGrid, map_size) -> np.ndarray:
    """The score-map cells a mask keeps.

    Each cell owns the stride-sized box at the centre of its window (these
    boxes tile the image); a cell is kept when any mask pixel inside its box
    is foreground. The mask covers the image's extent at its own resolution.

    Args:
        mask: boolean ``(h, w)``.
        image_size: ``(H, W)`` of the image the map is computed on.
        grid: the network's geometry at ``image_size`` (``geometry(fcn).at(image_size)``), or a
            `WindowGrid.per_pixel()` for a per-pixel map.
        map_size: ``(H', W')``.

    Returns:
        Boolean ``(H', W')``.
    """
    mask = np.asarray(mask, dtype=bool)
    ranges = []
    for axis, (pixels, cells, mask_length) in enumerate(zip(image_size, map_size, mask.shape)):
        low_edge, high_edge = cell_edges(
            np.arange(cells), grid.stride[axis], grid.receptive_field[axis], grid.offset[axis]
        )
        scale = mask_length / pixels
        low = np.clip(np.floor(low_edge * scale), 0, mask_length - 1).astype(np.int64)
        high = np.clip(np.ceil(high_edge * scale), low + 1, mask_length).astype(np.int64)
        ranges.append((low, high))
    (top, bottom), (left, right) = ranges
    return box_counts(mask, top, bottom, left, right) > 0


def _skimage(module: str):
    import importlib

    try:
        return importlib.import_module(f"skimage.{module}")
    except ImportError as error:
        raise InputError(f"Tissue masks (`mask='auto'`) need scikit-image: {SLIDES_EXTRA}.") from error
