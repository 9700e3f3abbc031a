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
import signal
import sys

from keras_fcn_surgery.commands import COMMAND_MODULES
from keras_fcn_surgery.commands.common import EXIT_CONVERSION, EXIT_USAGE

# Signals that end a command like Ctrl-C does: unwinding (so partial outputs are removed), then 128 + signal.
TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP")


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
    from keras_fcn_surgery.errors import ConversionError, ModelFileError
    from keras_fcn_surgery.saving.atomic import Interrupted

    previous = _raise_on_termination_signals(Interrupted)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted (SIGINT); partial output removed, nothing written.", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as stop:
        name = signal.Signals(stop.signal_number).name
        print(f"terminated ({name}); partial output removed, nothing written.", file=sys.stderr)
        return 128 + stop.signal_number
    except ModelFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONVERSION
    finally:
        _restore_signal_handlers(previous)


def _raise_on_termination_signals(exception_class) -> dict:
    """SIGTERM/SIGHUP raise ``exception_class(signum)``, SIGINT `KeyboardInterrupt`; returns the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        return {}

    def handler(signum, frame):
        # Once: a second signal (an impatient Ctrl-C) must not interrupt the clean-up itself.
        for name in ("SIGINT", *TERMINATING_SIGNALS):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise exception_class(signum)

    previous = {}
    for name in ("SIGINT", *TERMINATING_SIGNALS):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
