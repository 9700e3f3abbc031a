"""``keras-fcn-surgery convert IN OUT``."""

from __future__ import annotations

import os
import sys
import warnings

from keras_fcn_surgery.commands.common import EXIT_OK, EXIT_USAGE, add_custom_objects_argument, load_source, parse_size
from keras_fcn_surgery.options import HEADS

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a .keras/.h5 classifier into an FCN .keras file")
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument("output", help="where to write the converted model (.keras)")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical check")
    parser.add_argument(
        "--verify-images",
        metavar="DIR",
        help="verify on the images in DIR (resized to the model's input size, pixel values 0-255) instead of "
        "random numbers: needed for a meaningful check of untrained or saturated networks",
    )
    add_custom_objects_argument(parser)
    parser.set_defaults(run=run, output_suffix=".keras")


def run(args) -> int:
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.saving.atomic import check_output_path
    from keras_fcn_surgery.saving.record import save_model
    from keras_fcn_surgery.surgery.convert import Conversion

    check_output_path(args.output, suffix=".keras", overwrite=args.overwrite)
    source = load_source(args)
    with warnings.catch_warnings(record=True) as caught:
        for category in (kfs.NonFiniteWeightsWarning, kfs.UninformativeVerificationWarning, kfs.IgnoredHeadWarning):
            warnings.simplefilter("always", category)
        try:
            conversion = Conversion.of(source, head=args.head, input_size=args.input_size)
            print(conversion.plan())
            images = None
            if args.verify_images and not args.no_verify:
                images, problem = _load_images(args.verify_images, conversion)
                if problem:
                    print(f"error: {problem}", file=sys.stderr)
                    return EXIT_USAGE
            fcn = conversion.build()
            conversion.warn_nonfinite()
            result = None if args.no_verify else conversion.verify(fcn, inputs=images)
        finally:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
    if result is not None:
        print(result)
    save_model(fcn, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return EXIT_OK


def _load_images(folder: str, conversion):
    """The images of ``folder`` as one batch at the model's input size, or ``(None, problem)``."""
    import numpy as np

    from keras_fcn_surgery.errors import ModelFileError
    from keras_fcn_surgery.saving.images import PILLOW_MODES, read_image

    model = conversion.model
    if len(model.inputs) != 1:
        return None, f"--verify-images works for one-input models; '{model.name}' has {len(model.inputs)}."
    if not os.path.isdir(folder):
        return None, f"--verify-images '{folder}' is not a folder."
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(_IMAGE_SUFFIXES))
    if not names:
        return None, f"--verify-images '{folder}' holds no images ({', '.join(_IMAGE_SUFFIXES)})."
    layout = conversion.surgeon.context.layout
    channels = layout.channels(tuple(model.inputs[0].shape))
    if channels not in PILLOW_MODES:
        return None, f"--verify-images reads 1, 3 or 4-channel images; '{model.name}' takes {channels} channels."
    height, width = conversion.size
    batch = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            pixels = read_image(path, channels, size=(height, width))
        except ModelFileError as error:
            return None, f"--verify-images: {error}"
        batch.append(pixels if layout.channels_last else np.moveaxis(pixels, -1, 0))
    return np.stack(batch), None
