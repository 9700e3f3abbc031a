"""``keras-fcn-surgery graph MODEL --logdir DIR``: op graphs of the source and the FCN for TensorBoard."""

from __future__ import annotations

import importlib.util

from keras_fcn_surgery.commands.common import EXIT_OK, parse_size
from keras_fcn_surgery.options import HEADS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "graph",
        help="write the op graphs of the classifier and its FCN, and the plan, for TensorBoard",
        description=(
            "Writes runs DIR/source and DIR/fcn; view them with `tensorboard --logdir DIR` "
            '(TensorBoard: pip install "keras-fcn-surgery[tensorboard]").'
        ),
    )
    parser.add_argument("model", help="source model file (.keras or .h5)")
    parser.add_argument("--logdir", required=True, help="folder for the TensorBoard runs")
    parser.add_argument("--head", choices=HEADS, default="window", help="global-pooling heads")
    parser.add_argument("--input-size", type=parse_size, help="original input size HxW when the model takes any size")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier `graph` in DIR")
    parser.set_defaults(run=run)


def run(args) -> int:
    import keras_fcn_surgery as kfs

    source = kfs.load_model(args.model)
    runs = kfs.log_graphs(source, args.logdir, head=args.head, input_size=args.input_size, overwrite=args.overwrite)
    for run_dir in runs:
        print(f"wrote {run_dir}")
    print(f"view with: tensorboard --logdir {args.logdir}")
    if not _installed("tensorboard"):  # TensorFlow 2.21 no longer installs it
        print('(TensorBoard is not installed here: pip install "keras-fcn-surgery[tensorboard]")')
    return EXIT_OK


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a broken install, or one made unimportable
        return False
