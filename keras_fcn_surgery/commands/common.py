"""What the CLI subcommands and the absl tools share: exit codes, argument parsing, signal handling."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys

EXIT_OK, EXIT_CONVERSION, EXIT_USAGE = 0, 1, 2

# Signals that end a command like Ctrl-C does: unwinding (so partial outputs are removed), then 128 + signal.
TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP")
IMAGENET = "imagenet"
CLASS_NAMES_HELP = (
    "text file with one class name per line, or imagenet (default: ImageNet's names for a model of 1000 classes, "
    "else 'class K')"
)
# The --preprocess help of the commands that read pixels from files (0..255), default included.
PREPROCESS_HELP = (
    "what is done to the 0-255 pixels read from the file before the model: none (default: the raw 0-255 "
    "pixels), unit (pixels / 255), or keras.applications' caffe (VGG, ResNet50), tf (MobileNet...: [-1, 1]), "
    "torch (DenseNet)"
)


def check_paths_first(args) -> None:
    """The checks of a command's paths that need no TensorFlow, run before it starts (well under a second).

    The model file must exist (``args.model``), as must an input image
    (``args.image``); an output (``args.output``, of the suffix the command
    sets as ``output_suffix``) must not exist without ``--overwrite``.

    Raises:
        ModelFileError: naming the path and the way out.
    """
    from keras_fcn_surgery.saving.atomic import check_output_path
    from keras_fcn_surgery.saving.paths import check_input_file, check_model_path

    suffix = getattr(args, "output_suffix", None)
    if suffix and getattr(args, "output", None):  # first: an output in the way is the cheapest mistake to fix
        check_output_path(args.output, suffix=suffix, overwrite=getattr(args, "overwrite", False))
    if getattr(args, "model", None):
        check_model_path(args.model)
    if getattr(args, "image", None):
        check_input_file(args.image, "Image")


def _notes(error: BaseException) -> list[str]:
    """What the code on the way out added to an interruption (`BaseException.add_note`): e.g. inputs finished."""
    return list(getattr(error, "__notes__", []))


def run_interruptible(function) -> int:
    """Call ``function()`` (returning an exit code) so that SIGINT, SIGTERM and SIGHUP end it cleanly.

    The signal becomes an exception (`KeyboardInterrupt`, or
    `saving.atomic.Interrupted`), so every ``finally`` on the way out runs and
    removes the partial output; then one line goes to stderr and the exit
    code is 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), with no
    traceback. Handlers are installed only while ``function`` runs.
    """
    from keras_fcn_surgery.saving.atomic import Interrupted

    previous = _raise_on_signals(Interrupted)
    try:
        return function()
    except KeyboardInterrupt as stop:
        print(" ".join(["interrupted (SIGINT); no partial output left behind.", *_notes(stop)]), file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as stop:
        name = signal.Signals(stop.signal_number).name
        print(" ".join([f"terminated ({name}); no partial output left behind.", *_notes(stop)]), file=sys.stderr)
        return 128 + stop.signal_number
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` or ``"224x320"`` -> ``(H, W)``."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}")
    return (values[0], values[1])


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1, for sizes and counts (argparse turns the error into exit code 2)."""
    return _int_at_least(text, 1, "a positive integer")


def _raise_on_signals(exception_class) -> dict:
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


def read_class_names(path, classes: int | None = None) -> list[str] | None:
    """Class names from a text file, one a line (``#`` comments skipped); ``imagenet``, or no file: the rule
    of `inference.heatmap.class_names_for` (ImageNet's names for a 1000-class model, else the indices).

    Raises:
        ModelFileError: for a file that cannot be read.
        InputError: when its count differs from ``classes``.
    """
    from keras_fcn_surgery.errors import InputError, ModelFileError

    if path is None or path == IMAGENET:
        if classes is None:  # decided where the class count is known (`predict_images`)
            return path
        from keras_fcn_surgery.inference.heatmap import class_names_for

        return class_names_for(path, classes)
    try:
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    except OSError as error:
        raise ModelFileError(f"Class names file '{path}' could not be read ({error.strerror or error}).") from error
    if classes is not None and len(names) != classes:
        raise InputError(f"'{path}' lists {len(names)} class names; the model has {classes} classes.")
    return names


def quiet_tensorflow_import() -> None:
    """Import TensorFlow with its C++ start-up log (CUDA probes, absl notices) kept off the terminal.

    TensorFlow writes those lines to file descriptor 2 while its libraries load, before any Python
    setting can stop them; they are captured and shown only if the import itself fails. A user's own
    ``TF_CPP_MIN_LOG_LEVEL`` is left as it is, and then nothing is hidden.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3":
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from keras_fcn_surgery.native_log import native_stderr_captured

    with native_stderr_captured():
        try:
            importlib.import_module("tensorflow")
        except ImportError:
            if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
                raise
            return  # Keras on another backend (KERAS_BACKEND=jax) and no TensorFlow installed: nothing to quiet
    # Python-side TensorFlow warnings (retracing notes from grouped convolutions) are noise here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


EXECUTIONS = ("auto", "tf", "xla", "blas", "jax", "torch", "stitch", "fragments")
# `engines.PRECISIONS`, named here so that parsing arguments imports no TensorFlow.
PRECISIONS = ("float32", "bfloat16", "float16")


def non_negative_int(text: str) -> int:
    """An integer >= 0, for counts where 0 turns something off."""
    return _int_at_least(text, 0, "an integer >= 0")


def add_certify_argument(parser) -> None:
    """``--certify N``: cells of each map compared with the classifier on their crops (0: none)."""
    from keras_fcn_surgery.options import CERTIFIED_CELLS

    parser.add_argument(
        "--certify",
        type=non_negative_int,
        default=CERTIFIED_CELLS,
        metavar="N",
        help=f"compare N sampled map cells with the classifier on the crops they stand for and print the "
        f"differences (default {CERTIFIED_CELLS}; 0: off); `same` padding makes them differ",
    )


def add_execution_argument(parser) -> None:
    """``--execution`` and ``--precision``: how each forward pass runs (`predict_map`'s ``engine`` and
    ``precision``)."""
    parser.add_argument(
        "--execution",
        choices=EXECUTIONS,
        default="auto",
        help="how each forward pass runs: auto (default: the fastest, measured on this machine on first use), "
        "tf, xla (XLA-compiled), blas (the classifier head in numpy's BLAS; CPU only), jax (jax.jit; "
        "KERAS_BACKEND=jax), torch (PyTorch; KERAS_BACKEND=torch), stitch (a map at a --stride finer than the FCN's "
        "by shift-and-stitch of its tail instead of à trous), fragments (such a map by multi-pooling fragments: "
        "the tail's windows undilated on the fragments of each removed stride, interleaved back)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="what the network computes at: float32 (default), bfloat16 or float16 (a copy of the model under "
        "Keras's mixed policy; faster where the processor has them: bfloat16 on CPUs with AMX or AVX-512 BF16, "
        "both on GPUs). The map is stored in float32 either way and --certify holds it to the precision's "
        "tolerance (bfloat16 6e-2, float16 2e-2 of the output scale)",
    )


def add_method_arguments(parser) -> None:
    """``--method`` and ``--stride``: a classifier's FCN map or its exact windowed map (`predict_map`'s ``method``)."""
    from keras_fcn_surgery.options import MAP_METHODS

    parser.add_argument(
        "--method",
        choices=MAP_METHODS,
        default="auto",
        help="how a classifier's map is computed: auto (default: its FCN where that is exact at --stride, else "
        "windowed), fcn, or windowed (the classifier on every crop at --stride, exactly: transformers, "
        "squeeze-and-excitation)",
    )
    parser.add_argument(
        "--stride",
        type=parse_size,
        metavar="N|HxW",
        help="pixels between windows of a windowed map, a multiple of the stride of the classifier's shared part, "
        "or between cells of an FCN map à trous, a divisor of its FCN's stride "
        "(default: its FCN's stride; needed for a classifier without one, such as a transformer)",
    )


def add_custom_objects_argument(parser) -> None:
    """``--custom-objects PATH.py``: the model's custom layers (a keras.io ViT's ``Patches``), for loading it."""
    parser.add_argument(
        "--custom-objects",
        metavar="PATH.py",
        help="Python file defining the model's custom layers or functions (its CUSTOM_OBJECTS dict, "
        "or else its public classes and functions)",
    )


def load_source(args):
    """The model of ``args.model``, its custom objects from ``--custom-objects`` where given."""
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.saving.loading import custom_objects_from_file

    path = getattr(args, "custom_objects", None)
    return kfs.load_model(args.model, custom_objects=custom_objects_from_file(path) if path else None)


# Library messages name Python arguments; on the command line the same advice names flags.
_PYTHON_TO_FLAGS = (
    (re.compile(r"`?input_size=\(H, W\)`?(?: to `convert`)?"), "--input-size HxW"),
    (re.compile(r"`?overwrite=True`?"), "--overwrite"),
    (re.compile(r"`?verify=False`?"), "--no-verify"),
    (re.compile(r"`?tile=None`?"), "no --tile"),
    (re.compile(r"\(tile=\((\d+), (\d+)\)\)"), r"(--tile \1)"),
    (re.compile(r"`?custom_objects=\{[^}]*\}\}?`?"), "--custom-objects FILE.py"),
    (re.compile(r"`?head='(window|dense)'`?"), r"--head \1"),
    (re.compile(r"`?verify_inputs=[a-z_]*`?"), "--verify-images DIR"),
)
# "pass overwrite=True (CLI: --overwrite)": keep the CLI's own spelling only.
_WITH_CLI_SPELLING = re.compile(r"`?[A-Za-z_]+=[^\s`]*`? \(CLI: `?([^`)]*)`?(?:, [^)]*)?\)")


def cli_message(text: str) -> str:
    """A library error message with its Python advice spelt as command-line flags."""
    text = _WITH_CLI_SPELLING.sub(lambda match: match.group(1), text)
    for pattern, flags in _PYTHON_TO_FLAGS:
        text = pattern.sub(flags, text)
    return text
