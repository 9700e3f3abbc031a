"""``keras-fcn-surgery convert IN OUT``."""

from __future__ import annotations

import sys
import warnings

from keras_fcn_surgery.commands.common import EXIT_OK, parse_size
from keras_fcn_surgery.options import HEADS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a .keras/.h5 classifier into an FCN .keras file")
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument("output", help="where to write the converted model (.keras)")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical check")
    parser.add_argument(
        "--custom-objects",
        metavar="PATH.py",
        help="Python file defining the model's custom layers or functions (its CUSTOM_OBJECTS dict, "
        "or else its public classes and functions)",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.saving.atomic import check_output_path, save_model
    from keras_fcn_surgery.saving.loading import custom_objects_from_file
    from keras_fcn_surgery.surgery.convert import verify_conversion

    check_output_path(args.output, suffix=".keras", overwrite=args.overwrite)
    custom_objects = custom_objects_from_file(args.custom_objects) if args.custom_objects else None
    source = kfs.load_model(args.model, custom_objects=custom_objects)
    print(kfs.plan(source, head=args.head, input_size=args.input_size))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", kfs.NonFiniteWeightsWarning)
        fcn = kfs.convert(source, head=args.head, input_size=args.input_size, verify=False)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if not args.no_verify:
        result = verify_conversion(source, fcn, head=args.head, input_size=args.input_size, raise_on_failure=True)
        print(result)
    save_model(fcn, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return EXIT_OK
