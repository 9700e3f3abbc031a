"""Numerical proof that a converted model computes what its source computes."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError, VerificationError, first_line
from keras_fcn_surgery.graph import iter_layers, model_layout

# Allowed max |difference| relative to max |source output|, by compute dtype.
# float32 leaves room for the different summation order of a convolution and a
# matrix product; half precision keeps 10 (float16) or 7 (bfloat16) mantissa bits.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 6e-2}


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
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    output_scale: float
    input_shape: tuple[int, ...]
    nonfinite_matched: int = 0
    finite_compared: int | None = None

    @property
    def passed(self) -> bool:
        return (
            bool(np.isfinite(self.max_rel_diff)) and self.max_rel_diff <= self.tolerance and self.finite_compared != 0
        )

    def __str__(self) -> str:
        verdict = "equal" if self.passed else "DIFFERENT"
        if self.finite_compared == 0:
            verdict = "nothing to compare: every source output is NaN or Inf"
        nonfinite = f", {self.nonfinite_matched} NaN/Inf outputs in both" if self.nonfinite_matched else ""
        return (
            f"verified on {self.input_shape}: max abs diff {self.max_abs_diff:.3g}, "
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
            for axis, size in zip(spatial, input_size):
                shape[axis] = int(size)
        if any(d is None for d in shape):
            raise ConversionError(
                f"Model '{model.name}' takes input of shape {tuple(tensor.shape)}, so its original size is "
                "unknown. Pass `input_size=(H, W)`, the size the classifier was trained at."
            )
        shapes.append(tuple(int(d) for d in shape))
    return shapes


def verify(source, fcn, *, input_size=None, batch_size: int = 2, seed: int = 0, tolerance=None) -> VerificationResult:
    """Run both models on the same random batch at the original size and compare.

    Args:
        source: the classifier.
        fcn: its converted copy.
        input_size: ``(H, W)`` to test at; default: the source's input size.
        batch_size: images in the batch (more than one catches batch mixing).
        seed: seed of the random batch.
        tolerance: allowed ``max_rel_diff``; default from the compute dtype.

    Returns:
        A `VerificationResult`; ``result.passed`` tells whether they agree.
        NaN (or the same infinity) in both models at the same place counts
        as equal; a source whose outputs are all NaN or Inf cannot be
        verified (``passed`` is False: nothing was compared).

    Raises:
        ConversionError: when ``fcn`` takes another number of channels than
            ``source``, or its output does not reduce to the source's at the
            original size.
        VerificationError: when ``fcn`` fails to run where ``source`` runs.
    """
    _check_same_channels(source, fcn)
    rng = np.random.default_rng(seed)
    inputs = [
        rng.standard_normal((batch_size, *shape)).astype(_input_dtype(tensor))
        for shape, tensor in zip(source_input_shapes(source, input_size), source.inputs)
    ]
    expected = _as_list(source(_single(inputs), training=False))
    try:
        actual = _as_list(fcn(_single(inputs), training=False))
    except Exception as error:
        raise VerificationError(
            f"The converted model '{fcn.name}' fails on the batch {tuple(inputs[0].shape)} that its source "
            f"'{source.name}' runs: {type(error).__name__}: {first_line(str(error))} "
            "If an operation has no kernel on this device (TensorFlow's CPU has no float16 channels-first "
            "Conv2D), verify on a device that has it, or pass `verify=False`; otherwise please report the model."
        ) from error
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
                "`keras_fcn_surgery.surgery.convert.verify_conversion(model, fcn, head='dense')`."
            )
        pairs.append((want, got.reshape(want.shape)))
    tolerance = float(tolerance if tolerance is not None else tolerance_for(source))
    return compare_arrays(pairs, tolerance=tolerance, input_shape=tuple(inputs[0].shape))


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
