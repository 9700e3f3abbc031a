"""``keras-fcn-surgery segment MODEL IMAGE -o mask.png [--tile N] [--labels out.npy]``."""

from __future__ import annotations

from keras_fcn_surgery.commands.common import EXIT_OK, PREPROCESS_HELP, positive_int
from keras_fcn_surgery.options import PREPROCESS_MODES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="label every pixel of an image with a segmenter; write a colour overlay with a legend"
    )
    parser.add_argument(
        "model",
        help="segmenter (.keras from kfs.segmenter); a classifier or FCN becomes an FCN-32s of its own classes",
    )
    parser.add_argument("image", help="image file (anything Pillow reads)")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write: the overlay and its legend")
    parser.add_argument("--labels", help="also write the (H, W) label array to this .npy file")
    parser.add_argument(
        "--tile", type=positive_int, help="tile side in pixels for large images (exact; default: one pass)"
    )
    parser.add_argument("--class-names", help="text file with one class name per line")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="none", help=PREPROCESS_HELP)
    parser.add_argument("--alpha", type=float, default=0.5, help="label colour weight over the image (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.set_defaults(run=run, output_suffix=".png")


def run(args) -> int:
    import numpy as np

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.commands.common import read_class_names
    from keras_fcn_surgery.graph import model_layout
    from keras_fcn_surgery.inference.pictures import label_overlay
    from keras_fcn_surgery.preprocessing import pixel_function
    from keras_fcn_surgery.saving.atomic import atomic_output, check_output_path
    from keras_fcn_surgery.saving.images import read_image
    from keras_fcn_surgery.segmentation.predict import is_segmenter, segment_image

    check_output_path(args.output, suffix=".png", overwrite=args.overwrite)  # before any work
    if args.labels is not None:
        check_output_path(args.labels, suffix=".npy", overwrite=args.overwrite)
    model = kfs.load_model(args.model)
    if not is_segmenter(model):
        model = kfs.segmenter(model, skips=())
    layout = model_layout(model)
    pixels = read_image(args.image, int(layout.channels(model.inputs[0].shape)))
    preprocess = pixel_function(args.preprocess, layout.data_format)
    image = layout.image_from_channels_last(pixels)
    if preprocess is not None:
        image = preprocess(image[None].copy())[0]
    logits = segment_image(model, image, tile=args.tile)
    labels = layout.image_to_channels_last(logits).argmax(axis=-1).astype(np.int32)
    names = read_class_names(args.class_names, int(layout.image_channels(logits.shape)))
    picture = label_overlay(pixels, labels, class_names=names, alpha=args.alpha)
    if args.labels is not None:
        with atomic_output(args.labels, suffix=".npy", overwrite=args.overwrite) as temporary:
            np.save(temporary, labels)
        print(f"wrote {args.labels} ({labels.shape[0]}x{labels.shape[1]} labels)")
    with atomic_output(args.output, suffix=".png", overwrite=args.overwrite) as temporary:
        picture.save(temporary, format="PNG")
    counts = np.bincount(labels.ravel())
    label = (lambda k: f"{k} {names[k]}") if names else str
    top = ", ".join(f"{label(k)}: {100 * counts[k] / labels.size:.1f}%" for k in np.argsort(-counts)[:5] if counts[k])
    print(f"labels by share of pixels: {top}")
    print(f"wrote {args.output} ({picture.width}x{picture.height})")
    return EXIT_OK
