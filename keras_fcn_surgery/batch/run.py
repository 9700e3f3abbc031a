"""`predict_images`: score maps for many images and whole slides, resumable and fault-tolerant.

The local engine runs the inputs one after another in this process; the Ray
engine (`keras_fcn_surgery.batch.ray_engine`) runs the same `predict_source`
on Ray workers. An input whose outputs exist is skipped; one that cannot be
read or computed is recorded as failed, by name, and the others go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from keras_fcn_surgery.batch.job import ONE_MAP_FORMATS, BatchOptions, InputResult, predict_source, prepare_mapper
from keras_fcn_surgery.batch.ome_zarr import check_version as check_ome_zarr_version
from keras_fcn_surgery.batch.outputs import check_formats, summary_line
from keras_fcn_surgery.batch.ray_engine import run_on_ray
from keras_fcn_surgery.batch.regions import check_available as check_regions_available
from keras_fcn_surgery.batch.requirements import check_packages
from keras_fcn_surgery.batch.shards import (
    LOCAL_REGION_PIXELS,
    check_shard_rows,
    check_shards,
    cuts_into_regions,
    predict_source_sharded,
)
from keras_fcn_surgery.batch.sources import find_sources
from keras_fcn_surgery.batch.writers import check_geojson, check_map_names
from keras_fcn_surgery.errors import ConversionError, InputError, ModelFileError
from keras_fcn_surgery.inference.certificate import DEFAULT_CELLS, check_cell_count
from keras_fcn_surgery.inference.engines import check_engine, check_precision
from keras_fcn_surgery.inference.heatmap import class_names_for
from keras_fcn_surgery.inference.mapper import MapMethod, Mapper
from keras_fcn_surgery.inference.runner import progress_bar
from keras_fcn_surgery.options import DEFAULT_OME_ZARR_VERSION, PREPROCESS_MODES
from keras_fcn_surgery.saving.atomic import Interrupted
from keras_fcn_surgery.saving.loading import as_model

ENGINES = ("local", "ray")
# `predict_images`'s keywords besides formats, engine, certify and progress, with their defaults.
_JOB_OPTIONS = {
    "geojson": "regions",
    "ome_zarr_version": DEFAULT_OME_ZARR_VERSION,
    "tile": None,
    "batch_size": None,
    "preprocess": None,
    "level": None,
    "mpp": None,
    "mask": None,
    "overwrite": False,
    "class_names": None,
    "head": "window",
    "input_size": None,
    "ray_address": None,
    "workers": None,
    "execution": "auto",
    "precision": "float32",
    "output": None,
    "method": "auto",
    "stride": None,
    "shards": None,
    "shard_rows": None,
    "on_result": None,
}


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
        return summary_line(self.results, self.seconds)


def predict_images(
    model,
    inputs,
    out_dir,
    *,
    formats="npz",
    engine: str = "local",
    certify: int = DEFAULT_CELLS,
    progress: bool | None = None,
    **options,
) -> BatchSummary:
    """Score maps for many images and whole slides, one output per input.

    A classifier is converted once (and verified); a fully convolutional model
    is used as it is. A classifier without an exact FCN (a transformer, which
    does not convert, or a network that pools over the whole window:
    squeeze-and-excitation) gets its windowed map (``method``): its output on
    every crop at ``stride``, exactly, as `predict_map` computes it. Each
    input is read level by level and region by region
    (pyramidal TIFF, OpenSlide formats), so memory stays bounded whatever its
    size; a DICOM whole-slide image is a folder of its instances (or one of
    them), read through OpenSlide 4. Outputs go to ``out_dir/<name>.<format>``, written atomically; an
    input whose outputs all exist is skipped unless ``overwrite``; one that
    fails is recorded with its error and the others go on.

    Args:
        model: a `keras.Model` or the path of a ``.keras``/``.h5`` file.
        inputs: image files, folders (searched recursively) and glob patterns.
        out_dir: the output folder (created when missing). Files found in a folder keep their path below it.
        formats: ``"npz"`` (``scores`` (H', W', K) float32 with the geometry; for a segmenter (`segmenter`), ``(H,
            W, K)`` logits, one per pixel, with stride 1, offset 0 and a one-pixel window; for a model with several
            outputs, each output's map under its name, and ``outputs``, the names in order), ``"zarr"`` (the same,
            chunked, written as tiles finish), ``"ome-zarr"`` (``<name>.ome.zarr``: an OME-Zarr image for
            viewers, NGFF 0.4 or 0.5 (``ome_zarr_version``), written as tiles finish: the scores as channels ``c, y,
            x`` named by ``class_names``, a pyramid
            of 2 x 2 means, top-class labels (class k as k + 1, 0 where not computed), each cell placed at its
            window's centre on the slide, in micrometres when the slide records its resolution; see
            `batch.ome_zarr`), ``"geojson"`` (polygons in level-0 pixels: see ``geojson``), ``"csv"`` (one row per
            cell: its box in level-0 pixels, top class and probability; for a segmenter, one row per connected
            region of a class, with its pixel count, mean probability and box), ``"dicom"`` (``<name>.dicom/``: for
            a DICOM slide, its scores as a tiled float32 DICOM Parametric Map and their top class as a Segmentation,
            in the slide's study; see `batch.dicom`; needs highdicom); several as a list or ``"npz,geojson"``.
        engine: ``"local"`` or ``"ray"`` (Ray Data; extra ``ray``).
        progress: tqdm bars over inputs and tiles; default when stderr is a terminal.
        certify: cells of each score map to compare with the classifier on the crops they stand for (`certify_map`;
            0: none). The figures go into the npz/zarr metadata as ``certificate_<name>`` and into each
            `InputResult`'s ``certificate`` line; an `InexactMapWarning` says when cells differ (``same`` padding).
            Segmenters' per-pixel maps are not certified; of a model with several outputs, the map of ``output`` is
            (``certificate_output`` names it).
        **options: the map and the job, as keywords (an unknown one is a `TypeError`):

            - ``geojson``: what a GeoJSON output holds: ``"regions"`` (default), one polygon (with holes) per
              connected region of neighbouring cells with the same top class, covering exactly the union of their
              boxes, with the class, cell count and the mean and largest probability of the class (needs
              scikit-image); or ``"cells"``, one polygon per computed cell (a segmenter's: per pixel) with its top
              class and probability.
            - ``ome_zarr_version``: the NGFF version of an OME-Zarr output: ``"0.4"`` on Zarr v2 (default), which
              QuPath (through Bio-Formats), OMERO and napari open, or ``"0.5"`` on Zarr v3, which napari (ome-zarr
              >= 0.12) opens and the Java viewers do not yet.
            - ``tile``: tile side in pixels (exact tiling); default: whole images up to 2048 pixels a side, tiles of
              1024 above.
            - ``batch_size``: tiles per forward pass (see `predict_map`).
            - ``preprocess``: ``"caffe"``, ``"tf"``, ``"torch"`` (keras.applications modes), a function of a pixel
              array, or None.
            - ``level``: the pyramid level to read (0, full resolution, by default).
            - ``mpp``: instead of ``level``, the level nearest this many microns per pixel (for files that record
              their resolution: TIFF tags, OME-XML, Aperio, OpenSlide and DICOM properties).
            - ``mask``: None or ``"none"``, ``"auto"`` (a tissue mask by Otsu's threshold on the smallest level), a
              mask image file (any resolution, non-zero is foreground), or a folder of mask images named like the
              inputs. Tiles without foreground are neither read nor computed; cells outside the mask are NaN.
            - ``overwrite``: recompute and replace existing outputs.
            - ``class_names``: names of the K classes for GeoJSON/CSV/OME-Zarr (of the output they describe).
            - ``head``: for a classifier with a global-pooling head, see `convert`.
            - ``input_size``: the classifier's original input size when it takes any size.
            - ``ray_address``: the Ray cluster to join (default: ``RAY_ADDRESS``, else a local Ray started here).
            - ``workers``: Ray workers (default: one per CPU Ray sees, or per GPU).
            - ``execution``: how each forward pass runs, `predict_map`'s ``engine``: ``"auto"`` (measured on this
              machine), ``"tf"``, ``"xla"`` or ``"blas"``. (Here ``engine`` already names where the inputs run,
              locally or on Ray.)
            - ``precision``: what the maps are computed at, as for `predict_map`: ``"float32"`` (default),
              ``"bfloat16"`` or ``"float16"``; stored in float32 either way, recorded as ``precision`` beside the
              map (npz, zarr), and certified at the precision's tolerance.
            - ``output``: for a model with several outputs, the one GeoJSON, CSV and OME-Zarr describe and
              ``certify`` certifies; default: the first that ends in a softmax or sigmoid (npz and zarr hold every
              output, each under its name). The outputs must share one grid (`geometry`).
            - ``method``: how a classifier's maps are computed, as for `predict_map`: ``"auto"`` (default: its FCN
              where that is exact at ``stride``, else windowed), ``"fcn"`` or ``"windowed"`` (the classifier on
              every crop at ``stride``, through a shared prefix; one cell per window, ``H' = (H - h) // s_h + 1``).
              The outputs then record the windowed map's geometry: stride ``stride``, the classifier's input size as
              receptive field, offset 0, so GeoJSON boxes, CSV rows, OME-Zarr placement and masks follow its
              windows; a mask skips the windows whose cells it masks out; certificates compare cells with the
              classifier on their crops (exact to float round-off).
            - ``stride``: pixels between windows, ``s`` or ``(s_h, s_w)``, for a windowed map: a multiple of the
              stride of the classifier's shared prefix (an `InputError` names it otherwise); default: its FCN's
              stride (a classifier without an FCN needs one). For an FCN only its own stride is accepted.
            - ``shards``: None (each input in one piece, except: on Ray every input whose pass is tiled, and
              locally one of at least 10,000 x 10,000 pixels, is cut into regions by its size, the workers and
              the memory budget, `batch.shards.region_count`), or cut each input's map into up to this many regions,
              bands of whole chunk rows with about the same number of kept cells, computed one by one (the Ray
              engine: on any worker) into a zarr store in ``out_dir/.shards-<name>/``; the outputs are written from
              it once every region is done. The maps are the same bytes for any number of shards; an interrupted run
              leaves that folder, and the next run with the same model, input and options computes only the regions
              not yet done (see `batch.shards`). The execution (``"auto"`` resolved once) is fixed per input, so
              every region runs the same one.
            - ``shard_rows``: map rows (and columns) per chunk of that store, the smallest region (default 256).
            - ``on_result``: called with each input's `InputResult` as soon as it is finished (with Ray, once the job
              is), so that what is done is reported even if the job is interrupted later.

    Returns:
        A `BatchSummary`.

    Raises:
        ModelFileError: for inputs that name no file, or a model that cannot
            be loaded; raised before any input is computed.
        InputError: for an unusable option (formats, geojson, level with mpp,
            preprocess, engine, execution, method, stride, class names, a
            missing optional package),
            also before any input is computed.
        ConversionError: for a classifier that cannot be converted.
    """
    unknown = sorted(set(options) - set(_JOB_OPTIONS))
    if unknown:
        raise TypeError(
            f"predict_images() got an unexpected keyword argument {unknown[0]!r}; it takes formats, engine, certify, "
            f"progress, {', '.join(sorted(_JOB_OPTIONS))}"
        )
    given = {**_JOB_OPTIONS, **options}
    tile, batch_size, preprocess, level, mpp, mask, overwrite, class_names, execution, output, shards, shard_rows = (
        given[k]
        for k in (
            "tile",
            "batch_size",
            "preprocess",
            "level",
            "mpp",
            "mask",
            "overwrite",
            "class_names",
            "execution",
            "output",
            "shards",
            "shard_rows",
        )
    )
    job = BatchOptions(
        formats=check_formats(formats),
        geojson=check_geojson(given["geojson"]),
        ome_zarr_version=check_ome_zarr_version(given["ome_zarr_version"]),
        tile=tile,
        batch_size=batch_size,
        preprocess=_check_preprocess(preprocess),
        level=level,
        mpp=mpp,
        mask=_check_mask(mask),
        overwrite=overwrite,
        class_names=tuple(class_names_for(class_names, 1000)) if class_names == "imagenet" else _names(class_names),
        progress=progress,
        execution=check_engine(execution),
        precision=check_precision(given["precision"]),
        output=output,
        shards=check_shards(shards),
        shard_rows=check_shard_rows(shard_rows),
    )
    if level is not None and mpp is not None:
        raise InputError("Give a pyramid level or a resolution in microns per pixel (mpp), not both.")
    if engine not in ENGINES:
        raise InputError(f"Expected `engine` to be one of {ENGINES}. Received: engine={engine!r}")
    check_packages(job.formats, geojson=job.geojson, mask=job.mask, engine=engine)
    if "geojson" in job.formats and job.geojson == "regions":
        check_regions_available()
    sources = find_sources(inputs)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ModelFileError(f"Output folder '{out_dir}' is a file.")
    if certify:
        check_cell_count(certify, "certify")
    loaded = as_model(model, None, error_class=ConversionError)  # kept: the certificates run the classifier
    method = MapMethod(given["method"], given["stride"], given["head"], _pair_or_none(given["input_size"]))
    mapper = prepare_mapper(loaded, job, method)
    job = replace(job, method=mapper.method, stride=mapper.stride, certify=certify or 0)
    job = _check_outputs(mapper, job)
    on_result = given["on_result"]

    results: list = []
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    try:
        if engine == "ray":
            where = {"address": given["ray_address"], "workers": given["workers"]}
            results = run_on_ray(mapper, sources, out_dir, job, **where)
            for result in results if on_result is not None else ():
                on_result(result)
        else:
            with progress_bar(len(sources), progress, "images") as bar:
                for source in sources:
                    if job.shards or cuts_into_regions(source, out_dir, job, LOCAL_REGION_PIXELS):  # large: resumable
                        results.append(predict_source_sharded(mapper, source, out_dir, job, job.shards))
                    else:
                        results.append(predict_source(mapper, source, out_dir, job))
                    if on_result is not None:
                        on_result(results[-1])
                    bar.update(1)
    except (KeyboardInterrupt, Interrupted) as stop:
        if engine != "ray":  # Ray's results come back at the end: none is known here
            done = sum(r.status in ("done", "skipped") for r in results)
            stop.add_note(f"{done} of {len(sources)} inputs have their outputs; rerun to do the rest.")
        raise
    finally:
        if created and not os.listdir(out_dir):  # nothing written (failed, interrupted): leave nothing behind
            os.rmdir(out_dir)
    return BatchSummary(results, time.perf_counter() - start)


def _pair_or_none(size):
    return None if size is None else (int(size[0]), int(size[1]))


def _check_preprocess(preprocess):
    if preprocess is None or callable(preprocess) or preprocess in PREPROCESS_MODES:
        return preprocess
    raise InputError(
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


def _names(class_names):
    return tuple(class_names) if class_names is not None else None


def _check_outputs(mapper: Mapper, options):
    """Before any input: the output GeoJSON/CSV describe, its class names (`class_names_for`: returned in the
    options), and maps every format can hold."""
    spec = mapper.spec
    if options.output is not None or options.class_names is not None or set(ONE_MAP_FORMATS) & set(options.formats):
        shown = spec.outputs[spec.output_index(options.output)]  # an unknown name is refused here
        names = class_names_for(options.class_names, shown.classes)
        options = replace(options, class_names=tuple(names) if names is not None else None)
        names = class_names_for(options.class_names, shown.classes)
        options = replace(options, class_names=tuple(names) if names is not None else None)
        if options.class_names is not None and len(options.class_names) != shown.classes:
            where = f" (output {shown.name!r})" if spec.several else ""
            raise InputError(
                f"{len(options.class_names)} class names were given; the model has {shown.classes} classes{where}."
            )
    if spec.several:
        check_map_names(spec.names)
        _ = mapper.grid  # raises, naming each output's grid, when the outputs do not share one
    return options
