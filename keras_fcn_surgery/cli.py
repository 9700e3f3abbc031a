"""The ``keras-fcn-surgery`` command line.

Exit codes: 0 success, 1 conversion or verification failure, 2 usage or input
error, 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM), 129 hung
up (SIGHUP); an interrupted command removes its partial output first. Only
the CLI prints; the library raises.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from keras_fcn_surgery.commands import COMMAND_MODULES
from keras_fcn_surgery.commands.common import EXIT_CONVERSION, EXIT_USAGE, run_interruptible


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-fcn-surgery",
        description="Turn a Keras image classifier into an equivalent fully convolutional network.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's Python warnings (retracing notes from Keras's grouped convolutions) are noise here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return run_interruptible(lambda: _run(args))


def _run(args) -> int:
    from keras_fcn_surgery.errors import ConversionError, ModelFileError

    try:
        return args.run(args)
    except ModelFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONVERSION


if __name__ == "__main__":
    sys.exit(main())
