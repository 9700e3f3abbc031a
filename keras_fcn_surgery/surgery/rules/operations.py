"""`keras.ops` operations in the classifier head (``x * 2.0``, ``ops.softmax(x)``, ``ops.mean(x, -1, keepdims=True)``).

Keras 3 records such calls as `Operation` nodes, not layers. On the head's
per-image vectors they carry over to the score map when that is exact:

- element-wise operations (activations, casts, arithmetic with a scalar, with a
  per-feature vector, or between head tensors) act on each window's vector
  alone; a per-feature vector is laid along the channel axis of a
  channels-first map;
- softmax-like operations and reductions along the feature axis act along the
  map's channel axis instead (reductions only with ``keepdims=True``, so the
  result is still a map).

Anything else in the head is refused by name: on a score map it would mix
windows or change the meaning of the features.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import constant_arguments, describe, is_layer, operation_kind, with_axis
from keras_fcn_surgery.surgery.rules.base import FlattenedMap, NodeView, Rewrite, Rule, Spatial, Step, VectorMap


def _where(mode) -> str:
    if isinstance(mode, FlattenedMap):
        return f"the flattened features of Flatten '{mode.flatten_name}'"
    return f"the classifier head's per-image vectors (from '{mode.origin}')"


def _feature_axis(view: NodeView, mode) -> int:
    """The source axis that holds the features of the head tensor ``mode`` describes."""
    rank = len(view.input_shapes[0])
    if isinstance(mode, VectorMap) and mode.unit_map:
        return view.context.channel_axis % rank
    return rank - 1


def _normalized_axes(axis, rank: int):
    if axis is None:
        return None
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


class OperationRule(Rule):
    """`keras.ops` operations on head tensors (per-image vectors or flattened features)."""

    def claim(self, view: NodeView) -> Step | None:
        operation = view.layer
        if is_layer(operation):
            return None
        head_modes = [m for m in view.input_modes if not isinstance(m, Spatial)]
        if not head_modes:
            return None
        mode = head_modes[0]
        if len(head_modes) != len(view.input_modes):
            return None  # the engine names a head tensor mixed with a map
        if len({m for m in head_modes}) > 1 and not all(isinstance(m, VectorMap) for m in head_modes):
            return None
        kind = operation_kind(operation)
        if kind == "unary" and not (isinstance(mode, FlattenedMap) and mode.affine is not None):
            return self._unchanged(view, mode)
        if kind == "binary":
            return self._binary(view, mode)
        if isinstance(mode, VectorMap) and kind in ("axis", "reduction", "concatenate"):
            return self._along_features(view, mode, kind)
        raise self._refusal(view, mode)

    @staticmethod
    def _unchanged(view: NodeView, mode) -> Step:
        operation = view.layer
        return Step([mode] * max(len(view.output_shapes), 1), lambda args, kwargs: [operation(*args, **kwargs)])

    def _binary(self, view: NodeView, mode) -> Step:
        operation = view.layer
        if len({m.unit_map for m in view.input_modes if isinstance(m, VectorMap)}) > 1:
            raise self._refusal(view, mode)
        if tuple(view.output_shapes[0]) != tuple(view.input_shapes[0]):
            raise ConversionError(
                f"Operation {describe(operation)} broadcasts {_where(mode)} from {view.input_shapes[0]} to "
                f"{view.output_shapes[0]}; on a score map that broadcast would land on other axes. "
                "Combine head tensors of the same shape, or with scalars or per-feature vectors."
            )
        replacements = {}
        for position, value in constant_arguments(view.node):
            new_value = self._constant_on_map(view, mode, value)
            if new_value is not value:
                replacements[position] = new_value
        if not replacements:
            return self._unchanged(view, mode)

        def build(args, kwargs):
            args = [replacements.get(i, a) for i, a in enumerate(args)]
            return [operation(*args, **kwargs)]

        rewrite = Rewrite(
            operation.name,
            type(operation).__name__,
            (),
            type(operation).__name__,
            (),
            0,
            "per-feature constant laid along the channel axis",
        )
        return Step([mode], build, rewrite)

    @staticmethod
    def _constant_on_map(view: NodeView, mode, value):
        """The constant an element-wise operation needs on the map, or a refusal."""
        array = np.asarray(keras.ops.convert_to_numpy(value)) if not np.isscalar(value) else np.asarray(value)
        if array.size == 1:
            return value
        context = view.context
        rank = len(view.input_shapes[0])
        features = int(view.input_shapes[0][_feature_axis(view, mode)])
        shape = array.shape
        per_feature = shape[-1:] == (features,) and all(d == 1 for d in shape[:-1])
        if isinstance(mode, VectorMap) and not mode.unit_map and per_feature and len(shape) <= rank:
            if context.layout.channels_last:
                return value
            return np.reshape(array, (features, 1, 1))
        if isinstance(mode, VectorMap) and mode.unit_map:
            spatial = context.spatial_shape((1,) * (4 - len(shape)) + tuple(shape)) if len(shape) <= 4 else (0,)
            if all(d == 1 for d in spatial):
                return value
        raise ConversionError(
            f"Operation {describe(view.layer)} combines {_where(mode)} with a constant of shape {shape}; only "
            "scalars and per-feature vectors carry over to a score map. Fold the constant into the layer "
            "before it, or use a Dense/Rescaling layer."
        )

    def _along_features(self, view: NodeView, mode: VectorMap, kind: str) -> Step:
        operation = view.layer
        rank = len(view.input_shapes[0])
        axes = _normalized_axes(getattr(operation, "axis", None), rank)
        if axes != [_feature_axis(view, mode)]:
            raise ConversionError(
                f"Operation {describe(operation)} acts along axis {getattr(operation, 'axis', None)} of "
                f"{_where(mode)} (shape {view.input_shapes[0]}), not along the features only; on a score map "
                "it would mix windows. Act along the last (feature) axis."
            )
        if kind == "reduction" and not getattr(operation, "keepdims", False):
            raise ConversionError(
                f"Operation {describe(operation)} reduces the features of {_where(mode)} and drops the axis; "
                "a score map needs it. Use `keepdims=True`."
            )
        channel_axis = view.context.channel_axis % 4
        raw = operation.axis if not isinstance(operation.axis, (list, tuple)) else operation.axis[0]
        if mode.unit_map or int(raw) % 4 == channel_axis:
            # The axis already names the map's channel axis.
            return self._unchanged(view, mode)
        moved = with_axis(operation, channel_axis)
        rewrite = Rewrite(
            operation.name,
            type(operation).__name__,
            (),
            type(moved).__name__,
            (),
            0,
            f"axis {operation.axis} -> {channel_axis}",
        )
        return Step([mode], lambda args, kwargs: [moved(*args, **kwargs)], rewrite)

    @staticmethod
    def _refusal(view: NodeView, mode) -> ConversionError:
        return ConversionError(
            f"Operation {describe(view.layer)} receives {_where(mode)}; on a score map it would be wrong, and "
            "no rule converts it. Only element-wise operations (activations, casts, arithmetic with scalars or "
            "per-feature vectors), softmax along the features and reductions along the features with "
            "`keepdims=True` can act there: remove or replace it."
        )
