"""Exceptions raised by keras_fcn_surgery, and how their messages quote others."""

import re


class ConversionError(ValueError):
    """A model, layer or file that cannot be turned into an equivalent FCN.

    The message names the offending layer (or file) and says what to do.
    """


class VerificationError(ConversionError):
    """The converted model does not reproduce the source at the original size."""


class InputError(ConversionError):
    """An argument or input the call cannot work with (an image smaller than the network, a tile size
    below the minimum, a model whose input size must be given): the user's to fix, not the model's.

    The CLI exits with code 2 for these, and 1 for other `ConversionError`s.
    """


class ModelFileError(InputError):
    """A model file that is missing, unreadable or needs custom objects."""


class ExportError(ConversionError):
    """An export that could not be built, or that does not reproduce the Keras model."""


class NonFiniteWeightsWarning(UserWarning):
    """The source model holds NaN or Inf weights; the message names the layers.

    The converted model copies them, so it reproduces the source's NaN/Inf
    outputs; `verify` counts NaN against NaN as equal, and fails when every
    output is NaN or Inf (nothing can be compared).
    """


class UninformativeVerificationWarning(UserWarning):
    """The verification batch could not tell a right conversion from a wrong one.

    The source's scores hardly vary across the check batch (an untrained
    network, collapsed features), so an FCN that ignored its input would pass
    too. Verify on real images: ``convert(..., verify_inputs=images)``, CLI
    ``--verify-images DIR``.
    """


class SlowTilingWarning(UserWarning):
    """The requested tiles make a pass compute several times the image (they overlap by the network's reach).

    The message gives the work against one whole pass and a tile size (or no
    tiling) that computes far less.
    """


class UncertifiableMapError(ConversionError):
    """A score map whose cells cannot be compared with the classifier on crops (`certify_map`).

    The message says why: the cells are not one classifier window each (a
    ``head="dense"`` map), which crop a cell stands for is unknown (a layer
    whose window could not be derived), or no cell's crop lies inside the
    image. The map itself may be fine.
    """


class InexactMapWarning(UserWarning):
    """Sampled cells of a score map differ from the classifier on the crops they stand for (`certify_map`).

    The message gives the differences and the reason: typically ``same``
    padding, where the classifier on a crop sees zeros past the crop's edge
    but the map's cell sees the neighbouring pixels, or a network that pools
    over the whole image. The map is still what the FCN computes (its tiles
    are exact); it is not the sliding window of the classifier there.
    """


class IgnoredHeadWarning(UserWarning):
    """``head="dense"`` was asked for a model without a global-pooling head, where it changes nothing."""


class InternalError(RuntimeError):
    """A loop or invariant of the package's own arithmetic went wrong: a bug in keras_fcn_surgery, not in
    the model or the input. The message names the function and its arguments, to quote in a report."""


def loop_bound_exceeded(function: str, bound: int, **arguments) -> InternalError:
    """The error for a planning loop that ran past the bound its inputs give (it would never have ended)."""
    given = ", ".join(f"{name}={value!r}" for name, value in arguments.items())
    return InternalError(
        f"Internal error: {function}({given}) ran past {bound} iterations, the most its inputs allow. "
        "This is a bug in keras_fcn_surgery; please report it with this message."
    )


def first_line(text: str) -> str:
    """The gist of another library's error message, for quoting inside ours.

    Drops terminal colour codes; keeps two lines because Keras wraps layer
    errors as "Exception encountered when calling X.call().\n<cause>".
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else text
