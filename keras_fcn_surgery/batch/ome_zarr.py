"""OME-Zarr score maps for viewers: a pyramid of class scores and of top-class labels, NGFF 0.4 or 0.5.

NGFF 0.4 on Zarr v2 (the default) is what QuPath (through Bio-Formats),
OMERO and napari open; NGFF 0.5 on Zarr v3 is the newest spec, which napari
(ome-zarr >= 0.12) opens and the Java viewers do not yet. Both hold the same
arrays and metadata: 0.5 under an ``ome`` attribute in ``zarr.json``, 0.4 at
the top of ``.zattrs``, chunk keys split by ``/``, Blosc-compressed.

One image per map, axes ``c, y, x`` (the classes as channels)::

    slide.ome.zarr/            multiscales (the score pyramid), omero (one channel per class)
        0, 1, ...              float32 (K, H', W') scores; level k is 2**k times coarser
        labels/classes/        multiscales + image-label: uint labels (1, H', W'), class k as k + 1,
            0, 1, ...          0 where no cell was computed (outside a mask)

Level 0 is written tile by tile while the map is computed (`create_scores`
returns a channels-last view of it for `predict_map`'s ``out``); `finish`
then builds the coarser levels and the labels, a block of cells at a time, and
writes the metadata. Memory stays bounded by a few chunks whatever the map's
size.

Coordinates follow NGFF's convention (the centre of array element 0 is at
coordinate 0): a cell's coordinate is the centre of its window on the slide,
in level-0 pixels of the slide (pixel ``p`` spans ``[p - 0.5, p + 0.5)``),
times the slide's microns per pixel when it records them (then in
micrometres). Level k holds the 2 x 2 means of level k - 1 (NaN cells left
out): its cell ``j`` covers level 0's cells ``2**k * j ... 2**k * (j + 1) -
1`` on each axis, and its coordinate is the mean of theirs.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from keras_fcn_surgery.batch.writers import MapInfo, class_colour, class_name, plain, require_zarr
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.options import DEFAULT_OME_ZARR_VERSION, OME_ZARR_VERSIONS

# The NGFF versions written: 0.4 on Zarr v2, 0.5 on Zarr v3 (`options.OME_ZARR_VERSIONS`, the CLI's choices).
# A constant table: read-only.
NGFF_VERSIONS = MappingProxyType(dict(zip(OME_ZARR_VERSIONS, (2, 3))))
DEFAULT_VERSION = DEFAULT_OME_ZARR_VERSION
# Cells per chunk side, on every level, and the chunk's size on the channel axis: about 2 MiB of float32.
CHUNK = 128
_CHUNK_BYTES = 2 << 20
# Coarser levels are added until the largest side is at most this many cells.
TOP_SIDE = 64
LABELS = "classes"


def check_version(version) -> str:
    """``version`` when it is one of `NGFF_VERSIONS`; else `InputError`."""
    if version not in NGFF_VERSIONS:
        raise InputError(
            f"Expected the OME-Zarr version to be one of {tuple(NGFF_VERSIONS)} (CLI: --ome-zarr-version). "
            f"Received: {version!r}"
        )
    return version


def create_scores(path: str, shape, *, version: str = DEFAULT_VERSION):
    """A new OME-Zarr group at ``path`` whose level 0 holds a map of ``shape`` ``(H', W', K)``.

    Returns a channels-last view of level 0 (``shape`` ``(H', W', K)``,
    sliced like a numpy array, NaN until written) to pass as `predict_map`'s
    ``out``; call `finish` once it is written.
    """
    zarr = require_zarr("ome-zarr")
    height, width, classes = (int(d) for d in shape)
    group = zarr.open_group(path, mode="w", zarr_format=NGFF_VERSIONS[check_version(version)])
    array = _create_array(group, "0", (classes, height, width), _chunks(classes, height, width), np.float32, np.nan)
    return ChannelsLast(array, path)


def finish(
    path: str, scores, info: MapInfo, *, mpp: float | None = None, class_names=None, version: str = DEFAULT_VERSION
) -> None:
    """Complete the OME-Zarr at ``path``: level 0 (copied from ``scores`` unless it is this store's own view),
    the coarser levels, the labels and the NGFF metadata.

    Args:
        path: the group `create_scores` made, or none yet (then it is created).
        scores: the ``(H', W', K)`` map (numpy, zarr, or `create_scores`'s view).
        info: the map's geometry.
        mpp: microns per pixel of the slide's level 0, when it records them.
        class_names: the K class names (channel and label names), or None.
        version: the NGFF version, ``"0.4"`` (Zarr v2) or ``"0.5"`` (Zarr v3).
    """
    zarr = require_zarr("ome-zarr")
    zarr_format = NGFF_VERSIONS[check_version(version)]
    height, width, classes = (int(d) for d in scores.shape)
    own = isinstance(scores, ChannelsLast) and scores.path == path
    if not own:
        _copy_level0(create_scores(path, scores.shape, version=version), scores)
    group = zarr.open_group(path, mode="r+", zarr_format=zarr_format)
    sizes = level_sizes((height, width))
    label_dtype = _label_dtype(classes)
    labels = zarr.open_group(path + "/labels", mode="w", zarr_format=zarr_format)
    classes_group = labels.create_group(LABELS)
    label_arrays = [
        _create_array(
            classes_group, str(level), (1, *size), (1, min(CHUNK, size[0]), min(CHUNK, size[1])), label_dtype, 0
        )
        for level, size in enumerate(sizes)
    ]
    arrays = [group["0"]]
    for level, size in enumerate(sizes[1:], start=1):
        arrays.append(_create_array(group, str(level), (classes, *size), _chunks(classes, *size), np.float32, np.nan))
    low, high = _label_level0(arrays[0], label_arrays[0])
    for level in range(1, len(sizes)):
        _halve_level(arrays[level - 1], arrays[level], label_arrays[level])
    names = [class_name(k, class_names) for k in range(classes)]
    transforms = [level_transforms(info, mpp, level) for level in range(len(sizes))]
    geometry, axes = _geometry_attributes(info, mpp), _axes(mpp)
    image = _image_metadata(names, axes, transforms, low, high, version)
    group.attrs.update({**_ome(image, version), "keras_fcn_surgery": geometry})
    labels.attrs.update(_ome({"labels": [LABELS]}, version))
    label = _label_metadata(names, axes, transforms, version)
    classes_group.attrs.update({**_ome(label, version), "keras_fcn_surgery": geometry})


def _create_array(group, name: str, shape, chunks, dtype, fill_value):
    """A chunked array of ``group``: Zarr v3 with named dimensions, or Zarr v2 as NGFF 0.4 wants it (chunk keys
    split by ``/``; Blosc, which every Zarr v2 reader, Java's included, decodes)."""
    if group.metadata.zarr_format == 3:
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, dimension_names=("c", "y", "x")
        )
    from numcodecs import Blosc

    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        compressors=Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    )


def _ome(metadata: dict, version: str) -> dict:
    """NGFF attributes as each version places them: 0.5 under ``ome`` with the version, 0.4 at the top."""
    return {"ome": {"version": version, **metadata}} if version != "0.4" else metadata


def _image_metadata(names, axes, transforms, low, high, version: str) -> dict:
    """The score image's NGFF attributes: its multiscale and one omero channel per class."""
    channels = [
        {
            "label": name,
            "color": _hex(class_colour(k)),
            "window": {"min": low[k], "max": high[k], "start": low[k], "end": high[k]},
            "active": len(names) <= 8,
            "coefficient": 1,
            "family": "linear",
            "inverted": False,
        }
        for k, name in enumerate(names)
    ]
    return {
        "multiscales": [_multiscale("scores", axes, transforms, "mean", _SCORE_PYRAMID, version)],
        "omero": {"channels": channels, "rdefs": {"model": "color"}},
    }


def _label_metadata(names, axes, transforms, version: str) -> dict:
    """The labels image's NGFF attributes: its multiscale, and a colour and class name per label value."""
    return {
        "multiscales": [_multiscale(LABELS, axes, transforms, "argmax", _LABEL_PYRAMID, version)],
        "image-label": {
            "version": version,
            "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
            + [{"label-value": k + 1, "rgba": [*class_colour(k), 255]} for k in range(len(names))],
            "properties": [{"label-value": 0, "class": "not computed"}]
            + [{"label-value": k + 1, "class": name, "class-index": k} for k, name in enumerate(names)],
            "source": {"image": "../../"},
        },
    }


_SCORE_PYRAMID = "level k: the mean of each 2 x 2 block of level k - 1 (cells not computed, NaN, left out)"
_LABEL_PYRAMID = "the class with the highest score in the same level of the score pyramid, plus 1; 0: not computed"


def level_sizes(size) -> list[tuple[int, int]]:
    """``(H, W)`` of each level: level 0's ``size`` halved (rounding down) until the largest side is at most
    `TOP_SIDE` cells or a side would vanish."""
    sizes = [(int(size[0]), int(size[1]))]
    while max(sizes[-1]) > TOP_SIDE and min(sizes[-1]) >= 2:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def level_transforms(info: MapInfo, mpp: float | None, level: int) -> tuple[list[float], list[float]]:
    """``(scale, translation)`` along ``(y, x)`` that put level ``level``'s cells on the slide.

    Cell ``i`` of level 0 is the window ``[offset + i * stride, offset + i *
    stride + receptive_field)`` of the slide level the map was computed on;
    its centre, in level-0 pixels with pixel centres at integers, is
    ``(offset + i * stride + receptive_field / 2) * downsample - 0.5``.
    Level ``level`` averages blocks of ``f = 2**level`` cells, whose centre
    is that of cell ``f * j + (f - 1) / 2``. Multiplied by ``mpp`` when given.
    """
    factor = 2**level
    unit = mpp if mpp is not None else 1.0
    scale, translation = [], []
    for axis in (0, 1):
        d = float(info.downsample[axis])
        step = info.stride[axis] * d
        first = (info.offset[axis] + info.receptive_field[axis] / 2) * d - 0.5
        scale.append(step * factor * unit)
        translation.append((first + step * (factor - 1) / 2) * unit)
    return scale, translation


def _multiscale(name, axes, transforms, kind: str, description: str, version: str) -> dict:
    return {
        **({"version": version} if version == "0.4" else {}),  # 0.5 has it once, beside the multiscales
        "name": name,
        "axes": axes,
        "datasets": [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, *scale]},
                    {"type": "translation", "translation": [0.0, *translation]},
                ],
            }
            for level, (scale, translation) in enumerate(transforms)
        ],
        "type": kind,
        "metadata": {"description": description},
    }


def _axes(mpp) -> list[dict]:
    space = {"type": "space", "unit": "micrometer"} if mpp is not None else {"type": "space"}
    return [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]


def _geometry_attributes(info: MapInfo, mpp) -> dict:
    return {
        "map": plain(info.fields()),
        "mpp": mpp,
        "coordinates": "micrometer" if mpp is not None else "level-0 pixels of the slide",
        "convention": "NGFF: the centre of array element 0 is at coordinate 0; a cell sits at its window's centre",
    }


def _chunks(classes: int, height: int, width: int) -> tuple[int, int, int]:
    per_channel = 4 * CHUNK * CHUNK
    return (max(1, min(classes, _CHUNK_BYTES // per_channel)), max(1, min(CHUNK, height)), max(1, min(CHUNK, width)))


def _label_dtype(classes: int):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if classes + 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _copy_level0(view: ChannelsLast, scores) -> None:
    for first in range(0, scores.shape[0], CHUNK):
        view[first : first + CHUNK] = np.asarray(scores[first : first + CHUNK], dtype=np.float32)


def _blocks(height: int, width: int):
    for top in range(0, height, CHUNK):
        for left in range(0, width, CHUNK):
            yield slice(top, min(top + CHUNK, height)), slice(left, min(left + CHUNK, width))


def _channel_groups(array):
    step = array.chunks[0]
    for first in range(0, array.shape[0], step):
        yield slice(first, min(first + step, array.shape[0]))


class _TopClass:
    """The running argmax over channel groups of one block: ``labels`` is class + 1, 0 where all are NaN."""

    def __init__(self, shape):
        self.best = np.full(shape, -np.inf, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.int64)

    def update(self, channels: slice, values: np.ndarray) -> None:
        for k in range(values.shape[0]):
            better = values[k] > self.best  # NaN is never better: a cell with no score keeps label 0
            self.best[better] = values[k][better]
            self.labels[better] = channels.start + k + 1


def _label_level0(scores, labels) -> tuple[list[float], list[float]]:
    """Labels of level 0; returns each channel's min and max over the computed cells (0 and 1 when none)."""
    classes, height, width = scores.shape
    low = np.full(classes, np.inf)
    high = np.full(classes, -np.inf)
    for rows, cols in _blocks(height, width):
        top = _TopClass((rows.stop - rows.start, cols.stop - cols.start))
        for channels in _channel_groups(scores):
            values = np.asarray(scores[channels, rows, cols], dtype=np.float32)
            top.update(channels, values)
            flat = values.reshape(values.shape[0], -1)
            computed = ~np.isnan(flat)
            low[channels] = np.minimum(low[channels], np.where(computed, flat, np.inf).min(axis=1))
            high[channels] = np.maximum(high[channels], np.where(computed, flat, -np.inf).max(axis=1))
        labels[0, rows, cols] = top.labels.astype(labels.dtype)
    empty = ~np.isfinite(low)
    low[empty], high[empty] = 0.0, 1.0
    return [float(v) for v in low], [float(v) for v in high]


def _halve_level(source, target, labels) -> None:
    """``target`` (and its ``labels``) as the 2 x 2 block means of ``source``, NaN left out."""
    _, height, width = target.shape
    for rows, cols in _blocks(height, width):
        top = _TopClass((rows.stop - rows.start, cols.stop - cols.start))
        for channels in _channel_groups(source):
            block = np.asarray(
                source[channels, 2 * rows.start : 2 * rows.stop, 2 * cols.start : 2 * cols.stop], dtype=np.float32
            )
            means = halve(block)
            target[channels, rows, cols] = means
            top.update(channels, means)
        labels[0, rows, cols] = top.labels.astype(labels.dtype)


def halve(block: np.ndarray) -> np.ndarray:
    """The means of the 2 x 2 blocks of the last two axes of ``block`` (even sizes), NaN values left out."""
    *lead, height, width = block.shape
    quads = block.reshape(*lead, height // 2, 2, width // 2, 2)
    valid = ~np.isnan(quads)
    total = np.where(valid, quads, 0).sum(axis=(-3, -1))
    count = valid.sum(axis=(-3, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32)  # 0 / 0: NaN where no cell was computed


def _hex(rgb) -> str:
    return "".join(f"{v:02X}" for v in rgb)


class ChannelsLast:
    """A ``(K, H, W)`` zarr array seen as ``(H, W, K)``: what `predict_map` and the other writers slice.

    Only slices are supported (what tiled passes and band readers use).
    """

    def __init__(self, array, path: str):
        self.array, self.path = array, path
        classes, height, width = array.shape
        self.shape = (int(height), int(width), int(classes))
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def _index(self, index) -> tuple:
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3 or not all(isinstance(item, slice) for item in index):
            raise TypeError(f"Index an OME-Zarr score map with up to three slices. Received: {index!r}")
        rows, cols, channels = index + (slice(None),) * (3 - len(index))
        return channels, rows, cols

    def __getitem__(self, index) -> np.ndarray:
        return np.moveaxis(np.asarray(self.array[self._index(index)]), 0, -1)

    def __setitem__(self, index, value) -> None:
        channels, rows, cols = self._index(index)
        if np.ndim(value) == 0:  # a fill (NaN before a masked pass): zarr fills chunk by chunk
            self.array[channels, rows, cols] = float(value)
            return
        shape = tuple(len(range(*item.indices(dim))) for item, dim in zip((rows, cols, channels), self.shape))
        block = np.broadcast_to(np.asarray(value, dtype=np.float32), shape)
        self.array[channels, rows, cols] = np.moveaxis(block, -1, 0)

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
