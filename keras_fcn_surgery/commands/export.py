"""``keras-fcn-surgery export MODEL EXPORT_DIR``: a TF Serving SavedModel (or an ONNX file), checked after writing."""

from __future__ import annotations

import argparse
import sys

from keras_fcn_surgery.commands.common import EXIT_OK, EXIT_USAGE, parse_size

FORMATS = ("savedmodel", "onnx")
# Spelled out (not imported from the library) so that building the parser does not load TensorFlow.
HEADS = ("window", "dense")
PREPROCESS_MODES = ("none", "caffe", "tf", "torch")


def parse_version(text: str) -> int:
    """``"3"`` -> ``3``; versions are non-negative integers."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a classifier's FCN as a TF Serving SavedModel (or ONNX), reloaded and checked",
        description=(
            "Convert MODEL (unless --no-convert) and write EXPORT_DIR/<version>/ with signatures "
            "serving_default (float32 images [-1,-1,-1,C] -> scores) and serving_bytes (encoded "
            "JPEG/PNG strings, all of one size per request). The export is reloaded in a fresh "
            "TensorFlow process and compared with Keras at two sizes before it is moved into place."
        ),
    )
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument("export_dir", help="SavedModel base folder (with --format onnx: the .onnx file to write)")
    parser.add_argument("--version", type=parse_version, help="version folder (default: the next integer)")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument(
        "--preprocess", choices=PREPROCESS_MODES, default="none", help="what serving_bytes does to decoded pixels"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version (or .onnx file)")
    parser.add_argument("--format", choices=FORMATS, default="savedmodel", help="savedmodel (default) or onnx")
    parser.add_argument("--no-convert", action="store_true", help="MODEL is already an FCN: export it as it is")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.set_defaults(run=run)


def run(args) -> int:
    import keras_fcn_surgery as kfs

    if args.format == "onnx" and (args.version is not None or args.preprocess != "none"):
        print("error: --version and --preprocess apply to --format savedmodel only.", file=sys.stderr)
        return EXIT_USAGE
    options = dict(
        overwrite=args.overwrite, convert=not args.no_convert, head=args.head, input_size=args.input_size
    )
    source = kfs.load_model(args.model)
    if args.format == "onnx":
        result = kfs.export_onnx(source, args.export_dir, **options)
    else:
        result = kfs.export_savedmodel(
            source, args.export_dir, version=args.version, preprocess=args.preprocess, **options
        )
    print(result)
    return EXIT_OK
