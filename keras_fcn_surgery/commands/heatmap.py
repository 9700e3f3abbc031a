"""``keras-fcn-surgery heatmap MODEL IMAGE --class N -o out.png``."""

from __future__ import annotations

import sys

from keras_fcn_surgery.commands.common import (
    CLASS_NAMES_HELP,
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
from keras_fcn_surgery.options import HEADS, PREPROCESS_MODES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "heatmap", help="picture of one class's probability and the argmax class map over an image"
    )
    parser.add_argument("model", help="classifier (.keras/.h5, converted here) or an already converted FCN")
    parser.add_argument("image", help="image file (anything Pillow reads)")
    parser.add_argument("--class", dest="class_index", type=int, required=True, help="class index to overlay")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="none",
        help=PREPROCESS_HELP,
    )
    parser.add_argument(
        "--tile", type=positive_int, help="tile side in pixels for large images (exact; default: one pass)"
    )
    parser.add_argument(
        "--output-name",
        metavar="NAME",
        help="for a model with several outputs, the one to show (default: the first ending in a softmax or sigmoid)",
    )
    parser.add_argument("--class-names", help=CLASS_NAMES_HELP)
    parser.add_argument("--top", type=positive_int, default=5, help="how many top classes to print (default 5)")
    parser.add_argument(
        "--scale", type=positive_int, default=1, help="display magnification for small images (default 1)"
    )
    parser.add_argument("--alpha", type=float, default=0.6, help="heat colour weight over the image (default 0.6)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--relative",
        action="store_true",
        help="heat colours span this map's own range of the class's probability, labelled relative "
        "(default: the absolute scale, p = 0..1)",
    )
    scale.add_argument("--absolute", action="store_true", help="heat colours span p = 0..1 (the default)")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    add_execution_argument(parser)
    add_method_arguments(parser)
    add_certify_argument(parser)
    add_custom_objects_argument(parser)
    parser.set_defaults(run=run, output_suffix=".png")


def run(args) -> int:

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.inference.heatmap import class_probabilities, heat_range, scale_labels
    from keras_fcn_surgery.preprocessing import pixel_function
    from keras_fcn_surgery.saving.atomic import atomic_output, check_output_path
    from keras_fcn_surgery.saving.images import read_image

    check_output_path(args.output, suffix=".png", overwrite=args.overwrite)  # before any work
    model = load_source(args)  # kept: the certificate runs the classifier on crops
    method = kfs.MapMethod(args.method, args.stride, args.head, args.input_size)
    # The method, chosen once.
    mapper = kfs.prepare(model, method=method, tile=args.tile, engine=args.execution, precision=args.precision)
    spec = mapper.spec
    shown = spec.names[spec.output_index(args.output_name)]  # an unknown name is refused before any work
    classes = spec.outputs[spec.output_index(args.output_name)].classes
    if not 0 <= args.class_index < classes:  # before the map is computed
        print(f"error: --class {args.class_index} is out of range: the model has {classes} classes.", file=sys.stderr)
        return EXIT_USAGE
    names = read_class_names(args.class_names, classes)  # a wrong file too
    layout = spec.layout
    pixels = read_image(args.image, spec.channels)
    image = layout.image_from_channels_last(pixels)
    mapper = mapper.with_options(preprocess=pixel_function(args.preprocess, layout.data_format))
    maps = mapper.map(image)
    if spec.several:
        others = ", ".join(name for name in spec.names if name != shown)
        print(f"output {shown!r} of {len(spec.names)} (the others: {others}; --output-name to choose)")
    if args.certify:
        _, line = mapper.certificate_line(image, maps, args.certify, output=shown if spec.several else None)
        print(cli_message(line))
    scores = layout.image_to_channels_last(maps[shown] if spec.several else maps)
    grid = mapper.grid_of(shown if spec.several else None)
    probabilities = class_probabilities(scores)
    _print_top(probabilities, names, grid, pixels.shape[:2], args.top)
    value_range = heat_range(probabilities[..., args.class_index]) if args.relative else (0.0, 1.0)
    low, high = scale_labels(value_range)
    print(
        f"heat scale: black = p {low}, white = p {high}"
        + (" (relative: this map's range; drop --relative for the absolute 0..1)" if args.relative else "")
    )
    picture = kfs.heatmap(
        pixels,
        probabilities,
        grid,
        args.class_index,
        class_names=names,
        probabilities=True,
        style=kfs.HeatmapStyle(
            alpha=args.alpha, scale=args.scale, value_range="relative" if args.relative else value_range
        ),
    )
    with atomic_output(args.output, suffix=".png", overwrite=args.overwrite) as temporary:
        picture.save(temporary, format="PNG")
    print(f"wrote {args.output} ({picture.width}x{picture.height})")
    return EXIT_OK


def _print_top(probabilities, names, grid, image_size, top: int) -> None:
    import numpy as np

    peaks = probabilities.reshape(-1, probabilities.shape[-1]).max(axis=0)
    cells = probabilities.shape[:2]
    print(f"map of {cells[0]}x{cells[1]} cells; top classes by highest probability anywhere:")
    for k in np.argsort(-peaks, kind="stable")[:top]:
        i, j = np.unravel_index(np.argmax(probabilities[..., k]), cells)
        box = grid.at(image_size).input_box(int(i), int(j))
        label = f"class {k}" + (f" {names[k]}" if names is not None else "")
        print(f"  {peaks[k]:.4f}  {label}  at cell ({i}, {j}), window {box} (top, left, bottom, right)")
