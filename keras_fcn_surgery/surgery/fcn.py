"""The one way in: what a fully convolutional model is, and `as_fcn`, which turns what a user gives into one.

Every function and command that runs a network over images (`predict_map`,
`predict_images`, `heatmap`, the exports, `segmenter`) accepts a classifier,
an FCN, or the path of a file holding either, and goes through `as_fcn`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import keras

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import model_layout, traced_model
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.saving.loading import as_model

# Conversions of in-memory classifiers, by model and options: `predict_map(classifier, ...)` in a loop
# converts (and verifies) once.
_CONVERSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FcnSpec:
    """What a fully convolutional model takes and returns.

    Attributes:
        layout: where its maps keep their channels.
        channels: channels of the image it takes.
        classes: channels of the map it returns.
    """

    layout: Layout
    channels: int
    classes: int


def is_fully_convolutional(model) -> bool:
    """True for a one-input, one-output model on images of any size that returns a rank-4 map.

    That is what `convert` returns (and what `segmenter` builds); anything else
    is a classifier to convert first.
    """
    return _why_not_fcn(model) is None


def fcn_spec(model) -> FcnSpec:
    """The `FcnSpec` of a fully convolutional model.

    Raises:
        ConversionError: for anything else, saying what the model takes and
            returns, and how to get an FCN.
    """
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"Expected a `keras.Model` (a classifier or the FCN `convert` returns). Received: {type(model).__name__}"
        )
    model = traced_model(model)
    problem = _why_not_fcn(model)
    if problem is not None:
        raise ConversionError(problem)
    layout = model_layout(model)
    channels = layout.channels(tuple(model.inputs[0].shape))
    if channels is None:
        raise ConversionError(
            f"Model '{model.name}' takes input {tuple(model.inputs[0].shape)} with an unknown number of channels; "
            "give its Input a fixed channel count."
        )
    return FcnSpec(layout, int(channels), int(layout.channels(tuple(model.outputs[0].shape))))


def as_fcn(
    model,
    *,
    head: str = "window",
    input_size=None,
    custom_objects=None,
    convert: bool = True,
    verify: bool = True,
) -> keras.Model:
    """The fully convolutional model to run: ``model`` itself when it is one, else its conversion.

    Args:
        model: a classifier, an FCN (from `convert`, or a `segmenter`), or the
            path of a ``.keras``/``.h5`` file holding either.
        head: for a classifier with a global-pooling head, see `convert`.
        input_size: the classifier's original ``(H, W)`` when its input takes any size.
        custom_objects: passed to `keras.models.load_model` for a path.
        convert: convert a classifier; with False a classifier is refused.
        verify: verify the conversion (see `convert`).

    Returns:
        The FCN. An in-memory classifier is converted once per ``head`` and
        ``input_size``: later calls return the same FCN.

    Raises:
        ModelFileError: for a path that cannot be loaded.
        ConversionError: for a classifier that cannot be converted, or any
            classifier with ``convert=False``.
        VerificationError: when the conversion does not verify.
    """
    loaded = as_model(model, custom_objects, error_class=ConversionError)
    if is_fully_convolutional(loaded):
        from keras_fcn_surgery.surgery.verify import check_trace

        check_trace(loaded)
        return loaded
    if not convert:
        raise ConversionError(
            f"{_why_not_fcn(loaded)} Let it be converted (drop convert=False / --no-convert)."
        )
    from keras_fcn_surgery.surgery.convert import convert as convert_model

    key = (head, None if input_size is None else tuple(int(d) for d in input_size), verify)
    cached = _CONVERSIONS.get(loaded, {})
    if key not in cached:
        cached[key] = convert_model(loaded, head=head, input_size=input_size, verify=verify)
        _CONVERSIONS[loaded] = cached
    return cached[key]


def original_size(model, input_size=None) -> tuple[int, int] | None:
    """The ``(H, W)`` a classifier was built for: ``input_size`` when given, else its fixed input size, or None."""
    if input_size is not None:
        return (int(input_size[0]), int(input_size[1]))
    model = traced_model(model)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        return None
    spatial = model_layout(model).spatial_shape(shape)
    return (int(spatial[0]), int(spatial[1])) if all(d is not None for d in spatial) else None


def _why_not_fcn(model) -> str | None:
    """Why ``model`` is not fully convolutional (one sentence), or None when it is."""
    model = traced_model(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return (
            f"Model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a score map "
            "needs one image input and one output."
        )
    shape, output = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    spatial = model_layout(model).spatial_shape(shape) if len(shape) == 4 else (0,)
    if len(shape) != 4 or len(output) != 4 or any(d is not None for d in spatial):
        return (
            f"Model '{model.name}' takes {shape} and returns {output}: it is not fully convolutional. "
            "Convert the classifier first: `fcn = keras_fcn_surgery.convert(model)`."
        )
    return None
