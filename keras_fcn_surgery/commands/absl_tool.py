"""What the absl-flag scripts in ``tools/`` share: flag errors, the input size, exit codes."""

from __future__ import annotations

import argparse
import sys

from keras_fcn_surgery.commands.common import (
    EXIT_CONVERSION,
    EXIT_OK,
    EXIT_USAGE,
    parse_size,
    quiet_tensorflow_import,
    run_interruptible,
)


def flags_parser(flag_values):
    """An ``app.run`` flags parser that turns a usage error into one line and exit code 2."""
    from absl import flags

    def parse(argv):
        try:
            return flag_values(argv)
        except flags.Error as error:
            _fail(str(error))
            sys.exit(EXIT_USAGE)

    return parse


def run_tool(argv, action, *, input_size_flag=None) -> int:
    """Call ``action(input_size)`` and turn its outcome into a message and an exit code, as the CLI does.

    SIGINT/SIGTERM end it like the CLI (partial output removed, one line, exit 130/143).

    Args:
        argv: the arguments left after flag parsing (only the program name is allowed).
        action: returns the lines to print on success, or the exit code of a
            CLI subcommand's ``run`` (which printed its own output).
        input_size_flag: the raw ``--input_size`` value, parsed as ``HxW``.
    """
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines about tracing and saving are noise here
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; everything is given with flags (--help).")
        return EXIT_USAGE
    try:
        input_size = parse_size(input_size_flag) if input_size_flag else None
    except argparse.ArgumentTypeError as error:
        _fail(f"--input_size: {error}")
        return EXIT_USAGE
    quiet_tensorflow_import()
    return run_interruptible(lambda: _act(action, input_size))


def _act(action, input_size) -> int:
    from keras_fcn_surgery.errors import ConversionError, InputError

    try:
        lines = action(input_size)
    except InputError as error:
        _fail(str(error))
        return EXIT_USAGE
    except ConversionError as error:
        _fail(str(error))
        return EXIT_CONVERSION
    if isinstance(lines, int):
        return lines
    for line in lines:
        print(line)
    return EXIT_OK


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
