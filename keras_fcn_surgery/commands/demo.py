"""``keras-fcn-surgery demo``: the Caffe net-surgery example, offline, on random weights."""

from __future__ import annotations

from keras_fcn_surgery.commands.common import EXIT_OK, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="convert the CaffeNet architecture and run a 451x451 image")
    parser.add_argument("--size", type=positive_int, default=451, help="side of the test image (default 451)")
    parser.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.zoo import caffenet

    source = caffenet()
    print(f"CaffeNet (random weights), input {source.input_shape[1:]}, {source.count_params():,} parameters")
    print(kfs.plan(source))
    fcn = kfs.convert(source, verify=False)
    print(kfs.verify(source, fcn))
    grid = kfs.geometry(fcn, (227, 227))
    print(f"geometry: {grid}")
    if args.size < grid.min_input_size[0]:
        raise kfs.InputError(
            f"--size {args.size} is smaller than CaffeNet's smallest input, {grid.min_input_size[0]} pixels."
        )
    image = np.random.default_rng(0).uniform(0, 255, (1, args.size, args.size, 3)).astype("float32")
    scores = np.asarray(fcn(image))
    print(
        f"{args.size}x{args.size} input -> {scores.shape[1]}x{scores.shape[2]} map of {scores.shape[3]} classes "
        f"(shape {scores.shape}; geometry predicts {grid.output_size((args.size, args.size))})"
    )
    return EXIT_OK
