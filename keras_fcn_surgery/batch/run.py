"""`predict_images`: score maps for many images and whole slides, resumable and fault-tolerant.

The local engine runs the inputs one after another in this process; the Ray
engine (`keras_fcn_surgery.batch.ray_engine`) runs the same `predict_source`
on Ray workers. An input whose outputs exist is skipped; one that cannot be
read or computed is recorded as failed, by name, and the others go on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from keras_fcn_surgery.batch import writers
from keras_fcn_surgery.batch.cells import plan_tiles
from keras_fcn_surgery.batch.masks import cell_mask, read_mask, thumbnail, tissue_mask
from keras_fcn_surgery.batch.readers import LevelArray, choose_level, open_reader
from keras_fcn_surgery.batch.sources import IMAGE_SUFFIXES, Source, find_sources
from keras_fcn_surgery.errors import ConversionError, ModelFileError, first_line

# Images with a side longer than this are tiled when no tile is given (memory stays bounded).
LARGE_SIDE = 2048
# The tile side used then, and for skipping masked-out regions.
DEFAULT_TILE = 1024
PREPROCESS_MODES = ("none", "caffe", "tf", "torch")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class BatchOptions:
    """How each input is computed and written (see `predict_images` for the meaning of each)."""

    formats: tuple[str, ...] = ("npz",)
    tile: int | tuple[int, int] | None = None
    batch_size: int | None = None
    preprocess: str | Callable | None = None
    level: int | None = None
    mpp: float | None = None
    mask: str | None = None
    overwrite: bool = False
    class_names: tuple[str, ...] | None = None
    progress: bool | None = None


@dataclass(frozen=True)
class InputResult:
    """What happened to one input.

    Attributes:
        source: the input file.
        status: ``"done"``, ``"skipped"`` (its outputs existed) or ``"failed"``.
        outputs: the files written (or found, when skipped).
        message: why it failed.
        megapixels: pixels of the level the map was computed on, in millions.
        computed_fraction: the fraction of the image's tiles computed.
        seconds: time spent on it.
    """

    source: str
    status: str
    outputs: tuple[str, ...] = ()
    message: str = ""
    megapixels: float = 0.0
    computed_fraction: float = 0.0
    seconds: float = 0.0


@dataclass
class BatchSummary:
    """The results of a batch, one `InputResult` per input, in input order."""

    results: list[InputResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[InputResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """``"3 done, 1 skipped, 1 failed in 12.0 s (... MP/s ...)"``."""
        done = [r for r in self.results if r.status == "done"]
        megapixels = sum(r.megapixels for r in done)
        text = f"{len(done)} done, {self.count('skipped')} skipped, {len(self.failed)} failed in {self.seconds:.1f} s"
        if done and self.seconds > 0:
            computed = sum(r.megapixels * r.computed_fraction for r in done) / max(megapixels, 1e-12)
            text += (
                f" ({len(done) / self.seconds:.2f} images/s, {megapixels / self.seconds:.2f} MP/s; "
                f"{100 * computed:.1f}% of the pixels computed)"
            )
        return text


def predict_images(
    model,
    inputs,
    out_dir,
    *,
    formats="npz",
    tile=None,
    batch_size: int | None = None,
    preprocess=None,
    level: int | None = None,
    mpp: float | None = None,
    mask: str | None = None,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
    head: str = "window",
    input_size=None,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> BatchSummary:
    """Score maps for many images and whole slides, one output per input.

    A classifier is converted once (and verified); a fully convolutional model
    is used as it is. Each input is read level by level and region by region
    (pyramidal TIFF, OpenSlide formats), so memory stays bounded whatever its
    size. Outputs go to ``out_dir/<name>.<format>``, written atomically; an
    input whose outputs all exist is skipped unless ``overwrite``; one that
    fails is recorded with its error and the others go on.

    Args:
        model: a `keras.Model` or the path of a ``.keras``/``.h5`` file.
        inputs: image files, folders (searched recursively) and glob patterns.
        out_dir: the output folder (created when missing). Files found in a
            folder keep their path below it.
        formats: ``"npz"`` (``scores`` (H', W', K) float32 with the geometry),
            ``"zarr"`` (the same, chunked, written as tiles finish),
            ``"geojson"`` or ``"csv"`` (one polygon per cell, in level-0
            pixels, with its top class and probability); several as a list or
            ``"npz,geojson"``.
        tile: tile side in pixels (exact tiling); default: whole images up to
            2048 pixels a side, tiles of 1024 above.
        batch_size: tiles per forward pass (see `predict_map`).
        preprocess: ``"caffe"``, ``"tf"``, ``"torch"`` (keras.applications
            modes), a function of a pixel array, or None.
        level: the pyramid level to read (0, full resolution, by default).
        mpp: instead of ``level``, the level nearest this many microns per
            pixel (for files that record their resolution).
        mask: None or ``"none"``, ``"auto"`` (a tissue mask by Otsu's
            threshold on the smallest level), a mask image file (any
            resolution, non-zero is foreground), or a folder of mask images
            named like the inputs. Tiles without foreground are neither read
            nor computed; cells outside the mask are NaN.
        overwrite: recompute and replace existing outputs.
        class_names: names of the K classes for GeoJSON/CSV.
        head: for a classifier with a global-pooling head, see `convert`.
        input_size: the classifier's original input size when it takes any size.
        engine: ``"local"`` or ``"ray"`` (Ray Data; extra ``ray``).
        ray_address: the Ray cluster to join (default: ``RAY_ADDRESS``, else
            a local Ray started here).
        workers: Ray workers (default: one per CPU Ray sees, or per GPU).
        progress: tqdm bars over inputs and tiles; default when stderr is a terminal.

    Returns:
        A `BatchSummary`.

    Raises:
        ModelFileError: for inputs that name no file, a model that cannot be
            loaded, or an unusable option; raised before any input is computed.
        ConversionError: for a classifier that cannot be converted.
    """
    options = BatchOptions(
        formats=writers.check_formats(formats),
        tile=tile,
        batch_size=batch_size,
        preprocess=_check_preprocess(preprocess),
        level=level,
        mpp=mpp,
        mask=_check_mask(mask),
        overwrite=overwrite,
        class_names=tuple(class_names) if class_names is not None else None,
        progress=progress,
    )
    if level is not None and mpp is not None:
        raise ModelFileError("Give a pyramid level or a resolution in microns per pixel (mpp), not both.")
    if engine not in ENGINES:
        raise ModelFileError(f"Expected `engine` to be one of {ENGINES}. Received: engine={engine!r}")
    sources = find_sources(inputs)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ModelFileError(f"Output folder '{out_dir}' is a file.")
    fcn = prepare_model(model, head=head, input_size=input_size)
    _check_class_names(fcn, options.class_names)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    if engine == "ray":
        from keras_fcn_surgery.batch.ray_engine import run_on_ray

        results = run_on_ray(fcn, sources, out_dir, options, address=ray_address, workers=workers)
    else:
        results = []
        with _bar(len(sources), progress) as bar:
            for source in sources:
                results.append(predict_source(fcn, source, out_dir, options))
                bar.update(1)
    return BatchSummary(results, time.perf_counter() - start)


def prepare_model(model, *, head: str = "window", input_size=None):
    """The FCN to run: ``model`` (or the file it names) as is when fully convolutional, else converted and verified."""
    from keras_fcn_surgery.graph import is_fully_convolutional
    from keras_fcn_surgery.saving.loading import as_model
    from keras_fcn_surgery.surgery.convert import convert

    model = as_model(model)
    if is_fully_convolutional(model):
        return model
    return convert(model, head=head, input_size=input_size)


def predict_source(fcn, source: Source, out_dir: str, options: BatchOptions) -> InputResult:
    """Compute and write the outputs of one input; never raises for a bad input (the result says why)."""
    start = time.perf_counter()
    paths = writers.output_paths(out_dir, source.name, options.formats)
    missing = paths if options.overwrite else {f: p for f, p in paths.items() if not os.path.exists(p)}
    if not missing:
        return InputResult(source.path, "skipped", tuple(paths.values()))
    try:
        megapixels, fraction = _compute_and_write(fcn, source, missing, options)
    except (ConversionError, OSError) as error:
        return _failed(source, str(error), start)
    except Exception as error:  # a decoder's or the network's error on this input must not stop the others
        return _failed(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    return InputResult(
        source.path, "done", tuple(paths.values()), "", megapixels, fraction, time.perf_counter() - start
    )


def _failed(source: Source, message: str, start: float) -> InputResult:
    if source.path not in message:
        message = f"'{source.path}': {message}"
    return InputResult(source.path, "failed", message=message, seconds=time.perf_counter() - start)


def _compute_and_write(fcn, source: Source, paths: dict[str, str], options: BatchOptions) -> tuple[float, float]:
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.graph import model_layout

    layout = model_layout(fcn)
    channels = int(layout.channels(fcn.inputs[0].shape))
    classes = int(layout.channels(fcn.outputs[0].shape))
    with open_reader(source.path) as reader:
        level = choose_level(reader, level=options.level, mpp=options.mpp)
        size = reader.levels[level].size
        view = LevelArray(reader, level, channels, layout)
        grid = kfs.geometry(fcn).at(size)
        map_size = grid.output_size(size)
        kept = _kept_cells(reader, source, options.mask, size, grid, map_size)
        with writers.staged_outputs(paths, overwrite=options.overwrite) as temporary:
            shape = (map_size[0], map_size[1], classes)
            if "zarr" in temporary:
                scores = writers.create_zarr_scores(temporary["zarr"], shape)
            else:
                scores = np.full(shape, np.nan, dtype=np.float32)
            fraction = _compute(fcn, view, layout, grid, size, kept, scores, options)
            info = writers.MapInfo(
                source=source.path,
                level=level,
                downsample=reader.levels[level].downsample,
                level_size=size,
                stride=grid.stride,
                offset=grid.offset,
                receptive_field=grid.receptive_field,
                computed_fraction=fraction,
            )
            if "zarr" in temporary:
                writers.finish_zarr(temporary["zarr"], info)
            if "npz" in temporary:
                writers.write_npz(temporary["npz"], scores, info)
            if "geojson" in temporary:
                writers.write_geojson(temporary["geojson"], scores, info, options.class_names)
            if "csv" in temporary:
                writers.write_csv(temporary["csv"], scores, info, options.class_names)
    return size[0] * size[1] / 1e6, fraction


def _compute(fcn, view, layout, grid, size, kept, scores, options: BatchOptions) -> float:
    """Fill ``scores`` (channels-last, NaN-filled) and return the fraction of the tiles computed."""
    import keras_fcn_surgery as kfs

    preprocess = preprocess_fn(options.preprocess, layout)
    tile = options.tile
    if tile is None and max(size) > LARGE_SIDE and not grid.global_context:  # such networks cannot be tiled
        tile = DEFAULT_TILE
    if kept is None or grid.global_context:
        if layout.channels_last:
            kfs.predict_map(
                fcn,
                view,
                tile=tile,
                out=scores,
                batch_size=options.batch_size,
                preprocess=preprocess,
                progress=options.progress,
            )
        else:
            whole = kfs.predict_map(
                fcn, view, tile=tile, batch_size=options.batch_size, preprocess=preprocess, progress=options.progress
            )
            scores[:] = layout.image_to_channels_last(whole)
        if kept is not None:  # a network with global context: nothing to skip, but the mask still applies
            _apply_mask(scores, kept)
        return 1.0
    tiles = plan_tiles(size, grid, tile or DEFAULT_TILE)
    computed = 0
    with _bar(len(tiles), options.progress, unit="tile") as bar:
        for rows, cols in tiles:
            out_rows, out_cols = slice(rows.out_start, rows.out_stop), slice(cols.out_start, cols.out_stop)
            keep = kept[out_rows, out_cols]
            bar.update(1)
            if not keep.any():
                continue
            computed += 1
            pixels = view[layout.image_index(slice(rows.start, rows.stop), slice(cols.start, cols.stop))]
            cell_map = kfs.predict_map(fcn, pixels, preprocess=preprocess, batch_size=1, progress=False)
            cell_map = layout.image_to_channels_last(cell_map)[
                rows.keep_start : rows.keep_stop, cols.keep_start : cols.keep_stop
            ]
            scores[out_rows, out_cols] = np.where(keep[..., None], cell_map, np.float32(np.nan))
    return computed / len(tiles)


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
    from keras_fcn_surgery.export.preprocessing import pixel_function

    return pixel_function(preprocess, layout.data_format)


def _check_preprocess(preprocess):
    if preprocess is None or callable(preprocess) or preprocess in PREPROCESS_MODES:
        return preprocess
    raise ModelFileError(
        f"Expected `preprocess` to be a function or one of {PREPROCESS_MODES}. Received: preprocess={preprocess!r}"
    )


def _check_mask(mask):
    if mask is None or mask == "none":
        return None
    if mask == "auto":
        return mask
    mask = os.path.abspath(os.fspath(mask))
    if not os.path.exists(mask):
        raise ModelFileError(f"Mask '{mask}' does not exist. Give `auto`, `none`, a mask image or a folder of them.")
    return mask


def _check_class_names(fcn, class_names) -> None:
    if class_names is None:
        return
    from keras_fcn_surgery.graph import model_layout

    classes = int(model_layout(fcn).channels(fcn.outputs[0].shape))
    if len(class_names) != classes:
        raise ModelFileError(f"{len(class_names)} class names were given; the model has {classes} classes.")


def _bar(total: int, progress: bool | None, unit: str = "images"):
    from keras_fcn_surgery.inference.runner import progress_bar

    return progress_bar(total, progress, unit)
