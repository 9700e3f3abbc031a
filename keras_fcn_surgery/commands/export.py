"""``keras-fcn-surgery export MODEL EXPORT_DIR``: a TF Serving SavedModel (or ONNX, TFLite, OpenVINO), checked after
writing."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from keras_fcn_surgery.commands.common import (
    EXIT_OK,
    EXIT_USAGE,
    PRECISIONS,
    add_custom_objects_argument,
    load_source,
    parse_size,
)
from keras_fcn_surgery.options import EXPORT_FORMATS, HEADS, ONNX_EXPORTERS, PREPROCESS_MODES, QUANTIZE_MODES


def parse_version(text: str) -> int:
    """``"3"`` -> ``3``; versions are non-negative integers."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a classifier's FCN as a TF Serving SavedModel, ONNX, TFLite or OpenVINO model, reloaded, checked",
        description=(
            "Convert MODEL (unless --no-convert) and write EXPORT_DIR/<version>/ with signatures "
            "serving_default (float32 model-ready images [-1,-1,-1,C] -> scores), serving_pixels (raw "
            "0..255 pixels, --preprocess applied; only with a --preprocess) and serving_bytes (encoded "
            "JPEG/PNG strings, all of one size per request, --preprocess applied). --format onnx or "
            "tflite writes one file instead, --format openvino a folder with model.xml and model.bin. "
            "The export is loaded in a fresh process and compared "
            "with Keras at two sizes before it is moved into place; SIGTERM or Ctrl-C leaves nothing."
        ),
    )
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument(
        "export_dir",
        help="SavedModel base folder (--format onnx/tflite/torch: the .onnx/.tflite/.pt2 file to write; openvino: "
        "the folder)",
    )
    parser.add_argument("--version", type=parse_version, help="version folder (default: the next integer)")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="none",
        help="what serving_pixels and serving_bytes do to the raw 0-255 pixels (default: none)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version (or .onnx file)")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="savedmodel",
        help="savedmodel (default), onnx, tflite, openvino or torch (.pt2)",
    )
    parser.add_argument(
        "--exporter",
        choices=ONNX_EXPORTERS,
        help="onnx only: streamed (default; the weights streamed into the file) or keras (Keras's model.export)",
    )
    parser.add_argument(
        "--quantize",
        choices=[mode for mode in QUANTIZE_MODES if mode],
        help="tflite only: float16 or dynamic (int8 weights); the measured difference is reported",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="what the written network computes at: float32 (default), bfloat16 or float16 (tflite: float16 "
        "weights; tflite and openvino take no bfloat16), checked against the float32 model at the precision's "
        "tolerance (bfloat16 6e-2, float16 2e-2 of the output scale)",
    )
    parser.add_argument("--no-convert", action="store_true", help="MODEL is already an FCN: export it as it is")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.add_argument(
        "--stride",
        type=parse_size,
        metavar="N|HxW",
        help="export the FCN's map at this stride in pixels instead of its own: a divisor of the FCN's stride (the "
        "FCN à trous), or any stride below it reached from the finest exact one (every few cells kept); the "
        "export is checked against that network",
    )
    add_custom_objects_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    import keras_fcn_surgery as kfs

    if args.format != "savedmodel" and (args.version is not None or args.preprocess != "none"):
        print("error: --version and --preprocess apply to --format savedmodel only.", file=sys.stderr)
        return EXIT_USAGE
    if args.quantize and args.format != "tflite":
        print("error: --quantize applies to --format tflite only.", file=sys.stderr)
        return EXIT_USAGE
    if args.exporter and args.format != "onnx":
        print("error: --exporter applies to --format onnx only.", file=sys.stderr)
        return EXIT_USAGE
    shared = kfs.ExportOptions(
        convert=not args.no_convert, head=args.head, input_size=args.input_size, precision=args.precision
    )
    options: dict = {}
    if args.format == "savedmodel":
        options.update(version=args.version, preprocess=args.preprocess)
    elif args.format == "tflite":
        options.update(quantize=args.quantize)
    elif args.format == "onnx" and args.exporter:
        options.update(exporter=args.exporter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", kfs.UninformativeVerificationWarning)
        try:
            model = load_source(args)
            if args.stride is not None:
                # The FCN computing the map at --stride (`prepare` routes it: à trous, or thinned from the finest
                # exact stride below), exported as its own network.
                if shared.convert:
                    model = kfs.convert(model, head=args.head, input_size=args.input_size)
                model = kfs.prepare(model, stride=args.stride, method="fcn").runnable
                shared = dataclasses.replace(shared, convert=False)
            result = kfs.export(
                model, args.export_dir, format=args.format, options=shared, overwrite=args.overwrite, **options
            )
        finally:
            for warning in caught:
                if issubclass(warning.category, kfs.UninformativeVerificationWarning):
                    print(f"warning: {warning.message}", file=sys.stderr)
    print(result)
    return EXIT_OK
