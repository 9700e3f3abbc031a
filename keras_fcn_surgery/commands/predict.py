"""``keras-fcn-surgery predict MODEL INPUT... --out DIR``: score maps for many images and whole slides."""

from __future__ import annotations

import os
import sys

from keras_fcn_surgery.commands.common import (
    CLASS_NAMES_HELP,
    EXIT_CONVERSION,
    EXIT_OK,
    EXIT_USAGE,
    PREPROCESS_HELP,
    add_certify_argument,
    add_custom_objects_argument,
    add_execution_argument,
    add_method_arguments,
    cli_message,
    load_source,
    parse_size,
    positive_int,
    read_class_names,
)
from keras_fcn_surgery.options import (
    DEFAULT_OME_ZARR_VERSION,
    GEOJSON_FEATURES,
    OME_ZARR_VERSIONS,
    OUTPUT_FORMATS,
    PREPROCESS_MODES,
)

_FORMATS = ", ".join(OUTPUT_FORMATS)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score maps for many images and whole slides (folders, globs, pyramidal TIFF, SVS...), resumable",
        description=(
            "Run a classifier (converted once and verified, or windowed where it has no exact FCN: --method) or an "
            "FCN over every input and write one output per input. Reruns skip inputs whose outputs exist. Exit code "
            "1 when an input failed (the others finish), 2 when every failure is the input's own (an unreadable "
            "file, an image smaller than the network...)."
        ),
    )
    parser.add_argument("model", help="classifier (.keras/.h5, converted here) or an already converted FCN")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (recursive; a folder of DICOM instances is one slide) or glob patterns",
    )
    parser.add_argument("-o", "--out", required=True, help="output folder (created when missing)")
    parser.add_argument(
        "--format", default="npz", help=f"output formats, comma-separated, among {_FORMATS} (default npz)"
    )
    parser.add_argument(
        "--geojson",
        choices=GEOJSON_FEATURES,
        default="regions",
        help="GeoJSON features: regions (default: one polygon per connected region of neighbouring cells with the "
        "same top class) or cells (one polygon per cell)",
    )
    parser.add_argument(
        "--ome-zarr-version",
        choices=OME_ZARR_VERSIONS,
        default=DEFAULT_OME_ZARR_VERSION,
        help="NGFF version of --format ome-zarr: 0.4 (Zarr v2: QuPath/Bio-Formats, OMERO, napari) or 0.5 (Zarr v3: "
        f"napari with ome-zarr >= 0.12); default {DEFAULT_OME_ZARR_VERSION}",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute inputs whose outputs exist")
    parser.add_argument("--tile", type=positive_int, help="tile side in pixels (exact; default 1024 above 2048 a side)")
    parser.add_argument("--batch-size", type=int, help="tiles per forward pass")
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="none",
        help=PREPROCESS_HELP,
    )
    parser.add_argument("--head", choices=("window", "dense"), default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--level", type=int, help="pyramid level to read (default 0, full resolution)")
    where.add_argument("--mpp", type=float, help="read the level nearest this many microns per pixel")
    parser.add_argument(
        "--mask",
        default="none",
        help="auto (tissue by Otsu on a low-resolution level), none, a mask image, or a folder of masks named "
        "like the inputs",
    )
    parser.add_argument(
        "--output-name",
        metavar="NAME",
        help="for a model with several outputs, the one GeoJSON/CSV/OME-Zarr describe (default: the first ending "
        "in a softmax or sigmoid; npz/zarr hold every output)",
    )
    parser.add_argument("--class-names", help=f"{CLASS_NAMES_HELP} (GeoJSON/CSV/OME-Zarr)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or Ray Data")
    add_execution_argument(parser)
    add_method_arguments(parser)
    add_certify_argument(parser)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--workers", type=int, help="Ray workers (default: one per CPU, or per GPU)")
    parser.add_argument(
        "--shards",
        type=positive_int,
        metavar="N",
        help="cut each input's map into up to N regions (bands of whole chunk rows), computed one by one or on "
        "any Ray worker and resumed by region after an interruption; the same bytes for any N (default: by "
        "its size, the workers and the memory budget under --engine ray, and locally from 10,000 x 10,000 "
        "pixels; else one piece)",
    )
    parser.add_argument(
        "--shard-rows", type=positive_int, metavar="R", help="map rows per chunk of the regions' store (default 256)"
    )
    add_custom_objects_argument(parser)
    parser.set_defaults(run=run, early=nothing_to_do)


def nothing_to_do(args) -> int | None:
    """Before TensorFlow starts: refuse a job whose packages are missing (all named at once); when every
    input's outputs exist (and no --overwrite), say so and stop."""
    import time
    from types import SimpleNamespace

    from keras_fcn_surgery.batch.outputs import check_formats, output_paths, summary_line
    from keras_fcn_surgery.batch.requirements import check_packages
    from keras_fcn_surgery.batch.sources import find_sources

    formats = check_formats(args.format)
    check_packages(formats, geojson=args.geojson, mask=args.mask, engine=args.engine)  # all at once, first
    if args.overwrite:
        return None
    start = time.perf_counter()
    sources = find_sources(args.inputs)
    for source in sources:
        if not all(os.path.exists(p) for p in output_paths(args.out, source.name, formats).values()):
            return None
    skipped = [SimpleNamespace(status="skipped", megapixels=0.0, computed_fraction=0.0) for _ in sources]
    print(f"predict: {summary_line(skipped, time.perf_counter() - start)}")
    return EXIT_OK


def run(args) -> int:
    from keras_fcn_surgery.batch.run import predict_images

    # SIGINT/SIGTERM unwind through the writers (cli.main installs the handlers), so nothing partial stays.
    summary = predict_images(
        load_source(args) if args.custom_objects else args.model,
        args.inputs,
        args.out,
        formats=args.format,
        geojson=args.geojson,
        ome_zarr_version=args.ome_zarr_version,
        tile=args.tile,
        batch_size=args.batch_size,
        preprocess=args.preprocess,
        level=args.level,
        mpp=args.mpp,
        mask=args.mask,
        overwrite=args.overwrite,
        class_names=read_class_names(args.class_names),
        head=args.head,
        input_size=args.input_size,
        engine=args.engine,
        execution=args.execution,
        precision=args.precision,
        method=args.method,
        stride=args.stride,
        ray_address=args.ray_address,
        workers=args.workers,
        progress=None,
        output=args.output_name,
        certify=args.certify,
        shards=args.shards,
        shard_rows=args.shard_rows,
        on_result=lambda result: _report(result, args.mask, cli_message),
    )
    print(f"predict: {summary.line()}")
    if summary.ok:
        return EXIT_OK
    # Inputs that failed only for themselves (smaller than the network...) are usage errors, as in every command.
    return EXIT_USAGE if all(result.input_error for result in summary.failed) else EXIT_CONVERSION


def _report(result, mask, cli_message) -> None:
    """One input's lines, flushed as soon as it is finished: kept when stdout is a file and the job is
    interrupted later."""
    if result.status == "done" and mask != "none":
        print(f"{result.source}: {100 * result.computed_fraction:.1f}% of the tiles computed", flush=True)
    if result.status == "done" and result.certificate:
        print(f"{result.source}: {cli_message(result.certificate)}", flush=True)
    if result.status == "failed":
        print(f"failed: {result.message}", file=sys.stderr, flush=True)
