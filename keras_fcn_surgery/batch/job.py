"""One input of a batch job: read it, compute its map (skipping masked-out tiles), write its outputs.

`predict_source` is what both engines run for each input: the local one in
this process, the Ray one on its workers. It never raises for a bad input;
the `InputResult` says why it failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keras_fcn_surgery.batch import writers
from keras_fcn_surgery.batch.formats import ONE_MAP_FORMATS as ONE_MAP_FORMATS
from keras_fcn_surgery.batch.formats import FilledMaps, MapShapes, formats_for, staged
from keras_fcn_surgery.batch.masks import cell_mask, read_mask, thumbnail, tissue_mask
from keras_fcn_surgery.batch.outputs import output_paths
from keras_fcn_surgery.batch.readers import LevelArray, choose_level, open_reader
from keras_fcn_surgery.batch.sources import IMAGE_SUFFIXES, Source
from keras_fcn_surgery.errors import ConversionError, InputError, ModelFileError, first_line
from keras_fcn_surgery.grid.geometry import MapGrid, WindowGrid
from keras_fcn_surgery.inference.mapper import MapMethod, MapOptions, Mapper
from keras_fcn_surgery.options import DEFAULT_OME_ZARR_VERSION
from keras_fcn_surgery.preprocessing import pixel_function
from keras_fcn_surgery.segmentation.predict import is_segmenter, run_segmenter
from keras_fcn_surgery.surgery.fcn import OutputMaps

# Images with a side longer than this are tiled when no tile is given (memory stays bounded).
LARGE_SIDE = 2048
# The tile side used then, and for skipping masked-out regions.
DEFAULT_TILE = 1024


@dataclass(frozen=True)
class BatchOptions:
    """How each input is computed and written (see `predict_images` for the meaning of each)."""

    formats: tuple[str, ...] = ("npz",)
    geojson: str = "regions"
    ome_zarr_version: str = DEFAULT_OME_ZARR_VERSION
    tile: int | tuple[int, int] | None = None
    batch_size: int | None = None
    preprocess: str | Callable | None = None
    level: int | None = None
    mpp: float | None = None
    mask: str | None = None
    overwrite: bool = False
    class_names: tuple[str, ...] | None = None
    progress: bool | None = None
    execution: str = "auto"
    precision: str = "float32"
    method: str = "fcn"  # the mapper's (a record: the shards' fingerprint holds it); "windowed": at `stride`
    stride: tuple[int, int] | None = None
    output: str | None = None
    certify: int = 0
    shards: int | None = None
    shard_rows: int | None = None


@dataclass(frozen=True)
class InputResult:
    """What happened to one input.

    Attributes:
        source: the input file.
        status: ``"done"``, ``"skipped"`` (its outputs existed) or ``"failed"``.
        outputs: the files written (or found, when skipped).
        message: why it failed.
        megapixels: pixels of the level the map was computed on, in millions.
        computed_fraction: the share of the unmasked pass's work computed.
        seconds: time spent on it.
        certificate: the map's certificate in one line (`MapCertificate`), or
            why it has none; "" when not asked for.
        input_error: it failed for the input itself (an `InputError`: an
            image smaller than the network...), the user's to fix.
    """

    source: str
    status: str
    outputs: tuple[str, ...] = ()
    message: str = ""
    megapixels: float = 0.0
    computed_fraction: float = 0.0
    seconds: float = 0.0
    certificate: str = ""
    input_error: bool = False


def predict_source(mapper: Mapper, source: Source, out_dir: str, options: BatchOptions) -> InputResult:
    """Compute and write the outputs of one input with ``mapper``; never raises for a bad input (the result says
    why)."""
    start = time.perf_counter()
    paths = output_paths(out_dir, source.name, options.formats)
    missing = paths if options.overwrite else {f: p for f, p in paths.items() if not os.path.exists(p)}
    if not missing:
        return InputResult(source.path, "skipped", tuple(paths.values()))
    try:
        megapixels, fraction, certificate = _compute_and_write(mapper, source, missing, options)
    except (ConversionError, OSError) as error:
        return failed_result(source, str(error), start, input_error=isinstance(error, InputError))
    except Exception as error:  # a decoder's or the network's error on this input must not stop the others
        return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    return InputResult(
        source.path, "done", tuple(paths.values()), "", megapixels, fraction, time.perf_counter() - start, certificate
    )


def prepare_mapper(model, options: BatchOptions, method: MapMethod) -> Mapper:
    """The job's `Mapper`: the method routed once for every input (a windowed map's stride checked before any
    input), with the job's execution and its pixels' preprocessing."""
    mapper = Mapper(model, MapOptions(method=method))
    preprocess = preprocess_fn(options.preprocess, mapper.spec.layout)
    return mapper.with_options(
        batch_size=options.batch_size, engine=options.execution, precision=options.precision, preprocess=preprocess
    )


def failed_result(source: Source, message: str, start: float, *, input_error: bool = False) -> InputResult:
    """The result of an input that failed: ``message``, naming its file, and the time spent since ``start``."""
    if source.path not in message:
        message = f"'{source.path}': {message}"
    seconds = time.perf_counter() - start
    return InputResult(source.path, "failed", message=message, seconds=seconds, input_error=input_error)


def _compute_and_write(mapper: Mapper, source: Source, paths: dict[str, str], options: BatchOptions):
    with open_reader(source.path) as reader:
        job = open_input(mapper, reader, source, options)
        with staged(paths, formats_for(options), overwrite=options.overwrite) as outputs:
            # GeoJSON, CSV and OME-Zarr describe one map, and the certificate certifies it: the output asked
            # for, or the class probabilities (None: several outputs, none of probabilities, none asked for).
            shown = shown_output(job.spec, options.output, required=outputs.one_map)
            maps = outputs.allocate(job.map_shapes(shown))
            scores = job.scores(maps)
            if job.per_pixel:
                fraction, computed = _segment(mapper, job.view, job.layout, job.size, job.kept, scores, options), None
            else:
                fraction, computed = _compute(
                    mapper, job.view, job.layout, job.grid, job.size, job.kept, scores, options
                )
            certificate, line = certify(mapper, job, computed, shown, options)
            outputs.write(job.filled(maps, shown, fraction, certificate, options))
    return job.size[0] * job.size[1] / 1e6, fraction, line


@dataclass
class OpenInput:
    """One input opened for its map: the level read, its size, the map's grid and size, the kept cells."""

    source: Source
    reader: Any
    level: int
    size: tuple[int, int]
    view: LevelArray
    layout: Any
    spec: Any
    per_pixel: bool
    grid: MapGrid
    map_size: tuple[int, int]
    kept: np.ndarray | None

    def scores(self, maps: dict):
        """The map(s) to fill: ``maps`` (arrays by output name) as `_compute` and `_segment` take them."""
        return OutputMaps(self.spec.outputs, list(maps.values())) if self.spec.several else maps[self.spec.names[0]]

    def map_shapes(self, shown: str | None) -> MapShapes:
        """The maps its pass fills, for the output formats to allocate."""
        shapes = {o.name: (self.map_size[0], self.map_size[1], o.classes) for o in self.spec.outputs}
        return MapShapes(shapes, self.spec.several, shown, self.source.path)

    def filled(self, maps: dict, shown: str | None, fraction: float, certificate, options: BatchOptions) -> FilledMaps:
        """The filled ``maps`` and what the output formats write beside them."""
        info = replace(self.info(fraction, certificate, shown), precision=options.precision)
        return FilledMaps(maps, self.spec.several, shown, info, self.reader.mpp, options.class_names)

    def info(self, fraction: float, certificate=None, shown: str | None = None) -> writers.MapInfo:
        return writers.MapInfo(
            source=self.source.path,
            level=self.level,
            downsample=self.reader.levels[self.level].downsample,
            level_size=self.size,
            stride=self.grid.stride,
            offset=self.grid.offset,
            receptive_field=self.grid.receptive_field,
            computed_fraction=fraction,
            per_pixel=self.per_pixel,
            certificate=_certificate_metadata(certificate, shown if self.spec.several else None),
        )


def open_input(mapper: Mapper, reader, source: Source, options: BatchOptions) -> OpenInput:
    """The level of ``reader`` to compute, its map's grid and size, and the cells the mask keeps."""
    spec = mapper.spec
    layout = spec.layout
    per_pixel = mapper.method == "fcn" and is_segmenter(mapper.runnable)
    level = choose_level(reader, level=options.level, mpp=options.mpp)
    size = reader.levels[level].size
    view = LevelArray(reader, level, spec.channels, layout)
    grid: MapGrid
    if per_pixel:
        grid = WindowGrid.per_pixel()
    else:  # a windowed map's: the classifier's window at its stride, offset 0
        grid = mapper.grid.at(size)
    map_size = grid.output_size(size)
    kept = _kept_cells(reader, source, options.mask, size, grid, map_size)
    return OpenInput(source, reader, level, size, view, layout, spec, per_pixel, grid, map_size, kept)


def certify(mapper: Mapper, job: OpenInput, computed, shown: str | None, options: BatchOptions):
    """The certificate of the map ``computed`` (in the model's layout; None: a segmenter's) and its line."""
    if computed is None or not options.certify:
        return None, ""
    if shown is None:
        return None, f"no certificate: {_NO_SHOWN_OUTPUT}"
    output = shown if job.spec.several else None
    return mapper.certificate_line(job.view, computed, options.certify, keep=job.kept, output=output)


_NO_SHOWN_OUTPUT = (
    "the model has several outputs and none ends in a softmax or sigmoid: name the one to certify with "
    "`output=NAME` (CLI: --output-name NAME)."
)


def shown_output(spec, output: str | None, *, required: bool) -> str | None:
    """The output GeoJSON, CSV, OME-Zarr and the certificate describe; None when there is no default and
    nothing ``required`` one (`FcnSpec.output_index` raises then)."""
    try:
        return spec.names[spec.output_index(output)]
    except InputError:
        if required or output is not None:
            raise
        return None


def _certificate_metadata(certificate, output: str | None) -> dict | None:
    """The certificate's figures for the map's metadata, with the output it certifies among several."""
    if certificate is None:
        return None
    return {**certificate.metadata(), **({"output": output} if output is not None else {})}


def _compute(mapper: Mapper, view, layout, grid, size, kept, scores, options: BatchOptions):
    """Fill ``scores`` (channels-last, NaN-filled; an `OutputMaps` of them for several outputs); return the
    share of the unmasked work computed and the map in the model's layout (``scores`` itself for
    channels-last).

    A mask reaches `predict_map` as its ``keep``: the staged plan then runs
    only the tiles the kept cells need, batched and prefetched as any pass.
    """
    tile = map_tile(options, size, grid, kept)
    keep = None if kept is None or grid.global_context else kept
    fraction = work_fraction(mapper, size, tile, keep, options)
    mapper = mapper.with_options(tile=tile)
    targets = list(scores.values()) if isinstance(scores, dict) else [scores]
    if layout.channels_last:
        computed = mapper.map(view, out=scores, keep=keep, progress=options.progress)
    else:
        computed = mapper.map(view, keep=keep, progress=options.progress)
        for target, cell_map in zip(targets, computed.values() if isinstance(computed, dict) else [computed]):
            target[:] = layout.image_to_channels_last(cell_map)
    if kept is not None and keep is None:  # a network with global context: nothing to skip, but the mask applies
        for target in targets:
            _apply_mask(target, kept)
    return fraction, computed


def map_tile(options: BatchOptions, size, grid, kept):
    """The tile side of a score map's pass: the one asked for, else tiles for large images and for masks (tiles
    to skip), else one pass (always for networks with global context, which cannot be tiled)."""
    tile = options.tile
    if tile is None and (max(size) > LARGE_SIDE or kept is not None) and not grid.global_context:
        tile = DEFAULT_TILE
    return tile


def work_fraction(mapper: Mapper, size, tile, keep, options: BatchOptions) -> float:
    """The share of the unmasked pass's work (MACs) that the pass keeping ``keep`` computes."""
    if keep is None:
        return 1.0
    # A windowed map: `keep` is over its windows (the grid is the windowed map's), `tile` tiles the shared prefix.
    mapper = mapper.with_options(tile=tile)
    return mapper.plan(size, keep=keep).macs / max(mapper.plan(size).macs, 1)


def _segment(mapper: Mapper, view, layout, size, kept, scores, options: BatchOptions) -> float:
    """A segmenter's logits, one per pixel, into ``scores``; returns the share of the tiles computed.

    The exact tiles of `segment_image`, through the same tile loop (batched,
    prefetched); tiles without a kept pixel are skipped.
    """
    model, preprocess = mapper.runnable, mapper.inputs.preprocess
    tile = segment_tile(options, size, kept)
    arguments = dict(
        tile=tile, keep=kept, preprocess=preprocess, batch_size=options.batch_size, progress=options.progress
    )
    if layout.channels_last:
        return run_segmenter(model, view, scores, **arguments)
    logits = np.empty(layout.image_shape(size[0], size[1], scores.shape[-1]), np.float32)
    fraction = run_segmenter(model, view, logits, **arguments)
    scores[:] = layout.image_to_channels_last(logits)
    return fraction


def segment_tile(options: BatchOptions, size, kept):
    """A segmenter's tile side: as `map_tile` (segmenters are always tiled)."""
    tile = options.tile
    if tile is None and (max(size) > LARGE_SIDE or kept is not None):
        tile = DEFAULT_TILE
    return tile


def _apply_mask(scores, kept) -> None:
    for first in range(0, scores.shape[0], 256):
        band = np.asarray(scores[first : first + 256])
        band[~kept[first : first + 256]] = np.nan
        scores[first : first + 256] = band


def _kept_cells(reader, source: Source, mask, size, grid, map_size):
    if mask is None:
        return None
    if mask == "auto":
        picture = tissue_mask(thumbnail(reader))
    elif os.path.isdir(mask):
        picture = read_mask(_mask_file_for(mask, source))
    else:
        picture = read_mask(mask)
    return cell_mask(picture, size, grid, map_size)


def _mask_file_for(folder: str, source: Source) -> str:
    stem = os.path.basename(source.name)
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    raise ModelFileError(f"Mask folder '{folder}' has no mask image named '{stem}' (.png, .tif...).")


def preprocess_fn(preprocess, layout):
    """The function applied to each tile: None, a keras.applications mode's ``preprocess_input``, or ``preprocess``."""
    return pixel_function(preprocess, layout.data_format)
