"""Write the op graphs of a Keras classifier and of its FCN, with the conversion plan, for TensorBoard.

    python tools/log_graph.py --model classifier.keras --logdir runs/surgery [--head window|dense]
    tensorboard --logdir runs/surgery

Writes the runs <logdir>/source and <logdir>/fcn (Graphs tab) and the plan
table as the text summary `conversion_plan` of the fcn run (Text tab).

Exit codes: 0 written, 1 conversion failure, 2 file or usage error.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

EXIT_OK, EXIT_CONVERSION, EXIT_USAGE = 0, 1, 2

flags.DEFINE_string("model", None, "Source model file (.keras or .h5).")
flags.DEFINE_string("logdir", None, "Folder for the TensorBoard runs `source` and `fcn`.")
flags.DEFINE_enum("head", "window", ["window", "dense"], "What a global-pooling head becomes.")
flags.DEFINE_string("input_size", None, "Original input size HxW, for a classifier that takes any size.")
flags.mark_flags_as_required(["model", "logdir"])

FLAGS = flags.FLAGS


def parse_flags(argv):
    """absl's flag parsing with a one-line message and exit code 2 on a usage error."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main(argv) -> int:
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines about tracing and saving are noise here
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; everything is given with flags (--help).", file=sys.stderr)
        return EXIT_USAGE
    import argparse

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.commands.common import parse_size

    try:
        input_size = parse_size(FLAGS.input_size) if FLAGS.input_size else None
    except argparse.ArgumentTypeError as error:
        print(f"error: --input_size: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        runs = kfs.log_graphs(kfs.load_model(FLAGS.model), FLAGS.logdir, head=FLAGS.head, input_size=input_size)
    except kfs.ModelFileError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except kfs.ConversionError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_CONVERSION
    for run in runs:
        print(f"wrote {run}")
    print(f"view with: tensorboard --logdir {FLAGS.logdir}")
    return EXIT_OK


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
