"""The output formats of a batch job, registered by name: one class each, one lifecycle.

Every input's outputs go through the same three steps, whichever engine
computes the map (this process, a Ray worker, region shards):

1. ``allocate``, before the map is computed: a format may offer arrays the
   computation writes straight into (zarr: every output's map; OME-Zarr: the
   described output's level 0), so a map larger than memory is never held
   whole; the maps no format offers are NaN-filled numpy arrays.
2. ``write``, once the maps are filled: each format writes its file from them
   (completing what it allocated), at a temporary path.
3. publish: `staged` moves every output into place once all are written; an
   error or an interruption at any step removes them all, so an input has
   all its outputs or none.

A format is a frozen dataclass of its own options (`OmeZarrFormat.version`,
`GeoJsonFormat.features`), made from a job's options by `from_options`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from keras_fcn_surgery.batch import dicom, ome_zarr, writers
from keras_fcn_surgery.batch.writers import MapInfo
from keras_fcn_surgery.errors import InputError


@dataclass(frozen=True)
class MapShapes:
    """The maps one input's pass fills, before it runs.

    Attributes:
        shapes: ``(H', W', K)`` of each output's map, by output name, in the model's order.
        several: whether the model has several outputs (npz and zarr then store each under its name).
        shown: the output the one-map formats describe (None: none, and no such format asked for).
        source: the input file (a format may refuse an input it cannot describe before the pass).
    """

    shapes: dict[str, tuple[int, int, int]]
    several: bool
    shown: str | None
    source: str = ""


@dataclass(frozen=True)
class FilledMaps:
    """The maps of one input once computed, and what the formats write beside them.

    Attributes:
        maps: each output's ``(H', W', K)`` map (numpy, zarr or a format's view), by name, in the model's order.
        several: whether the model has several outputs.
        shown: the output the one-map formats describe.
        info: the map's geometry and provenance.
        mpp: microns per pixel of the slide's level 0, when it records them.
        class_names: the classes' names (of the shown output), or None.
    """

    maps: dict[str, Any]
    several: bool
    shown: str | None
    info: MapInfo
    mpp: float | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def shown_map(self):
        """The map the one-map formats describe (there is one wherever such a format is asked for)."""
        return self.maps[self.shown] if self.shown is not None else None

    @property
    def names(self) -> tuple[str, ...]:
        """The outputs' names for a model with several outputs; () for one."""
        return tuple(self.maps) if self.several else ()


@dataclass(frozen=True)
class OutputFormat:
    """One output format: what it allocates before the pass, and how it writes its file after.

    Class attributes:
        name: the ``formats=`` value (`options.OUTPUT_FORMATS`, the CLI's ``--format`` choices).
        suffix: appended to the input's name.
        one_map: whether it describes one map (the shown output) rather than every output.
        adopts_store: whether it can take over a completed zarr store of the maps (`adopt`).
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    one_map: ClassVar[bool] = False
    adopts_store: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options) -> OutputFormat:
        """The format with its options taken from a job's options (`BatchOptions`)."""
        return cls()

    @classmethod
    def check_available(cls) -> None:
        """Refuse the format, before any input, when a package it needs is missing (`InputError`)."""

    def check_input(self, source: str) -> None:
        """Refuse an input this format cannot describe (`InputError`), before its map is computed."""

    def allocate(self, path: str, shapes: MapShapes, taken) -> dict[str, Any]:
        """Arrays, by output name, the pass writes straight into (none of ``taken``, already offered)."""
        return {}

    def write(self, path: str, filled: FilledMaps) -> None:
        """Write the output at the temporary ``path`` from the filled maps (completing what `allocate` made)."""
        raise NotImplementedError

    def adopt(self, path: str, store: str) -> None:
        """Move the completed zarr ``store`` of the maps to ``path`` as this output (where `adopts_store`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NpzFormat(OutputFormat):
    """Every output's map and the metadata as arrays of one npz file (`writers.write_npz`)."""

    name: ClassVar[str] = "npz"
    suffix: ClassVar[str] = ".npz"

    def write(self, path: str, filled: FilledMaps) -> None:
        scores = dict(filled.maps) if filled.several else next(iter(filled.maps.values()))
        writers.write_npz(path, scores, filled.info)


@dataclass(frozen=True)
class ZarrFormat(OutputFormat):
    """Every output's map as a float32 zarr array, written while computed; the metadata as group attributes.

    Attributes:
        chunk_rows: map rows (and columns) per chunk.
    """

    name: ClassVar[str] = "zarr"
    suffix: ClassVar[str] = ".zarr"
    adopts_store: ClassVar[bool] = True
    chunk_rows: int = writers.ZARR_CHUNK_ROWS

    def allocate(self, path: str, shapes: MapShapes, taken) -> dict[str, Any]:
        return {
            output: writers.create_zarr_scores(
                path, shape, name=output if shapes.several else writers.SCORES, chunk_rows=self.chunk_rows
            )
            for output, shape in shapes.shapes.items()
            if output not in taken
        }

    def write(self, path: str, filled: FilledMaps) -> None:
        writers.finish_zarr(path, filled.info, filled.names)

    def adopt(self, path: str, store: str) -> None:
        os.replace(store, path)


@dataclass(frozen=True)
class OmeZarrFormat(OutputFormat):
    """The shown output as an OME-Zarr image (score pyramid, labels, transforms on the slide): `batch.ome_zarr`.

    Attributes:
        version: the NGFF version: ``"0.4"`` on Zarr v2 (QuPath through
            Bio-Formats, OMERO, napari) or ``"0.5"`` on Zarr v3 (napari with
            ome-zarr >= 0.12).
    """

    name: ClassVar[str] = "ome-zarr"
    suffix: ClassVar[str] = ".ome.zarr"
    one_map: ClassVar[bool] = True
    version: str = ome_zarr.DEFAULT_VERSION

    def __post_init__(self):
        ome_zarr.check_version(self.version)

    @classmethod
    def from_options(cls, options) -> OutputFormat:
        return cls(version=options.ome_zarr_version)

    def allocate(self, path: str, shapes: MapShapes, taken) -> dict[str, Any]:
        if shapes.shown is None or shapes.shown in taken:
            return {}
        return {shapes.shown: ome_zarr.create_scores(path, shapes.shapes[shapes.shown], version=self.version)}

    def write(self, path: str, filled: FilledMaps) -> None:
        ome_zarr.finish(
            path, filled.shown_map, filled.info, mpp=filled.mpp, class_names=filled.class_names, version=self.version
        )


@dataclass(frozen=True)
class GeoJsonFormat(OutputFormat):
    """The shown output's regions or cells as a GeoJSON FeatureCollection for QuPath (`writers.write_geojson`).

    Attributes:
        features: ``"regions"`` or ``"cells"`` (`options.GEOJSON_FEATURES`).
    """

    name: ClassVar[str] = "geojson"
    suffix: ClassVar[str] = ".geojson"
    one_map: ClassVar[bool] = True
    features: str = "regions"

    def __post_init__(self):
        writers.check_geojson(self.features)

    @classmethod
    def from_options(cls, options) -> OutputFormat:
        return cls(features=options.geojson)

    def write(self, path: str, filled: FilledMaps) -> None:
        writers.write_geojson(path, filled.shown_map, filled.info, filled.class_names, geojson=self.features)


@dataclass(frozen=True)
class CsvFormat(OutputFormat):
    """The shown output's cells (a segmenter's: regions) as CSV rows (`writers.write_csv`)."""

    name: ClassVar[str] = "csv"
    suffix: ClassVar[str] = ".csv"
    one_map: ClassVar[bool] = True

    def write(self, path: str, filled: FilledMaps) -> None:
        writers.write_csv(path, filled.shown_map, filled.info, filled.class_names)


@dataclass(frozen=True)
class DicomFormat(OutputFormat):
    """The shown output's scores (a tiled float32 Parametric Map) and top class (a Segmentation): in a DICOM slide's
    study, or a new study for another input that records its resolution (`batch.dicom`)."""

    name: ClassVar[str] = "dicom"
    suffix: ClassVar[str] = ".dicom"
    one_map: ClassVar[bool] = True

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("highdicom") is None or importlib.util.find_spec("skimage") is None:
            raise InputError(dicom.MISSING_HIGHDICOM)

    def check_input(self, source: str) -> None:
        dicom.check_source(source)

    def write(self, path: str, filled: FilledMaps) -> None:
        dicom.write_maps(path, filled.shown_map, filled.info, filled.class_names, mpp=filled.mpp)


# The formats by name, in the order of `options.OUTPUT_FORMATS` (the CLI's choices; a test holds them equal).
# Allocation follows this order: zarr, which holds every output, before OME-Zarr, which holds one.
FORMATS: dict[str, type[OutputFormat]] = {
    kind.name: kind for kind in (NpzFormat, ZarrFormat, OmeZarrFormat, GeoJsonFormat, CsvFormat, DicomFormat)
}
# The formats that describe one map: of a model with several outputs, the one `BatchOptions.output` names.
ONE_MAP_FORMATS = tuple(name for name, kind in FORMATS.items() if kind.one_map)


def formats_for(options) -> dict[str, OutputFormat]:
    """The formats a job's options (`BatchOptions`) ask for, by name, in the registry's order."""
    return {name: kind.from_options(options) for name, kind in FORMATS.items() if name in options.formats}


def check_input(options, source: str) -> None:
    """Refuse an input one of the formats ``options`` ask for cannot describe, before any of its work."""
    for kind in formats_for(options).values():
        kind.check_input(source)


class InputOutputs:
    """One input's outputs at their temporary paths, between allocation and publication (see `staged`)."""

    def __init__(self, formats: dict[str, OutputFormat], temporary: dict[str, str]):
        self.formats = {name: kind for name, kind in formats.items() if name in temporary}
        self.temporary = temporary

    @property
    def one_map(self) -> bool:
        """Whether a format describing one map is among them (the shown output is then required)."""
        return any(kind.one_map for kind in self.formats.values())

    def allocate(self, shapes: MapShapes) -> dict[str, Any]:
        """Each output's map for the pass to fill, by name in the model's order: a format's array, else NaN numpy."""
        for kind in self.formats.values():
            kind.check_input(shapes.source)
        offered: dict[str, Any] = {}
        for name, kind in self.formats.items():
            offered.update(kind.allocate(self.temporary[name], shapes, tuple(offered)))
        return {
            output: offered[output] if output in offered else np.full(shape, np.nan, dtype=np.float32)
            for output, shape in shapes.shapes.items()
        }

    def write(self, filled: FilledMaps, *, store: str | None = None) -> None:
        """Write every output from ``filled``.

        Args:
            filled: the computed maps and their metadata.
            store: a completed zarr store holding the maps (region shards'
                work store): a format that adopts it has it moved in place of
                its output, after the others were written from it.
        """
        adopting = [name for name, kind in self.formats.items() if store is not None and kind.adopts_store][:1]
        for name, kind in self.formats.items():
            if name not in adopting:
                kind.write(self.temporary[name], filled)
        for name in adopting:  # last: until it moves, a rerun can still use the store
            self.formats[name].adopt(self.temporary[name], str(store))
            self.formats[name].write(self.temporary[name], filled)


@contextlib.contextmanager
def staged(paths: dict[str, str], formats: dict[str, OutputFormat], *, overwrite: bool) -> Iterator[InputOutputs]:
    """Yield an input's outputs at temporary paths; on success publish them all, on any error remove them all.

    Raises:
        ModelFileError: when an output exists and ``overwrite`` is False.
    """
    unknown = sorted(set(paths) - set(formats))
    if unknown:
        raise InputError(f"Expected output formats among {', '.join(FORMATS)}. Received: {unknown!r}")
    with writers.staged_outputs(paths, overwrite=overwrite) as temporary:
        yield InputOutputs(formats, temporary)
