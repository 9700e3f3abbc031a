"""Write the op graphs of a Keras classifier and of its FCN, with the conversion plan, for TensorBoard.

    python tools/log_graph.py --model classifier.keras --logdir runs/surgery [--head window|dense]
    tensorboard --logdir runs/surgery

Writes the runs <logdir>/source and <logdir>/fcn (Graphs tab) and the plan
table as the text summary `conversion_plan` of the fcn run (Text tab).

A thin wrapper over `keras-fcn-surgery graph` (the same code and output).

Exit codes: 0 written, 1 conversion failure, 2 file or usage error.
"""

from __future__ import annotations

import argparse

from absl import app, flags

from keras_fcn_surgery.commands.absl_tool import flags_parser, run_tool
from keras_fcn_surgery.options import HEADS

flags.DEFINE_string("model", None, "Source model file (.keras or .h5).")
flags.DEFINE_string("logdir", None, "Folder for the TensorBoard runs `source` and `fcn`.")
flags.DEFINE_enum("head", "window", list(HEADS), "What a global-pooling head becomes.")
flags.DEFINE_string("input_size", None, "Original input size HxW, for a classifier that takes any size.")
flags.DEFINE_bool("overwrite", False, "Replace the runs of an earlier export of graphs in --logdir.")
flags.mark_flags_as_required(["model", "logdir"])

FLAGS = flags.FLAGS


def main(argv) -> int:
    def log(input_size):
        from keras_fcn_surgery.commands import graph as graph_command

        # The CLI's own `graph` subcommand does the work: same output and exit codes.
        args = argparse.Namespace(
            model=FLAGS.model, logdir=FLAGS.logdir, head=FLAGS.head, input_size=input_size, overwrite=FLAGS.overwrite
        )
        return graph_command.run(args)

    return run_tool(argv, log, input_size_flag=FLAGS.input_size)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(FLAGS))
