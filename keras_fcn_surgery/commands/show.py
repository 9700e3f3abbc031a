"""``keras-fcn-surgery show filters|activations MODEL [IMAGE] --layer NAME -o out.png``."""

from __future__ import annotations

from keras_fcn_surgery.commands.common import EXIT_OK, EXIT_USAGE, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "show", help="pictures of the network: a layer's filters, or its feature maps for one image"
    )
    parser.add_argument("what", choices=("filters", "activations"), help="what to draw")
    parser.add_argument("model", help="a .keras/.h5 model")
    parser.add_argument("image", nargs="?", help="image file (activations only)")
    parser.add_argument("--layer", help="layer name (default: the first Conv2D)")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--scale", type=int, help="display pixels per kernel tap / map cell (default 8 / 1)")
    parser.add_argument("--max-tiles", type=positive_int, default=256, help="most tiles drawn (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(run=run, output_suffix=".png")


def run(args) -> int:
    import sys

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.graph import model_layout
    from keras_fcn_surgery.saving.atomic import check_output_path
    from keras_fcn_surgery.saving.images import read_image

    if args.what == "activations" and args.image is None:
        print("error: `show activations` needs an IMAGE.", file=sys.stderr)
        return EXIT_USAGE
    if args.what == "filters" and args.image is not None:
        print("error: `show filters` takes no IMAGE.", file=sys.stderr)
        return EXIT_USAGE
    check_output_path(args.output, suffix=".png", overwrite=args.overwrite)  # before any work
    model = kfs.load_model(args.model)
    if args.what == "filters":
        picture = kfs.filters_picture(
            model, args.layer, args.output, scale=args.scale or 8, max_tiles=args.max_tiles, overwrite=args.overwrite
        )
    else:
        layout = model_layout(model)
        pixels = read_image(args.image, int(layout.channels(model.inputs[0].shape)))
        picture = kfs.activations_picture(
            model,
            layout.image_from_channels_last(pixels),
            args.layer,
            args.output,
            scale=args.scale or 1,
            max_tiles=args.max_tiles,
            overwrite=args.overwrite,
        )
    shown, total, what = picture.info["shown"]
    more = "" if shown == total else f"; the first {shown} of {total} {what} (--max-tiles shows more)"
    print(f"wrote {args.output} ({picture.width}x{picture.height}{more})")
    return EXIT_OK
