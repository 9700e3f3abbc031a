"""Numerical proof that a converted model computes what its source computes."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, replace

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import (
    ConversionError,
    InputError,
    UninformativeVerificationWarning,
    VerificationError,
    first_line,
)
from keras_fcn_surgery.graph import (
    call_inputs,
    describe,
    is_graph_model,
    iter_layers,
    model_layout,
    producer_input,
    producer_of,
    traced_from,
)

# Allowed max |difference| relative to max |source output|, by compute dtype.
# float32 leaves room for the different summation order of a convolution and a
# matrix product; half precision keeps 10 (float16) or 7 (bfloat16) mantissa bits.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 6e-2}

# A check is informative when the source's scores vary across the batch by more than this many
# tolerances (relative to their scale): below it, an FCN that computed the scores of another
# image (or of none) could pass. Twice the tolerance leaves a margin for a batch of two.
INFORMATIVE_SPREAD = 2.0

# Final activations whose input (the logits) is compared instead of their output: a softmax hides
# a shift of every logit and saturates; a sigmoid flattens large logits.
_FINAL_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class VerificationResult:
    """How far the converted model is from its source at the original input size.

    Attributes:
        max_abs_diff: largest absolute difference over all outputs.
        max_rel_diff: ``max_abs_diff`` divided by the largest source output magnitude.
        tolerance: the relative tolerance applied.
        output_scale: the largest source output magnitude.
        input_shape: the batch shape the models ran on.
        nonfinite_matched: output values that are NaN in both models, or the
            same infinity: they count as equal (a source with non-finite
            weights gives them, and its FCN must give them at the same places).
        finite_compared: output values finite in both models and compared
            numerically (None when not counted). When it is 0, nothing was
            compared and the check fails: equality cannot be shown.
        compared: which tensors were compared: ``"outputs"``, or
            ``"logits of 'fc8'"`` when the source ends in a softmax or sigmoid
            (its input is compared: the activation can hide differences).
        input_spread: how much the source's compared values vary across the
            batch: the largest standard deviation over the batch, divided by
            ``output_scale`` (None for a batch of one image, or not measured).
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    output_scale: float
    input_shape: tuple[int, ...]
    nonfinite_matched: int = 0
    finite_compared: int | None = None
    compared: str = "outputs"
    input_spread: float | None = None

    @property
    def informative(self) -> bool:
        """Whether the batch could tell a right conversion from a wrong one.

        False when the source's compared values hardly vary with the input
        (``input_spread`` below `INFORMATIVE_SPREAD` tolerances): an untrained
        or collapsed network, on which any FCN with the right output scale
        would pass. Tiny values are not uninformative as such: float32 keeps
        its relative precision down to ~1e-38 (MobileNetV2 with random
        weights has logits of ~3e-11 that vary, and a 1% change of its last
        kernel fails the check). True when unknown (a batch of one image).
        """
        return self.input_spread is None or self.input_spread > INFORMATIVE_SPREAD * self.tolerance

    @property
    def passed(self) -> bool:
        return (
            bool(np.isfinite(self.max_rel_diff)) and self.max_rel_diff <= self.tolerance and self.finite_compared != 0
        )

    def __str__(self) -> str:
        verdict = "equal" if self.passed else "DIFFERENT"
        if self.finite_compared == 0:
            verdict = "nothing to compare: every source output is NaN or Inf"
        if self.passed and not self.informative:
            verdict += " but uninformative: the source's scores hardly vary with the input"
        nonfinite = f", {self.nonfinite_matched} NaN/Inf outputs in both" if self.nonfinite_matched else ""
        what = "" if self.compared == "outputs" else f" {self.compared}"
        return (
            f"verified{what} on {self.input_shape}: max abs diff {self.max_abs_diff:.3g}, "
            f"max rel diff {self.max_rel_diff:.3g} (tolerance {self.tolerance:g}){nonfinite}: {verdict}"
        )


def tolerance_for(model) -> float:
    """The relative tolerance suited to a model's compute dtypes: the loosest of its layers, nested ones included.

    A mixed policy (``mixed_float16``, ``mixed_bfloat16``) computes in half
    precision, so its half-precision tolerance applies.
    """
    dtypes = {getattr(layer, "compute_dtype", "float32") for layer in iter_layers(model)} or {"float32"}
    return max(RELATIVE_TOLERANCE.get(str(dtype), 1e-4) for dtype in dtypes)


def source_input_shapes(model, input_size=None) -> list[tuple[int, ...]]:
    """Per input, the shape (without batch) of one image at the original size."""
    spatial = model_layout(model).image_spatial_axes
    if input_size is not None:
        input_size = _as_size(input_size)
    shapes = []
    for tensor in model.inputs:
        shape = list(tensor.shape[1:])
        if input_size is not None and len(shape) == 3:
            _check_input_size_fits(model, tensor, [shape[axis] for axis in spatial], input_size)
            for axis, size in zip(spatial, input_size):
                shape[axis] = int(size)
        if any(d is None for d in shape):
            raise InputError(
                f"Model '{model.name}' takes input of shape {tuple(tensor.shape)}, so its original size is "
                "unknown. Pass `input_size=(H, W)`, the size the classifier was trained at."
            )
        shapes.append(tuple(int(d) for d in shape))
    return shapes


def random_inputs(model, *, input_size=None, batch_size: int = 2, seed: int = 0) -> list[np.ndarray]:
    """A batch of standard normal images per input, at the original size."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((batch_size, *shape)).astype(_input_dtype(tensor))
        for shape, tensor in zip(source_input_shapes(model, input_size), model.inputs)
    ]


def check_inputs(model, inputs, *, input_size=None, argument: str = "verify_inputs") -> list[np.ndarray]:
    """``inputs`` as one array per model input, checked against the original size.

    Raises:
        ConversionError: naming ``argument``, for batches of another shape or number.
    """
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    shapes = source_input_shapes(model, input_size)
    if len(arrays) != len(shapes):
        raise ConversionError(
            f"`{argument}` holds {len(arrays)} batches but model '{model.name}' has {len(shapes)} inputs; "
            "give one batch per input, in the order of `model.inputs`."
        )
    checked = []
    for array, shape, tensor in zip(arrays, shapes, model.inputs):
        array = np.asarray(array)
        if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape or array.shape[0] < 1:
            expected = "(N, " + ", ".join(str(d) for d in shape) + ")"
            raise ConversionError(
                f"`{argument}` has shape {tuple(array.shape)}, but model '{model.name}' takes batches of shape "
                f"{expected} at its original size. Resize the images to that size first (the CLI's "
                "`--verify-images` does)."
            )
        checked.append(array.astype(_input_dtype(tensor)))
    return checked


_NO_KERNEL_ADVICE = (
    "If an operation has no kernel on this device (TensorFlow's CPU runs channels-first convolutions only "
    "with oneDNN, which it turns on by default only on AVX-512 processors: set TF_ENABLE_ONEDNN_OPTS=1 "
    "before TensorFlow starts; it has no float16 channels-first Conv2D at all), verify on a device that has "
    "it, or pass `verify=False`."
)


def _scores(model, taps, inputs, failure: str, advice: str = "") -> list:
    """``model``'s scores on ``inputs`` (before the activation at ``taps``); a failure is a `VerificationError`
    that starts with ``failure`` and says what to do."""
    try:
        with _scores_before_activation(model, taps) as scores:
            return _as_list(scores(call_inputs(scores, inputs), training=False))
    except Exception as error:
        raise VerificationError(
            f"{failure}: {type(error).__name__}: {first_line(str(error))} {_NO_KERNEL_ADVICE} {advice}".rstrip()
        ) from error


def compare_models(source, fcn, inputs: list[np.ndarray], *, tolerance=None) -> VerificationResult:
    """Run ``source`` and ``fcn`` on ``inputs`` and compare their logits, or else their outputs.

    No warning: the caller decides (see `warn_if_uninformative`).
    """
    _check_same_channels(source, fcn)
    source_taps, fcn_taps = _logit_taps(source), _logit_taps(fcn)
    compared = _compared(source_taps)
    if source_taps is None or fcn_taps is None or len(source_taps) != len(fcn_taps):
        source_taps = fcn_taps = None
        compared = "outputs"
    shape = tuple(inputs[0].shape)
    expected = _scores(
        source, source_taps, inputs, f"The source model '{source.name}' itself fails on the check batch {shape}"
    )
    actual = _scores(
        fcn,
        fcn_taps,
        inputs,
        f"The converted model '{fcn.name}' fails on the batch {shape} that its source '{source.name}' runs",
        "Otherwise please report the model.",
    )
    if len(expected) != len(actual):
        raise ConversionError(f"Model '{source.name}' has {len(expected)} outputs but its FCN has {len(actual)}.")
    pairs = []
    for want, got in zip(expected, actual):
        want = np.asarray(keras.ops.convert_to_numpy(want), dtype=np.float64)
        got = np.asarray(keras.ops.convert_to_numpy(got), dtype=np.float64)
        if got.size != want.size:
            raise ConversionError(
                f"At the original size the FCN's output has shape {got.shape}, the source's {want.shape}: "
                "the converted model does not reduce to one window there. A `head='dense'` conversion "
                "gives a map at the original size: check it with "
                "`keras_fcn_surgery.verify(model, fcn, head='dense')`."
            )
        pairs.append((want, got.reshape(want.shape)))
    tolerance = float(tolerance if tolerance is not None else tolerance_for(source))
    return compare_scores(pairs, tolerance=tolerance, input_shape=tuple(inputs[0].shape), compared=compared)


def compare_scores(pairs, *, tolerance: float, input_shape: tuple[int, ...], compared: str = "outputs"):
    """The one verification rule, for `convert` and every export: ``(expected, actual)`` pairs compared
    relative to the expected values' scale (`compare_arrays`), and how much the expected values vary over the
    batch (`batch_spread`: `VerificationResult.informative`). ``compared`` names what the arrays are
    (`logits_of`)."""
    result = compare_arrays(pairs, tolerance=tolerance, input_shape=input_shape)
    spread = batch_spread([np.asarray(want, dtype=np.float64) for want, _ in pairs], result.output_scale)
    return replace(result, compared=compared, input_spread=spread)


@contextlib.contextmanager
def logits_of(model):
    """Yield ``(runner, compared)``: what a check compares of ``model``.

    For a model whose every output ends in a softmax or sigmoid (a
    ``Softmax`` layer, or a layer's own ``activation``), ``runner`` computes
    the logits, the inputs of those activations (a layer's own activation is
    switched off while the context lasts), and ``compared`` reads
    ``"logits of 'fc8'"``: a softmax hides a shift of every logit and
    saturates, so its outputs can be equal where the logits are not. Else
    ``(model, "outputs")``.
    """
    taps = _logit_taps(model)
    with _scores_before_activation(model, taps) as runner:
        yield runner, _compared(taps)


def _compared(taps) -> str:
    return "outputs" if taps is None else "logits of " + ", ".join(f"'{layer.name}'" for _, layer, _ in taps)


def warn_if_uninformative(source, result: VerificationResult, stacklevel: int = 2) -> None:
    """Warn `UninformativeVerificationWarning` when ``result`` proves little about ``source``'s conversion.

    ``stacklevel`` counts from the caller of this function (2: its caller's caller).
    """
    if result.informative or result.finite_compared == 0:
        return
    spread = result.input_spread if result.input_spread is not None else 0.0
    why = (
        f"hardly vary with the input (spread {spread:.2g} of their scale, where {INFORMATIVE_SPREAD:g}x the "
        f"tolerance {result.tolerance:g} is needed)"
    )
    warnings.warn(
        f"The check of '{source.name}' proves little: its {result.compared} {why}, as in an untrained network "
        "or one whose features collapse, so an "
        "FCN that ignored the image would pass too. Verify on real images: "
        "`convert(model, verify_inputs=images)` (CLI: `--verify-images DIR`), or load trained weights first.",
        UninformativeVerificationWarning,
        stacklevel=stacklevel + 1,
    )


def batch_spread(arrays, scale: float) -> float | None:
    """The largest standard deviation over the batch axis, relative to ``scale``; None for one image."""
    if not arrays or min(array.shape[0] for array in arrays) < 2:
        return None
    spread = 0.0
    for array in arrays:
        finite = np.where(np.isfinite(array), array, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            deviations = np.nanstd(finite, axis=0)
        spread = max(spread, float(np.max(np.nan_to_num(deviations, nan=0.0), initial=0.0)))
    return spread / scale if scale > 0 else 0.0


def _activation_name(activation) -> str:
    return getattr(activation, "__name__", "") if activation is not None else ""


def _logit_taps(model):
    """Per output, where its logits are: ``("input", layer, tensor)`` for a final Softmax layer,
    ``("linear", layer, output)`` for a layer whose own activation is a softmax or sigmoid; None
    when some output has neither (its outputs are compared as they are)."""
    taps = []
    for tensor in model.outputs:
        layer = producer_of(tensor)
        if isinstance(layer, taxonomy.SOFTMAXES):
            before = producer_input(tensor)
            if before is None:
                return None
            taps.append(("input", layer, before))
        elif (
            layer is not None
            and not is_graph_model(layer)
            and _activation_name(getattr(layer, "activation", None)) in _FINAL_ACTIVATIONS
        ):
            taps.append(("linear", layer, tensor))
        else:
            return None
    return taps


@contextlib.contextmanager
def _scores_before_activation(model, taps):
    """``model``, or a model giving the logits at ``taps`` while the final activations are switched off."""
    if taps is None:
        yield model
        return
    linear = [layer for how, layer, _ in taps if how == "linear"]
    saved = [layer.activation for layer in linear]
    runner = model
    if any(how == "input" for how, _, _ in taps):
        runner = keras.Model(_single(model.inputs), _single([tensor for _, _, tensor in taps]))
    try:
        for layer in linear:
            layer.activation = keras.activations.linear
        yield runner
    finally:
        for layer, activation in zip(linear, saved):
            layer.activation = activation


# Traced twins already compared with their subclassed model.
_CHECKED_TRACES: weakref.WeakSet = weakref.WeakSet()


def check_trace(model) -> None:
    """Compare a traced twin (`graph.traced_model`) with the subclassed model it came from, on a random batch.

    A ``call`` may depend on what a trace cannot see (Python state, the
    ``training`` flag, random numbers drawn outside Keras): then the twin, and
    any conversion of it, is not the model. Nothing to do for other models.

    Raises:
        ConversionError: when they differ beyond the dtype's tolerance, with the difference.
    """
    source = traced_from(model)
    if source is None or model in _CHECKED_TRACES:
        return
    tensor = model.inputs[0]
    dtype = _input_dtype(tensor)
    batch = np.random.default_rng(0).uniform(-1.0, 1.0, (2, *tuple(tensor.shape)[1:])).astype(dtype)
    # At inference, as every map runs them: a random augmentation inside the `call` is the identity then.
    expected = [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(source(batch, training=False))]
    twin = model(call_inputs(model, [batch]), training=False)
    got = [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(twin)]
    tolerance = RELATIVE_TOLERANCE.get(dtype, RELATIVE_TOLERANCE["float32"])
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        result = None
    else:
        result = compare_arrays(list(zip(expected, got)), tolerance=tolerance, input_shape=batch.shape)
    if result is None or not result.passed:
        difference = "other outputs" if result is None else f"max relative difference {result.max_rel_diff:.2g}"
        raise ConversionError(
            f"Model {describe(source)} is a subclassed model whose traced graph differs from its `call` "
            f"({difference}); its `call` depends on something tracing cannot see (Python state, the `training` "
            "flag, random numbers). Rebuild it as a functional model (`keras.Model(inputs, outputs)`)."
        )
    _CHECKED_TRACES.add(model)


def compare_arrays(pairs, *, tolerance: float, input_shape: tuple[int, ...]) -> VerificationResult:
    """Compare ``(expected, actual)`` array pairs of equal shapes.

    NaN in both (or the same infinity) counts as equal; NaN or Inf in one
    only makes the difference infinite. The scale is the largest finite
    expected magnitude over all pairs.
    """
    max_abs, scale, matched, compared = 0.0, 0.0, 0, 0
    for want, got in pairs:
        want = np.asarray(want, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        finite = np.isfinite(want) & np.isfinite(got)
        same_nonfinite = (np.isnan(want) & np.isnan(got)) | (np.isinf(want) & (got == want))
        if not np.all(finite | same_nonfinite):
            max_abs = float("inf")  # NaN or Inf in one model only
        with np.errstate(invalid="ignore"):  # Inf - Inf where both are infinite
            max_abs = max(max_abs, float(np.max(np.abs(got - want)[finite], initial=0.0)))
        scale = max(scale, float(np.max(np.abs(want[finite]), initial=0.0)))
        matched += int(np.count_nonzero(same_nonfinite))
        compared += int(np.count_nonzero(finite))
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return VerificationResult(
        max_abs_diff=max_abs,
        max_rel_diff=relative,
        tolerance=tolerance,
        output_scale=scale,
        input_shape=input_shape,
        nonfinite_matched=matched,
        finite_compared=compared,
    )


def _as_size(input_size) -> tuple[int, int]:
    try:
        size = tuple(int(d) for d in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ConversionError(
            f"Expected `input_size` to be (height, width), two positive integers. Received: "
            f"input_size={input_size!r}; the number of channels comes from the model's input."
        )
    return size  # type: ignore[return-value]


def _check_input_size_fits(model, tensor, fixed, input_size) -> None:
    """Refuse an ``input_size`` that contradicts the model's own fixed input size."""
    if all(d is None or int(d) == int(size) for d, size in zip(fixed, input_size)):
        return
    own = "x".join("any" if d is None else str(d) for d in fixed)
    raise ConversionError(
        f"Model '{model.name}' takes {own} images (its input has shape {tuple(tensor.shape)}), but "
        f"input_size={tuple(input_size)} was given. The window pooling and the Flatten kernels come from the "
        "model's own size, so leave `input_size` out (CLI: no --input-size); if the classifier was trained "
        f"at {input_size[0]}x{input_size[1]}, rebuild it with that `keras.Input` shape (or `(None, None, C)`) "
        "and load its weights, then convert."
    )


def _check_same_channels(source, fcn) -> None:
    if len(source.inputs) != len(fcn.inputs):
        raise ConversionError(
            f"Model '{source.name}' has {len(source.inputs)} inputs but '{fcn.name}' has {len(fcn.inputs)}; "
            "verify compares a classifier with its own conversion."
        )
    layout = model_layout(source)
    for ours, theirs in zip(source.inputs, fcn.inputs):
        if len(ours.shape) != 4 or len(theirs.shape) != 4:
            continue
        axis = layout.channel_axis
        if ours.shape[axis] != theirs.shape[axis]:
            raise ConversionError(
                f"Model '{fcn.name}' takes {theirs.shape[axis]} channels but its source '{source.name}' takes "
                f"{ours.shape[axis]} ({layout.data_format}); verify compares a classifier with its own conversion: "
                "pass the model that `convert` returned for this classifier."
            )


def _input_dtype(tensor) -> str:
    dtype = str(tensor.dtype)
    return dtype if dtype.startswith("float") else "float32"


def _single(items):
    return items[0] if len(items) == 1 else items


def _as_list(outputs) -> list:
    return keras.tree.flatten(outputs)
