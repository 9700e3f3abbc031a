"""`convert` and `plan`: the public entry points of the surgery."""

from __future__ import annotations

import os
import warnings

import keras

from keras_fcn_surgery.errors import ConversionError, NonFiniteWeightsWarning, VerificationError
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    input_name,
    is_graph_model,
    iter_layers,
    model_layout,
    producer_of,
)
from keras_fcn_surgery.options import HEADS
from keras_fcn_surgery.saving.loading import load_model
from keras_fcn_surgery.surgery.engine import GraphPlan, Surgeon
from keras_fcn_surgery.surgery.plan import ConversionPlan
from keras_fcn_surgery.surgery.rules.base import SPATIAL, Context, FlattenedMap, Spatial
from keras_fcn_surgery.surgery.verify import source_input_shapes
from keras_fcn_surgery.surgery.verify import verify as verify_models

_GLOBAL_POOLING_CLASSES = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")


def plan(model, *, head: str = "window", input_size=None, custom_objects=None) -> ConversionPlan:
    """The rewrites `convert` would make, without building anything.

    Args:
        model: a Sequential or functional `keras.Model`, or a path to a
            ``.keras``/``.h5`` file.
        head: what a global-pooling head becomes: ``"window"`` (a pooling as
            large as the original feature map: one classification per
            original-size window) or ``"dense"`` (no pooling: the classifier at
            every feature-map position).
        input_size: ``(H, W)`` the classifier was trained at, needed only when
            the model accepts any size.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        A `ConversionPlan`; ``print(plan)`` shows it as a table.
    """
    model = _as_model(model, custom_objects)
    surgeon, graph_plan, size = _plan(model, head, input_size)
    return _public_plan(model, surgeon, graph_plan, size)


def convert(
    model,
    *,
    head: str = "window",
    input_size=None,
    verify: bool = True,
    tolerance=None,
    custom_objects=None,
) -> keras.Model:
    """Turn an image classifier into an equivalent fully convolutional network.

    Flatten + Dense becomes a ``Conv2D`` whose kernel covers the flattened map
    (``valid`` padding); later Dense layers become 1x1 convolutions; global
    pooling heads follow ``head``. Weights are copied, layer names kept, and the
    input's height and width become ``None``: the result takes any image at
    least as large as the original and returns a map of class scores, shaped
    ``(N, H', W', K)`` (``(N, K, H', W')`` for channels-first models). The
    source model is not modified.

    Args:
        model: a Sequential or functional `keras.Model` (nested models
            allowed), or a path to a ``.keras``/``.h5`` file.
        head: ``"window"`` or ``"dense"``, for global-pooling heads (see `plan`).
        input_size: ``(H, W)`` the classifier was trained at; defaults to the
            model's own input size.
        verify: run both models on a random batch at the original size and
            raise `VerificationError` if they differ.
        tolerance: relative tolerance of that check; default by dtype.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        A new functional `keras.Model` made only of built-in Keras layers.

    Raises:
        ConversionError: for a model that cannot be converted faithfully; the
            message names the layer and the way out.
        VerificationError: when ``verify`` finds the result different from
            the source, or cannot compare them (every source output NaN or
            Inf).
        ModelFileError: for a path that cannot be loaded.

    Warns:
        NonFiniteWeightsWarning: when the source holds NaN or Inf weights
            (the message names the layers); they are copied as they are.

    Example:

    ```python
    fcn = keras_fcn_surgery.convert(keras.applications.VGG16(weights=None))
    fcn.predict(np.zeros((1, 320, 320, 3))).shape  # (1, 4, 4, 1000)
    ```
    """
    model = _as_model(model, custom_objects)
    fcn = _build(model, head, input_size)
    nonfinite = nonfinite_weights(model)
    if nonfinite:
        warnings.warn(_nonfinite_message(model, nonfinite), NonFiniteWeightsWarning, stacklevel=2)
    if verify:
        verify_conversion(model, fcn, head=head, input_size=input_size, tolerance=tolerance, raise_on_failure=True)
    return fcn


def nonfinite_weights(model) -> dict[str, list[str]]:
    """The weights holding NaN or Inf, by layer: ``{"'fc1' (Dense)": ["kernel"], ...}``, nested layers included."""
    found: dict[str, list[str]] = {}
    for layer in iter_layers(model):
        if is_graph_model(layer):
            continue
        for weight in layer.weights:
            if not bool(keras.ops.all(keras.ops.isfinite(weight.value))):
                found.setdefault(describe(layer), []).append(weight.name)
    return found


def _nonfinite_message(model, nonfinite: dict[str, list[str]]) -> str:
    listed = "; ".join(f"{layer}: {', '.join(names)}" for layer, names in nonfinite.items())
    return (
        f"Model '{model.name}' has NaN or Inf weights ({listed}). The converted model copies them, so its "
        "outputs are NaN or Inf wherever the source's are. Fix the weights (reload a good checkpoint) to "
        "get a usable model."
    )


def verify_conversion(
    model, fcn, *, head: str = "window", input_size=None, tolerance=None, raise_on_failure: bool = False
):
    """`verify` a conversion made by `convert`, whatever its head.

    A ``head="dense"`` FCN of a global-pooling classifier has a map of several
    cells at the original size, so it cannot be compared with the source
    there. It differs from the ``head="window"`` conversion only by the removed
    pooling (every other layer and weight comes from the same rules), so that
    conversion is the one compared.

    Args:
        model: the classifier.
        fcn: what `convert` returned for it with this ``head``.
        head: the ``head`` it was converted with.
        input_size: as given to `convert`.
        tolerance: relative tolerance; default by dtype.
        raise_on_failure: raise `VerificationError` instead of returning a
            result that did not pass.

    Returns:
        A `VerificationResult`.
    """
    reference = fcn
    if head == "dense" and _removes_a_pooling(model, input_size):
        reference = _build(model, "window", input_size)
    result = verify_models(model, reference, input_size=input_size, tolerance=tolerance)
    if raise_on_failure and result.finite_compared == 0:
        nonfinite = nonfinite_weights(model)
        raise VerificationError(
            f"Every output of '{model.name}' at its original size is NaN or Inf, so the conversion cannot "
            f"be verified ({result}). "
            + (f"{_nonfinite_message(model, nonfinite)} " if nonfinite else "")
            + "Pass `verify=False` (CLI: `--no-verify`) to convert it anyway."
        )
    if raise_on_failure and not result.passed:
        raise VerificationError(
            f"The converted '{model.name}' differs from the source at its original size: {result}. "
            "This is a bug in keras_fcn_surgery or an unsupported layer; please report the model."
        )
    return result


def _build(model, head: str, input_size) -> keras.Model:
    surgeon, graph_plan, _ = _plan(model, head, input_size)
    inputs = [_relaxed_input(source, surgeon.context) for source in graph_plan.graph.inputs]
    outputs = surgeon.build(graph_plan, inputs)
    return keras.Model(_single(inputs), _single(outputs), name=f"{model.name}_fcn")


def _removes_a_pooling(model, input_size) -> bool:
    _, graph_plan, _ = _plan(model, "dense", input_size)
    return any(
        rewrite.new_class == "(removed)" and rewrite.old_class in _GLOBAL_POOLING_CLASSES
        for rewrite in graph_plan.rewrites
    )


def _as_model(model, custom_objects):
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, custom_objects=custom_objects)
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"Expected a `keras.Model` or a path to a `.keras`/`.h5` file. Received: {type(model).__name__}"
        )
    return model


def _plan(model, head: str, input_size):
    if head not in HEADS:
        raise ConversionError(f"Expected `head` to be one of {HEADS}. Received: head={head!r}")
    graph = graph_of(model)
    context = Context(layout=model_layout(model), head=head)
    for tensor in graph.inputs:
        _check_image_input(tensor, context)
    shapes = [(None, *shape) for shape in source_input_shapes(model, input_size)]
    recorded = [tuple(t.shape) for t in graph.inputs]
    size = tuple(context.spatial_shape(shapes[0]))
    surgeon = Surgeon(context)
    graph_plan = surgeon.plan(model, shapes, [SPATIAL] * len(shapes), use_recorded_shapes=shapes == recorded)
    _check_outputs(model, graph_plan, context)
    return surgeon, graph_plan, size


def _public_plan(model, surgeon: Surgeon, graph_plan: GraphPlan, size) -> ConversionPlan:
    return ConversionPlan(
        model_name=model.name,
        input_size=(int(size[0]), int(size[1])),
        data_format=surgeon.context.data_format,
        head=surgeon.context.head,
        rewrites=tuple(graph_plan.rewrites),
    )


def _check_image_input(tensor, context: Context) -> None:
    shape = tuple(tensor.shape)
    name = input_name(tensor)
    if len(shape) != 4:
        raise ConversionError(
            f"Input '{name}' has shape {shape}; only rank-4 image inputs (batch, height, width, "
            "channels) can take a larger size. Models on sequences or vectors are not image classifiers."
        )
    if context.channels(shape) is None:
        raise ConversionError(
            f"Input '{name}' has shape {shape} with an unknown number of channels; give the model's "
            "Input a fixed channel count."
        )


def _check_outputs(model, graph_plan: GraphPlan, context: Context) -> None:
    for tensor, mode, shape in zip(graph_plan.graph.outputs, graph_plan.output_modes, graph_plan.output_shapes):
        producer = producer_of(tensor)
        if isinstance(mode, FlattenedMap):
            raise ConversionError(
                f"Model '{model.name}' ends at {describe(producer)}: a Flatten with no Dense after it. "
                "Remove the Flatten to get the feature map itself."
            )
        if isinstance(mode, Spatial) and len(shape) != 4:
            raise ConversionError(
                f"Output of {describe(producer)} has shape {shape} and does not come from a Flatten + Dense "
                "or global-pooling head, so it cannot become a score map. Supported heads: Flatten then "
                "Dense layers, or GlobalAveragePooling2D/GlobalMaxPooling2D then Dense layers."
            )


def _relaxed_input(source, context: Context):
    channels = context.channels(tuple(source.shape))
    shape = context.layout.image_shape(None, None, channels)
    return keras.Input(shape=shape, dtype=source.dtype, name=input_name(source))


def _single(items):
    return items[0] if len(items) == 1 else items
