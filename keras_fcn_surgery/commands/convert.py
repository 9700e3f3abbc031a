"""``keras-fcn-surgery convert IN OUT``."""

from __future__ import annotations

import os

from keras_fcn_surgery.commands.common import EXIT_OK, parse_size


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a .keras/.h5 classifier into an FCN .keras file")
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument("output", help="where to write the converted model (.keras)")
    parser.add_argument("--head", choices=("window", "dense"), default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical check")
    parser.set_defaults(run=run)


def run(args) -> int:
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.saving import save_model

    if not args.output.endswith(".keras"):
        raise kfs.ModelFileError(f"Output '{args.output}' must end in `.keras`.")
    if os.path.exists(args.output) and not args.overwrite:
        raise kfs.ModelFileError(f"Output '{args.output}' exists; pass --overwrite to replace it.")
    source = kfs.load_model(args.model)
    print(kfs.plan(source, head=args.head, input_size=args.input_size))
    fcn = kfs.convert(source, head=args.head, input_size=args.input_size, verify=False)
    if not args.no_verify:
        result = kfs.verify(source, fcn, input_size=args.input_size)
        print(result)
        if not result.passed:
            raise kfs.VerificationError(f"Verification failed: {result}")
    save_model(fcn, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return EXIT_OK
