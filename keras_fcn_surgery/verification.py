"""Numerical proof that a converted model computes what its source computes."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import spatial_data_format

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
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    output_scale: float
    input_shape: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel_diff)) and self.max_rel_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "equal" if self.passed else "DIFFERENT"
        return (
            f"verified on {self.input_shape}: max abs diff {self.max_abs_diff:.3g}, "
            f"max rel diff {self.max_rel_diff:.3g} (tolerance {self.tolerance:g}): {verdict}"
        )


def tolerance_for(model) -> float:
    """The relative tolerance suited to a model's compute dtype (the loosest of its layers)."""
    dtypes = {getattr(layer, "compute_dtype", "float32") for layer in model.layers} or {"float32"}
    return max(RELATIVE_TOLERANCE.get(str(dtype), 1e-4) for dtype in dtypes)


def source_input_shapes(model, input_size=None) -> list[tuple[int, ...]]:
    """Per input, the shape (without batch) of one image at the original size."""
    spatial = (0, 1) if spatial_data_format(model) == "channels_last" else (1, 2)
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
    """
    rng = np.random.default_rng(seed)
    inputs = [
        rng.standard_normal((batch_size, *shape)).astype(_input_dtype(tensor))
        for shape, tensor in zip(source_input_shapes(source, input_size), source.inputs)
    ]
    expected = _as_list(source(_single(inputs), training=False))
    actual = _as_list(fcn(_single(inputs), training=False))
    if len(expected) != len(actual):
        raise ConversionError(f"Model '{source.name}' has {len(expected)} outputs but its FCN has {len(actual)}.")
    max_abs, scale = 0.0, 0.0
    for want, got in zip(expected, actual):
        want = np.asarray(keras.ops.convert_to_numpy(want), dtype=np.float64)
        got = np.asarray(keras.ops.convert_to_numpy(got), dtype=np.float64)
        if got.size != want.size:
            raise ConversionError(
                f"At the original size the FCN's output has shape {got.shape}, the source's {want.shape}: "
                "the converted model does not reduce to one window there."
            )
        got = got.reshape(want.shape)
        with np.errstate(invalid="ignore"):
            max_abs = max(max_abs, float(np.max(np.abs(got - want), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(want), initial=0.0)))
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if np.isnan(max_abs):
        relative = float("nan")
    return VerificationResult(
        max_abs_diff=max_abs,
        max_rel_diff=relative,
        tolerance=float(tolerance if tolerance is not None else tolerance_for(source)),
        output_scale=scale,
        input_shape=tuple(inputs[0].shape),
    )


def _input_dtype(tensor) -> str:
    dtype = str(tensor.dtype)
    return dtype if dtype.startswith("float") else "float32"


def _single(items):
    return items[0] if len(items) == 1 else items


def _as_list(outputs) -> list:
    return keras.tree.flatten(outputs)
