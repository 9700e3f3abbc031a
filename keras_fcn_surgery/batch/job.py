"""One input of a batch job: read it, compute its map (skipping masked-out tiles), write its outputs.

`predict_source` is what both engines run for each input: the local one in
this process, the Ray one on its workers. It never raises for a bad input;
the `InputResult` says why it failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_fcn_surgery.batch import ome_zarr, writers
from keras_fcn_surgery.batch.cells import PixelGrid
from keras_fcn_surgery.batch.masks import cell_mask, read_mask, thumbnail, tissue_mask
from keras_fcn_surgery.batch.outputs import output_paths
from keras_fcn_surgery.batch.readers import LevelArray, choose_level, open_reader
from keras_fcn_surgery.batch.sources import IMAGE_SUFFIXES, Source
from keras_fcn_surgery.errors import ConversionError, InputError, ModelFileError, first_line
from keras_fcn_surgery.grid.geometry import Geometry, WindowGrid
from keras_fcn_surgery.inference.certificate import certificate_or_reason
from keras_fcn_surgery.segmentation.predict import is_segmenter, run_segmenter
from keras_fcn_surgery.surgery.fcn import OutputMaps, fcn_spec

# The formats that describe one map: of a model with several outputs, the one `BatchOptions.output` names.
ONE_MAP_FORMATS = ("geojson", "csv", "ome-zarr")
# Images with a side longer than this are tiled when no tile is given (memory stays bounded).
LARGE_SIDE = 2048
# The tile side used then, and for skipping masked-out regions.
DEFAULT_TILE = 1024


@dataclass(frozen=True)
class BatchOptions:
    """How each input is computed and written (see `predict_images` for the meaning of each)."""

    formats: tuple[str, ...] = ("npz",)
    geojson: str = "regions"
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
    method: str = "fcn"  # "windowed": the model is a classifier, its map the windowed map at `stride`
    stride: tuple[int, int] | None = None
    output: str | None = None
    certify: int = 0
    certify_size: tuple[int, int] | None = None
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


def predict_source(fcn, source: Source, out_dir: str, options: BatchOptions) -> InputResult:
    """Compute and write the outputs of one input; never raises for a bad input (the result says why)."""
    start = time.perf_counter()
    paths = output_paths(out_dir, source.name, options.formats)
    missing = paths if options.overwrite else {f: p for f, p in paths.items() if not os.path.exists(p)}
    if not missing:
        return InputResult(source.path, "skipped", tuple(paths.values()))
    try:
        megapixels, fraction, certificate = _compute_and_write(fcn, source, missing, options)
    except (ConversionError, OSError) as error:
        return _failed(source, str(error), start, input_error=isinstance(error, InputError))
    except Exception as error:  # a decoder's or the network's error on this input must not stop the others
        return _failed(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    return InputResult(
        source.path, "done", tuple(paths.values()), "", megapixels, fraction, time.perf_counter() - start, certificate
    )


def _failed(source: Source, message: str, start: float, *, input_error: bool = False) -> InputResult:
    if source.path not in message:
        message = f"'{source.path}': {message}"
    seconds = time.perf_counter() - start
    return InputResult(source.path, "failed", message=message, seconds=seconds, input_error=input_error)


def map_spec_of(model, options: BatchOptions):
    """The `FcnSpec` of the maps ``model`` computes: an FCN's, or a classifier's windowed map's."""
    from keras_fcn_surgery.inference.windowed import map_spec

    return map_spec(model) if options.method == "windowed" else fcn_spec(model)


def _compute_and_write(fcn, source: Source, paths: dict[str, str], options: BatchOptions) -> tuple[float, float, str]:
    with open_reader(source.path) as reader:
        job = open_input(fcn, reader, source, options)
        with writers.staged_outputs(paths, overwrite=options.overwrite) as temporary:
            # GeoJSON, CSV and OME-Zarr describe one map, and the certificate certifies it: the output asked
            # for, or the class probabilities (None: several outputs, none of probabilities, none asked for).
            shown = _shown_output(job.spec, options.output, required=bool(set(ONE_MAP_FORMATS) & set(temporary)))
            maps = {}
            for output in job.spec.outputs:
                shape = (job.map_size[0], job.map_size[1], output.classes)
                if "zarr" in temporary:
                    name = output.name if job.spec.several else writers.SCORES
                    maps[output.name] = writers.create_zarr_scores(temporary["zarr"], shape, name=name)
                elif "ome-zarr" in temporary and output.name == shown:
                    maps[output.name] = ome_zarr.create_scores(temporary["ome-zarr"], shape)
                else:
                    maps[output.name] = np.full(shape, np.nan, dtype=np.float32)
            scores = job.scores(maps)
            if job.per_pixel:
                fraction, computed = _segment(fcn, job.view, job.layout, job.size, job.kept, scores, options), None
            else:
                fraction, computed = _compute(fcn, job.view, job.layout, job.grid, job.size, job.kept, scores, options)
            certificate, line = certify(fcn, job, computed, shown, options)
            write_outputs(temporary, job, maps, shown, fraction, certificate, options)
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
    grid: Geometry | PixelGrid | WindowGrid
    map_size: tuple[int, int]
    kept: np.ndarray | None

    def scores(self, maps: dict):
        """The map(s) to fill: ``maps`` (arrays by output name) as `_compute` and `_segment` take them."""
        return OutputMaps(self.spec.outputs, list(maps.values())) if self.spec.several else maps[self.spec.names[0]]

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


def open_input(fcn, reader, source: Source, options: BatchOptions) -> OpenInput:
    """The level of ``reader`` to compute, its map's grid and size, and the cells the mask keeps."""
    from keras_fcn_surgery.grid.geometry import geometry
    from keras_fcn_surgery.inference.windowed import window_grid

    spec = map_spec_of(fcn, options)
    layout = spec.layout
    windowed = options.method == "windowed"
    per_pixel = not windowed and is_segmenter(fcn)
    level = choose_level(reader, level=options.level, mpp=options.mpp)
    size = reader.levels[level].size
    view = LevelArray(reader, level, spec.channels, layout)
    grid: Geometry | PixelGrid | WindowGrid
    if per_pixel:
        grid = PixelGrid()
    elif windowed:  # the classifier's window at the stride asked for, offset 0
        grid = window_grid(fcn, options.stride).at(size)
    else:
        grid = geometry(fcn).at(size)
    map_size = grid.output_size(size)
    kept = _kept_cells(reader, source, options.mask, size, grid, map_size)
    return OpenInput(source, reader, level, size, view, layout, spec, per_pixel, grid, map_size, kept)


def certify(fcn, job: OpenInput, computed, shown: str | None, options: BatchOptions):
    """The certificate of the map ``computed`` (in the model's layout; None: a segmenter's) and its line."""
    if computed is None or not options.certify:
        return None, ""
    if shown is None:
        return None, f"no certificate: {_NO_SHOWN_OUTPUT}"
    return certificate_or_reason(
        fcn,
        job.view,
        computed,
        options.certify,
        input_size=options.certify_size,
        preprocess=preprocess_fn(options.preprocess, job.layout),
        keep=job.kept,
        output=shown if job.spec.several else None,
        stride=options.stride if options.method == "windowed" else None,
    )


def write_outputs(temporary: dict, job: OpenInput, maps: dict, shown, fraction, certificate, options) -> None:
    """Write every format of ``temporary`` (zarr: complete its attributes) from the filled ``maps``."""
    info = job.info(fraction, certificate, shown)
    shown_map = maps[shown] if shown is not None else None  # there is one wherever a format needs it
    if "zarr" in temporary:
        writers.finish_zarr(temporary["zarr"], info, job.spec.names if job.spec.several else ())
    if "ome-zarr" in temporary:
        names = options.class_names
        ome_zarr.finish(temporary["ome-zarr"], shown_map, info, mpp=job.reader.mpp, class_names=names)
    if "npz" in temporary:
        writers.write_npz(temporary["npz"], job.scores(maps), info)
    if "geojson" in temporary:
        writers.write_geojson(temporary["geojson"], shown_map, info, options.class_names, geojson=options.geojson)
    if "csv" in temporary:
        writers.write_csv(temporary["csv"], shown_map, info, options.class_names)


_NO_SHOWN_OUTPUT = (
    "the model has several outputs and none ends in a softmax or sigmoid: name the one to certify with "
    "`output=NAME` (CLI: --output-name NAME)."
)


def _shown_output(spec, output: str | None, *, required: bool) -> str | None:
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


def _compute(fcn, view, layout, grid, size, kept, scores, options: BatchOptions):
    """Fill ``scores`` (channels-last, NaN-filled; an `OutputMaps` of them for several outputs); return the
    share of the unmasked work computed and the map in the model's layout (``scores`` itself for
    channels-last).

    A mask reaches `predict_map` as its ``keep``: the staged plan then runs
    only the tiles the kept cells need, batched and prefetched as any pass.
    """
    from keras_fcn_surgery.inference.predict import predict_map

    preprocess = preprocess_fn(options.preprocess, layout)
    tile = map_tile(options, size, grid, kept)
    keep = None if kept is None or grid.global_context else kept
    fraction = work_fraction(fcn, size, tile, keep, options)
    method, stride = options.method, options.stride
    arguments = dict(
        tile=tile,
        batch_size=options.batch_size,
        preprocess=preprocess,
        progress=options.progress,
        engine=options.execution,
        method=method,
        stride=stride,
    )
    targets = list(scores.values()) if isinstance(scores, dict) else [scores]
    if layout.channels_last:
        computed = predict_map(fcn, view, out=scores, keep=keep, **arguments)
    else:
        computed = predict_map(fcn, view, keep=keep, **arguments)
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


def work_fraction(fcn, size, tile, keep, options: BatchOptions) -> float:
    """The share of the unmasked pass's work (MACs) that the pass keeping ``keep`` computes."""
    from keras_fcn_surgery.inference.staged import plan_prediction

    if keep is None:
        return 1.0
    # A windowed map: `keep` is over its windows (the grid is the windowed map's), `tile` tiles the shared prefix.
    method, stride = options.method, options.stride
    planned = plan_prediction(
        fcn, size, tile=tile, batch_size=options.batch_size, keep=keep, method=method, stride=stride
    )
    whole = plan_prediction(fcn, size, tile=tile, batch_size=options.batch_size, method=method, stride=stride)
    return planned.macs / max(whole.macs, 1)


def _segment(model, view, layout, size, kept, scores, options: BatchOptions) -> float:
    """A segmenter's logits, one per pixel, into ``scores``; returns the share of the tiles computed.

    The exact tiles of `segment_image`, through the same tile loop (batched,
    prefetched); tiles without a kept pixel are skipped.
    """
    preprocess = preprocess_fn(options.preprocess, layout)
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
    from keras_fcn_surgery.exporting.preprocessing import pixel_function

    return pixel_function(preprocess, layout.data_format)
