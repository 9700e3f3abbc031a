"""One input's outputs: npz, zarr, GeoJSON and CSV, each written completely or not at all.

All of an input's outputs are written into a private ``.partial-*`` folder
beside them and moved into place once every one is complete; an error or an
interruption removes the folder, so no partial output is ever left behind.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from keras_fcn_surgery.batch import regions
from keras_fcn_surgery.batch.cells import cell_edges
from keras_fcn_surgery.errors import InputError, ModelFileError
from keras_fcn_surgery.options import GEOJSON_FEATURES
from keras_fcn_surgery.saving.atomic import make_temporary_dir, remove_tree

# Map rows read at a time when writing cells out of a (possibly zarr) score map.
_ROWS_PER_BAND = 64
# The key (npz) and array name (zarr) of a one-output model's map; a model with several outputs writes each
# map under its output's name instead, and lists the names, in order, under `OUTPUTS`.
SCORES = "scores"
OUTPUTS = "outputs"
# Map rows (and columns) per chunk of a zarr output.
ZARR_CHUNK_ROWS = 256
# An npz member is deflated when samples of its bytes shrink below this share: the NaN cells of a masked map
# do (to almost nothing); computed float32 scores do not (to 0.8-0.95 of their size, at some 20 s per GB on one
# core, which on a slide's map is a sizeable share of the pass itself).
_DEFLATE_BELOW = 0.75
_SAMPLES, _SAMPLE_BYTES = 8, 1 << 16


@dataclass(frozen=True)
class MapInfo:
    """What a score map was computed from, stored beside it.

    Attributes:
        source: the input file.
        level: the pyramid level used (0: full resolution).
        downsample: ``(dy, dx)`` of that level relative to level 0.
        level_size: ``(H, W)`` of that level in pixels.
        stride: the network's stride in that level's pixels.
        offset: where cell ``(0, 0)``'s window starts, in that level's pixels.
        receptive_field: the window of one cell.
        computed_fraction: the share of the unmasked pass's work computed (less than 1 with a mask).
        per_pixel: a segmenter's map, one cell per pixel (GeoJSON and CSV then
            describe regions, not cells).
        certificate: the figures of the map's `MapCertificate` (its
            ``metadata()``), stored as ``certificate_<name>``; None when the
            map was not certified.
        precision: what the map was computed at (``"float32"``, ``"bfloat16"``
            or ``"float16"``); it is stored in float32 either way.
    """

    source: str
    level: int
    downsample: tuple[float, float]
    level_size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    receptive_field: tuple[int, int]
    computed_fraction: float
    per_pixel: bool = False
    certificate: dict | None = None
    precision: str = "float32"

    def fields(self) -> dict:
        """The metadata as flat values: the certificate's as ``certificate_<name>`` (none without one)."""
        values = asdict(self)
        certificate = values.pop("certificate") or {}
        values.update({f"certificate_{name}": value for name, value in certificate.items()})
        return values


@contextlib.contextmanager
def staged_outputs(paths: dict[str, str], *, overwrite: bool):
    """Yield temporary paths for ``paths``; on success move each into place.

    Raises:
        ModelFileError: when an output exists and ``overwrite`` is False.
    """
    folders = {os.path.dirname(p) for p in paths.values()}
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    for path in paths.values():
        if os.path.exists(path) and not overwrite:
            raise ModelFileError(f"Output '{path}' exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        _refuse_foreign_folder(path)
    (folder,) = folders
    # Stale temporaries are not swept here: Ray workers on other machines may share this folder, and
    # their pids mean nothing on this one. The pid in the name lets a user tell what is whose.
    work = make_temporary_dir(folder, what="output folder")
    try:
        temporary = {f: os.path.join(work, os.path.basename(p)) for f, p in paths.items()}
        yield temporary
        for fmt, path in paths.items():
            _replace(temporary[fmt], path, overwrite)
    except BaseException:
        remove_tree(work, settle=0.2)  # an interrupted zarr write may still land from its I/O thread
        raise
    finally:
        remove_tree(work)


def _refuse_foreign_folder(path: str) -> None:
    """``overwrite`` replaces a previous output, never anything else: an existing folder only where it is a zarr
    store written as a ``.zarr`` output (what `_replace` would remove)."""
    if not os.path.isdir(path):
        return
    markers = ("zarr.json", ".zgroup", ".zarray")
    if path.endswith(".zarr") and any(os.path.exists(os.path.join(path, name)) for name in markers):
        return
    raise ModelFileError(
        f"Output '{path}' is a folder that is not a previous zarr output; overwrite=True (CLI: --overwrite) "
        "replaces previous outputs only, never other files: move it away, or choose another output folder."
    )


def _replace(source: str, target: str, overwrite: bool) -> None:
    if os.path.isdir(source) and os.path.isdir(target):
        if not overwrite:
            raise ModelFileError(f"Output '{target}' appeared while writing; pass overwrite=True to replace it.")
        # A folder cannot be swapped in one rename: move the old one aside first, then drop it.
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "old"))
        os.replace(source, target)
        remove_tree(old)
        return
    if os.path.exists(target) and not overwrite:
        raise ModelFileError(f"Output '{target}' appeared while writing; pass overwrite=True to replace it.")
    os.replace(source, target)


def create_zarr_scores(path: str, shape, *, name: str = SCORES, chunk_rows: int = ZARR_CHUNK_ROWS):
    """A float32 zarr array ``name`` of ``shape`` ``(H', W', K)``, NaN until written, in the group at ``path``
    (created when missing: one array per output of a model with several)."""
    zarr = require_zarr()
    group = zarr.open_group(path, mode="a")
    chunks = (min(chunk_rows, shape[0]), min(chunk_rows, shape[1]), shape[2])
    return group.create_array(name, shape=tuple(shape), chunks=chunks, dtype="float32", fill_value=np.nan)


def finish_zarr(path: str, info: MapInfo, outputs=()) -> None:
    """Record ``info`` in the attributes of the zarr group at ``path`` (and ``outputs``, the maps' names in
    order, for a model with several)."""
    group = require_zarr().open_group(path, mode="r+")
    group.attrs.update(plain(info.fields()))
    if outputs:
        group.attrs[OUTPUTS] = list(outputs)


def check_map_names(names) -> None:
    """Refuse output names that the npz output could not store beside its metadata fields.

    Raises:
        InputError: naming the output that clashes.
    """
    fields = sorted({*MapInfo.__dataclass_fields__, OUTPUTS} - {"certificate"})
    clashes = [name for name in names if name in fields or name.startswith("certificate_")]
    if clashes:
        raise InputError(
            f"The model's output {clashes[0]!r} has the name of a field the npz output stores beside the maps "
            f"({', '.join(fields)}, certificate_*); rename that output's layer."
        )


def write_npz(path: str, scores, info: MapInfo) -> None:
    """``scores`` (H', W', K float32) and ``info``'s fields as arrays of one npz file.

    ``scores`` may be a dict of maps by output name (a model with several
    outputs): each is stored under its name, and ``outputs`` lists the names.
    """
    arrays = {key: np.asarray(value) for key, value in info.fields().items()}
    maps = scores if isinstance(scores, dict) else {SCORES: scores}
    if isinstance(scores, dict):
        check_map_names(maps)
        arrays[OUTPUTS] = np.asarray(list(maps))
    for name, cell_map in maps.items():
        arrays[name] = np.asarray(cell_map, dtype=np.float32)
    # `np.load` reads it like `np.savez`'s (members named NAME.npy, dated 1980: the same map, the same bytes).
    with zipfile.ZipFile(path, "w", allowZip64=True, compresslevel=1) as archive:
        for name, array in arrays.items():
            array = np.asarray(array, order="C")
            archive.compression = zipfile.ZIP_DEFLATED if _deflates_well(array) else zipfile.ZIP_STORED
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)


def _deflates_well(array: np.ndarray) -> bool:
    """Whether deflating ``array`` pays: a few samples spread over its bytes shrink below `_DEFLATE_BELOW`."""
    data = array.reshape(-1).view(np.uint8)
    step = max(len(data) // _SAMPLES, _SAMPLE_BYTES)
    samples = b"".join(data[first : first + _SAMPLE_BYTES].tobytes() for first in range(0, len(data), step))
    return len(samples) > 0 and len(zlib.compress(samples, 1)) < _DEFLATE_BELOW * len(samples)


def top_classes(scores, probabilities: bool | None = None):
    """Yield ``(rows, cols, classes, probabilities)`` of the computed (non-NaN) cells, a band of rows at a time.

    Scores become probabilities by a softmax unless they already are (every
    computed value in [0, 1] and each cell summing to 1), decided once for
    the whole map.
    """
    if probabilities is None:
        probabilities = _are_probabilities(scores)
    for first in range(0, scores.shape[0], _ROWS_PER_BAND):
        band = np.asarray(scores[first : first + _ROWS_PER_BAND], dtype=np.float32)
        kept = ~np.isnan(band).any(axis=-1)
        rows, cols = np.nonzero(kept)
        values = band[rows, cols]
        if not probabilities and len(values):
            values = np.exp(values - values.max(axis=-1, keepdims=True))
            values /= values.sum(axis=-1, keepdims=True)
        classes = values.argmax(axis=-1) if len(values) else np.zeros(0, dtype=np.int64)
        yield rows + first, cols, classes, values[np.arange(len(values)), classes]


def _are_probabilities(scores) -> bool:
    low, high, worst = np.inf, -np.inf, 0.0
    for first in range(0, scores.shape[0], _ROWS_PER_BAND):
        band = np.asarray(scores[first : first + _ROWS_PER_BAND], dtype=np.float32)
        band = band[~np.isnan(band).any(axis=-1)]
        if band.size:
            low, high = min(low, float(band.min())), max(high, float(band.max()))
            worst = max(worst, float(np.abs(band.sum(axis=-1) - 1).max()))
    return low >= 0 and high <= 1 and worst <= 1e-3


def cell_polygons(rows, cols, info: MapInfo):
    """``(x0, y0, x1, y1)`` arrays: the boxes cells own (see `cell_edges`) in level-0 pixel coordinates."""
    top, bottom = cell_edges(rows, info.stride[0], info.receptive_field[0], info.offset[0])
    left, right = cell_edges(cols, info.stride[1], info.receptive_field[1], info.offset[1])
    dy, dx = info.downsample
    return left * dx, top * dy, right * dx, bottom * dy


def corner_positions(x, y, info: MapInfo):
    """Corners ``(x, y)`` of the cell grid (corner ``(j, i)``: the top-left corner of cell ``(i, j)``'s box) in
    level-0 pixels: where the boxes of `cell_polygons` meet, so a polygon along cell edges covers exactly the
    union of its cells' boxes."""
    left, _ = cell_edges(x, info.stride[1], info.receptive_field[1], info.offset[1])
    top, _ = cell_edges(y, info.stride[0], info.receptive_field[0], info.offset[0])
    dy, dx = info.downsample
    return left * dx, top * dy


def write_geojson(path: str, scores, info: MapInfo, class_names=None, *, geojson: str = "regions") -> None:
    """A GeoJSON FeatureCollection of the computed cells, in level-0 pixels, for QuPath.

    ``geojson="regions"`` (the default): one QuPath annotation per connected
    region of neighbouring cells with the same top class (see `regions`), a
    Polygon with holes along the cells' box edges, so it covers exactly the
    union of its cells' boxes; its measurements hold its number of cells
    (``pixels`` for a segmenter's per-pixel map) and the mean and largest
    probability of its class over them. ``geojson="cells"``: one QuPath
    detection per computed cell whose classification is the top class and
    whose measurements hold its probability; ``row``/``col`` locate the cell
    in the score map. Cells not computed (NaN, masked out) are in no feature.
    """
    check_geojson(geojson)
    if geojson == "regions":
        _write_region_geojson(path, scores, info, class_names)
        return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        separator = "\n"
        for rows, cols, classes, probabilities in top_classes(scores):
            x0, y0, x1, y1 = cell_polygons(rows, cols, info)
            for n in range(len(rows)):
                box = [[x0[n], y0[n]], [x1[n], y0[n]], [x1[n], y1[n]], [x0[n], y1[n]], [x0[n], y0[n]]]
                feature = {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in box]]},
                    "properties": {
                        "objectType": "detection",
                        "classification": classification(int(classes[n]), class_names),
                        "measurements": {"probability": float(probabilities[n])},
                        "row": int(rows[n]),
                        "col": int(cols[n]),
                        "class": int(classes[n]),
                    },
                }
                handle.write(separator + json.dumps(feature))
                separator = ",\n"
        handle.write("\n]}\n")


def check_geojson(geojson) -> str:
    """``geojson`` when it is one of `GEOJSON_FEATURES`; else `InputError`."""
    if geojson not in GEOJSON_FEATURES:
        raise InputError(f"Expected `geojson` to be one of {GEOJSON_FEATURES}. Received: geojson={geojson!r}")
    return geojson


def write_csv(path: str, scores, info: MapInfo, class_names=None) -> None:
    """One row per computed cell: map position, box in level-0 pixels, top class and its probability.

    A per-pixel map (a segmenter's) gives one row per connected region of a
    class: its class, pixel count, mean probability and box in level-0 pixels.
    """
    if info.per_pixel:
        _write_region_csv(path, scores, info, class_names)
        return
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "col", "x0", "y0", "x1", "y1", "class", "class_name", "probability"])
        for rows, cols, classes, probabilities in top_classes(scores):
            x0, y0, x1, y1 = cell_polygons(rows, cols, info)
            for n in range(len(rows)):
                k = int(classes[n])
                writer.writerow(
                    [
                        int(rows[n]),
                        int(cols[n]),
                        x0[n],
                        y0[n],
                        x1[n],
                        y1[n],
                        k,
                        class_name(k, class_names),
                        f"{float(probabilities[n]):.6g}",
                    ]
                )


def _write_region_geojson(path: str, scores, info: MapInfo, class_names) -> None:
    labels, probability = regions.label_map(scores, top_classes)
    count = "pixels" if info.per_pixel else "cells"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        separator = "\n"
        for region in regions.regions(labels, probability):
            rings = []
            for ring in region.rings:
                x, y = corner_positions(ring[:, 0], ring[:, 1], info)
                rings.append(np.stack([x, y], axis=-1).tolist())
            feature = {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": classification(region.label, class_names),
                    "measurements": {
                        count: region.pixels,
                        "mean probability": region.mean_probability,
                        "max probability": region.max_probability,
                    },
                    "class": region.label,
                },
            }
            handle.write(separator + json.dumps(feature))
            separator = ",\n"
        handle.write("\n]}\n")


def _write_region_csv(path: str, scores, info: MapInfo, class_names) -> None:
    labels, probability = regions.label_map(scores, top_classes)
    dy, dx = info.downsample
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["region", "class", "class_name", "pixels", "mean_probability", "x0", "y0", "x1", "y1"])
        for number, region in enumerate(regions.regions(labels, probability)):
            top, left, bottom, right = region.box
            writer.writerow(
                [
                    number,
                    region.label,
                    class_name(region.label, class_names),
                    region.pixels,
                    f"{region.mean_probability:.6g}",
                    left * dx,
                    top * dy,
                    right * dx,
                    bottom * dy,
                ]
            )


def class_colour(k: int) -> tuple[int, int, int]:
    """A distinct ``(red, green, blue)`` colour for class ``k`` (hues a golden angle apart): its GeoJSON
    classification's (QuPath's class colour) and its OME-Zarr label's."""
    red, green, blue = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))


def classification(k: int, class_names) -> dict:
    """QuPath's classification of class ``k``: its name and colour."""
    return {"name": class_name(k, class_names), "color": list(class_colour(k))}


def class_name(k: int, class_names) -> str:
    """The name of class ``k``: ``class_names[k]``, or ``"class k"`` without names."""
    return class_names[k] if class_names is not None else f"class {k}"


def plain(value):
    """``value`` with numpy scalars as Python ones and tuples as lists, for JSON attributes."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def require_zarr(output_format: str = "zarr"):
    """The `zarr` module, or `InputError` naming ``output_format`` and the extra that installs it."""
    try:
        import zarr
    except ImportError as error:
        raise InputError(
            f"The {output_format} output format needs the `zarr` package: pip install 'keras-fcn-surgery[ome]'."
        ) from error
    return zarr
