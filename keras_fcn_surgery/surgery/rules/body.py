"""The body: calls on feature maps carry over as they are, unless they tie the map to one size.

`SizeBoundRule` refuses, by name and with the way out, the body layers whose
result fits one input size only (a Reshape of a map, a Resizing, weights laid
along a spatial axis, a map turned into tokens, a layer that fails or stops
growing on a larger map); `BodyRule` copies every other call on feature maps.
They come last: head rules claim their calls first.
"""

from __future__ import annotations

from keras import tree

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError, first_line
from keras_fcn_surgery.graph import describe, is_layer, operation_kind, probe_output_shapes, weights_of
from keras_fcn_surgery.surgery.rules.base import SPATIAL, Context, NodeView, Rule, Spatial, Step


class SizeBoundRule(Rule):
    """Refuses a call on feature maps whose result is tied to one input size; claims nothing else."""

    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        _refuse_size_bound_layer(view)
        _refuse_fixed_size_at_larger_input(view)
        return None


class BodyRule(Rule):
    """Any other call on feature maps: a copy of the layer (weights copied), or the operation re-applied."""

    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        cloner = view.context.cloner
        layer = view.layer

        def build(args, kwargs):
            try:
                return tree.flatten(cloner.call(layer, args, kwargs))
            except ConversionError:
                raise
            except Exception as error:
                raise ConversionError(
                    f"Layer {describe(layer)} cannot run on a feature map of unknown height and width "
                    f"({first_line(str(error))}); its code needs one fixed input size. Make its `call` read "
                    "sizes with `keras.ops.shape(x)` rather than `x.shape`, or keep the model at its size."
                ) from error

        return Step([SPATIAL] * max(len(view.output_shapes), 1), build, plain_copy=True)


def _refuse_size_bound_layer(view: NodeView) -> None:
    """Refuse body layers whose result is tied to one input size."""
    layer = view.layer
    in_shape = view.input_shapes[0] if view.input_shapes else ()
    spatial = view.context.spatial_shape(in_shape) if len(in_shape) == 4 else ()
    is_map = len(in_shape) == 4 and any(d is None or d > 1 for d in spatial)
    if isinstance(layer, taxonomy.RESHAPE) and is_map:
        raise ConversionError(
            f"Layer {describe(layer)} reshapes a {in_shape[1:]} feature map to {layer.target_shape}; "
            "that shape only fits one input size. Remove the Reshape or use Flatten before the classifier."
        )
    if not is_layer(layer) and operation_kind(layer) == "reshaping" and is_map:
        raise ConversionError(
            f"Operation {describe(layer)} ({type(layer).__name__.lower()}) rearranges the axes of a {in_shape[1:]} "
            "feature map; the result fits only this map size. Keep feature maps in one layout, and flatten "
            "only in the classifier head (a Flatten layer)."
        )
    if is_map and _tokens_from_map(in_shape, view.output_shapes):
        raise ConversionError(
            f"Layer {describe(layer)} turns the {in_shape[1:]} feature map into a tensor of shape "
            f"{view.output_shapes[0][1:]} (a sequence of tokens); what follows (a class token, position "
            "embeddings for a fixed number of tokens, attention over all tokens) is tied to one input size, "
            "so the model cannot become fully convolutional. Only convolutional bodies can be converted."
        )
    if isinstance(layer, taxonomy.PERMUTE) and is_map and tuple(layer.dims) != (1, 2, 3):
        raise ConversionError(
            f"Layer {describe(layer)} permutes the axes of a feature map; the converter needs one "
            "fixed layout. A Permute is folded only where Flatten layers alone read it (its order goes into the "
            "Dense's kernel); elsewhere use `data_format` on the layers instead."
        )
    if isinstance(layer, taxonomy.RESIZINGS):
        raise ConversionError(
            f"Layer {describe(layer)} resizes every image to {layer.height}x{layer.width}, so a larger "
            "image would not give a larger map. Remove it from the model and resize outside."
        )
    if isinstance(layer, taxonomy.FLATTEN) and len(in_shape) > 2:
        raise ConversionError(
            f"Layer {describe(layer)} flattens a rank-{len(in_shape)} tensor; only a Flatten of a "
            "rank-4 image feature map can start a convertible head."
        )
    if isinstance(layer, taxonomy.DENSE) and len(in_shape) == 3:
        raise ConversionError(
            f"Layer {describe(layer)} receives a rank-3 tensor {in_shape}; only Dense layers fed by "
            "Flatten or global pooling of a spatial map can become convolutions."
        )
    spatial_axes = _spatial_weight_axes(layer, in_shape, view.context)
    if spatial_axes:
        layout = view.context.layout
        if isinstance(layer, taxonomy.DENSE):
            way_out = f"Use a 1x1 Conv2D(data_format='{layout.data_format}') instead of the Dense."
        else:
            way_out = f"Make it act on the channel axis (axis={layout.channel_axis})."
        raise ConversionError(
            f"Layer {describe(layer)} has weights laid along axis {spatial_axes[0]} of the {in_shape[1:]} "
            f"{layout.data_format} feature map, a spatial axis, so they fit only this map size. {way_out}"
        )


def _tokens_from_map(in_shape, output_shapes) -> bool:
    """Whether a layer turns a map into a sequence of tokens (patches, positions, a class token).

    A rank-3 result that is the map with one axis taken away (a row, a column)
    is not a sequence of tokens.
    """
    kept = [tuple(d for i, d in enumerate(in_shape[1:]) if i != dropped) for dropped in range(3)]
    return any(len(shape) == 3 and tuple(shape[1:]) not in kept for shape in output_shapes)


def _refuse_fixed_size_at_larger_input(view: NodeView) -> None:
    """Refuse a body layer that cannot take a larger map, or whose map does not grow with its input.

    The layer is asked for its output shapes with every input map twice as high
    and wide: a layer holding a map-sized constant (a position embedding, a
    fixed reshape) fails there, one that resizes to a fixed size gives the same
    map as before.
    """
    context = view.context
    larger, grew = [], False
    for shape in view.input_shapes:
        spatial = context.spatial_shape(shape) if len(shape) == 4 else ()
        if spatial and all(d is not None for d in spatial) and any(d > 1 for d in spatial):
            doubled = context.layout.batch_shape(shape[0], 2 * spatial[0], 2 * spatial[1], context.channels(shape))
            larger.append(tuple(doubled))
            grew = True
        else:
            larger.append(tuple(shape))
    if not grew:
        return
    layer = view.layer
    try:
        shapes = probe_output_shapes(view.node, larger)
    except Exception as error:
        raise ConversionError(
            f"Layer {describe(layer)} fails on a feature map larger than the one it was built for "
            f"({first_line(str(error))}): it is tied to one input size (a weight or constant laid out over the "
            "map, a fixed reshape). Only layers that work at any map size can be made fully convolutional."
        ) from error
    for before, after in zip(view.output_shapes, shapes):
        if len(before) == 4 and len(after) == 4:
            old, new = context.spatial_shape(before), context.spatial_shape(after)
            if None not in old and any(d > 1 for d in old) and tuple(old) == tuple(new):
                raise ConversionError(
                    f"Layer {describe(layer)} gives a {old[0]}x{old[1]} map whatever the size of its input, "
                    "so a larger image would not give a larger score map. Remove it from the model "
                    "(resize outside) to convert."
                )


def _spatial_weight_axes(layer, in_shape, context: Context) -> list[int]:
    """Spatial axes of a rank-4 map along which a layer's weights are laid.

    For example BatchNormalization(axis=1) on a channels-last map, or a Dense
    (which reads the last axis) on a channels-first map.
    """
    if len(in_shape) != 4 or not weights_of(layer):
        return []
    if isinstance(layer, taxonomy.DENSE):
        axes = [3]
    elif isinstance(getattr(layer, "axis", None), (int, list, tuple)):
        axes = [int(a) % 4 for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
    else:
        return []
    spatial = context.layout.spatial_axes
    return sorted(a for a in axes if a in spatial)
