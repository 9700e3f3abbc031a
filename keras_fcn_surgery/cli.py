"""The ``keras-fcn-surgery`` command line.

Exit codes: 0 success, 1 conversion or verification failure, 2 usage or input
error, 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM), 129 hung
up (SIGHUP); an interrupted command removes its partial output first. Only
the CLI prints; the library raises.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import sys
import warnings

from keras_fcn_surgery.commands import COMMAND_MODULES
from keras_fcn_surgery.commands.common import (
    EXIT_CONVERSION,
    EXIT_USAGE,
    check_paths_first,
    cli_message,
    quiet_tensorflow_import,
    run_interruptible,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-fcn-surgery",
        description="Turn a Keras image classifier into an equivalent fully convolutional network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    parser.set_defaults(_commands=subparsers.choices)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # answered by the subcommand's own usage, with the flag it most likely meant
        _refuse_unknown(args._commands[args.command], unknown)
    return run_interruptible(lambda: _run(args))


def _refuse_unknown(command: argparse.ArgumentParser, unknown: list[str]) -> None:
    flags = [flag for action in command._actions for flag in action.option_strings]
    message = f"unrecognized arguments: {' '.join(unknown)}"
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6) if word.startswith("-") else []
        if close:
            message += f" (did you mean {close[0]}?)"
            break
    command.error(message)


def _version() -> str:
    try:
        return importlib.metadata.version("keras-fcn-surgery")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _show_warning(message, category, filename, lineno, file=None, line=None, *, shown=warnings.showwarning):
    """Our warnings as one line with the advice spelt as flags; others as Python shows them."""
    if category.__module__ == "keras_fcn_surgery.errors":
        print(f"warning: {cli_message(str(message))}", file=sys.stderr)
    else:
        shown(message, category, filename, lineno, file, line)


def _run(args) -> int:
    from keras_fcn_surgery.errors import ConversionError, InputError

    warnings.showwarning = _show_warning

    try:
        check_paths_first(args)  # a wrong path is answered before TensorFlow starts
        early = getattr(args, "early", None)
        answer = early(args) if early is not None else None  # a command with nothing to do says so at once
        if answer is not None:
            return answer
        quiet_tensorflow_import()
        return args.run(args)
    except InputError as error:
        print(f"error: {cli_message(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except ConversionError as error:
        print(f"error: {cli_message(str(error))}", file=sys.stderr)
        return EXIT_CONVERSION


if __name__ == "__main__":
    sys.exit(main())
