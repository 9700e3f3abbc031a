"""The graph walk: plan every layer call with the head rules, then build the new graph.

Planning reads only the source (its tensors' shapes at the original input size)
and decides, call by call, what the converted graph holds. Building creates the
new layers on an input whose height and width are ``None``. Nested models are
planned and built recursively and stay nested models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import keras
from keras import tree

from keras_fcn_surgery.errors import ConversionError, first_line
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    input_name,
    is_graph_model,
    is_layer,
    node_arguments,
    nodes_in_order,
    probe_output_shapes,
    weights_of,
)
from keras_fcn_surgery.surgery.cloning import LayerCloner
from keras_fcn_surgery.surgery.rules import DEFAULT_RULES
from keras_fcn_surgery.surgery.rules.base import (
    SPATIAL,
    Context,
    FlattenedMap,
    NodeView,
    Rewrite,
    Spatial,
    Step,
    VectorMap,
)

_FEATURE_LAYERS_TEXT = (
    "Dense, Dropout, Activation, Softmax, BatchNormalization, LayerNormalization, "
    "Add/Concatenate of head branches, and Reshape between (C,) and (1, 1, C)"
)
_MERGE_INTO_MAP = (keras.layers.Multiply, keras.layers.Add, keras.layers.Subtract)
_GLOBAL_POOLINGS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# keras.ops operations that move values between axes: on a feature map they tie it to one size.
_RESHAPING_OPERATIONS = frozenset({"Reshape", "Transpose", "Swapaxes", "Moveaxis", "Ravel", "Flatten", "Squeeze"})


@dataclass
class GraphPlan:
    """The planned steps of one (possibly nested) model."""

    model: keras.Model
    graph: keras.Model
    steps: list = field(default_factory=list)
    output_modes: list = field(default_factory=list)
    output_shapes: list = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)


class Surgeon:
    """Plans and builds the fully convolutional copy of one model."""

    def __init__(self, context: Context, rules=DEFAULT_RULES):
        self.context = replace(context, cloner=LayerCloner())  # the caller's context is left as it is
        self.rules = rules
        self._kinds_by_layer: dict[int, bool] = {}
        self._nested_models: dict[int, keras.Model] = {}

    # Planning -----------------------------------------------------------------

    def plan(self, model, input_shapes, input_modes, use_recorded_shapes: bool) -> GraphPlan:
        graph = graph_of(model)
        plan = GraphPlan(model=model, graph=graph)
        specs, modes = {}, {}
        for source, shape, mode in zip(graph.inputs, input_shapes, input_modes):
            specs[id(source)] = keras.KerasTensor(shape, dtype=source.dtype)
            modes[id(source)] = mode
        feeding_back = _global_poolings_feeding_back(graph, self.context)
        for node in nodes_in_order(graph):
            layer = node.operation
            inputs = node.input_tensors
            in_modes = [modes[id(t)] for t in inputs]
            in_shapes = [tuple(specs[id(t)].shape) for t in inputs]
            if is_graph_model(layer):
                nested = self.plan(layer, in_shapes, in_modes, use_recorded_shapes)
                out_shapes = nested.output_shapes
                step = self._nested_step(layer, nested)
                plan.rewrites.extend(nested.rewrites)
            else:
                out_shapes = self._output_shapes(node, specs, use_recorded_shapes)
                view = NodeView(layer, node, in_modes, in_shapes, out_shapes, self.context, id(node) in feeding_back)
                step = self._claim(view)
            self._check_sharing(layer, step)
            if step.rewrite is not None:
                plan.rewrites.append(step.rewrite)
            out_modes = step.output_modes
            if len(out_modes) != len(node.outputs):
                out_modes = out_modes[:1] * len(node.outputs)
            for output, shape, mode in zip(node.outputs, out_shapes, out_modes):
                specs[id(output)] = keras.KerasTensor(shape, dtype=output.dtype)
                modes[id(output)] = mode
            plan.steps.append((node, step))
        plan.output_modes = [modes[id(t)] for t in graph.outputs]
        plan.output_shapes = [tuple(specs[id(t)].shape) for t in graph.outputs]
        return plan

    def _output_shapes(self, node, specs, use_recorded_shapes: bool) -> list[tuple]:
        if use_recorded_shapes:
            return [tuple(t.shape) for t in node.outputs]
        args, kwargs = node_arguments(node, specs)
        try:
            outputs = node.operation.compute_output_spec(*args, **kwargs)
        except Exception as error:
            raise ConversionError(
                f"Layer {describe(node.operation)} cannot work out its output shape at the requested "
                f"input size ({error}). Check `input_size`."
            ) from error
        return [tuple(t.shape) for t in tree.flatten(outputs)]

    def _claim(self, view: NodeView) -> Step:
        for rule in self.rules:
            accepts = getattr(rule, "accepts", None)  # a rule that declares nothing takes every call
            if accepts is not None and not accepts(view):
                continue
            step = rule.claim(view)
            if step is not None:
                return step
        if all(isinstance(mode, Spatial) for mode in view.input_modes):
            return self._plain_copy_step(view)
        raise _no_rule_error(view)

    def _plain_copy_step(self, view: NodeView) -> Step:
        _refuse_size_bound_layer(view)
        _refuse_fixed_size_at_larger_input(view)
        cloner = self.context.cloner
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

    def _nested_step(self, model, nested: GraphPlan) -> Step:
        def build(args, kwargs):
            submodel = self._nested_models.get(id(model))
            if submodel is None:
                submodel = self._build_submodel(model, nested, tree.flatten(args))
                self._nested_models[id(model)] = submodel
            return tree.flatten(submodel(*args, **kwargs))

        return Step(list(nested.output_modes), build, plain_copy=not nested.rewrites)

    def _check_sharing(self, layer, step: Step) -> None:
        seen = self._kinds_by_layer.get(id(layer))
        self._kinds_by_layer[id(layer)] = step.plain_copy
        if seen is not None and not (seen and step.plain_copy):
            raise ConversionError(
                f"Layer {describe(layer)} is shared between the classifier head and another place in "
                "the graph; rewriting it for the head would change the other use. Give each use its "
                "own layer (with the same weights) before converting."
            )

    # Building -----------------------------------------------------------------

    def build(self, plan: GraphPlan, new_inputs):
        tensors = {id(source): new for source, new in zip(plan.graph.inputs, new_inputs)}
        for node, step in plan.steps:
            args, kwargs = node_arguments(node, tensors)
            outputs = step.build(args, kwargs)
            for source, new in zip(node.outputs, outputs):
                tensors[id(source)] = new
        return [tensors[id(t)] for t in plan.graph.outputs]

    def _build_submodel(self, model, nested: GraphPlan, outer_tensors):
        inputs = [
            keras.Input(shape=tuple(t.shape)[1:], dtype=t.dtype, name=input_name(source))
            for source, t in zip(nested.graph.inputs, outer_tensors)
        ]
        outputs = self.build(nested, inputs)
        submodel = keras.Model(_single(inputs), _single(outputs), name=model.name)
        submodel.trainable = model.trainable
        return submodel


def _single(tensors):
    return tensors[0] if len(tensors) == 1 else tensors


def _global_poolings_feeding_back(graph, context: Context) -> set[int]:
    """Ids of global-pooling nodes whose result is merged back into a feature map.

    That is the squeeze-and-excitation pattern (EfficientNet, MobileNetV3): such
    a pooling belongs to the body and runs over the whole image in the FCN.
    """
    consumers: dict[int, list] = {}
    nodes = nodes_in_order(graph)
    for node in nodes:
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node)
    feeding_back = set()
    for node in nodes:
        if not isinstance(node.operation, _GLOBAL_POOLINGS):
            continue
        downstream = {id(t) for t in node.outputs}
        frontier = list(node.outputs)
        while frontier and id(node) not in feeding_back:
            tensor = frontier.pop()
            for consumer in consumers.get(id(tensor), []):
                outsiders = [t for t in consumer.input_tensors if id(t) not in downstream]
                merges_into_map = any(_is_large_map(t, context) for t in outsiders)
                if isinstance(consumer.operation, _MERGE_INTO_MAP) and merges_into_map:
                    feeding_back.add(id(node))
                    break
                for output in consumer.outputs:
                    if id(output) not in downstream:
                        downstream.add(id(output))
                        frontier.append(output)
    return feeding_back


def _is_large_map(tensor, context: Context) -> bool:
    shape = tuple(tensor.shape)
    return len(shape) == 4 and any(d is None or d > 1 for d in context.spatial_shape(shape))


def _refuse_size_bound_layer(view: NodeView) -> None:
    """Refuse body layers whose result is tied to one input size."""
    layer = view.layer
    in_shape = view.input_shapes[0] if view.input_shapes else ()
    spatial = view.context.spatial_shape(in_shape) if len(in_shape) == 4 else ()
    is_map = len(in_shape) == 4 and any(d is None or d > 1 for d in spatial)
    if isinstance(layer, keras.layers.Reshape) and is_map:
        raise ConversionError(
            f"Layer {describe(layer)} reshapes a {in_shape[1:]} feature map to {layer.target_shape}; "
            "that shape only fits one input size. Remove the Reshape or use Flatten before the classifier."
        )
    if not is_layer(layer) and type(layer).__name__ in _RESHAPING_OPERATIONS and is_map:
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
    if isinstance(layer, keras.layers.Permute) and is_map and tuple(layer.dims) != (1, 2, 3):
        raise ConversionError(
            f"Layer {describe(layer)} permutes the axes of a feature map; the converter needs one "
            "fixed layout. Use `data_format` on the layers instead of Permute."
        )
    if isinstance(layer, keras.layers.Resizing):
        raise ConversionError(
            f"Layer {describe(layer)} resizes every image to {layer.height}x{layer.width}, so a larger "
            "image would not give a larger map. Remove it from the model and resize outside."
        )
    if isinstance(layer, keras.layers.Flatten) and len(in_shape) > 2:
        raise ConversionError(
            f"Layer {describe(layer)} flattens a rank-{len(in_shape)} tensor; only a Flatten of a "
            "rank-4 image feature map can start a convertible head."
        )
    if isinstance(layer, keras.layers.Dense) and len(in_shape) == 3:
        raise ConversionError(
            f"Layer {describe(layer)} receives a rank-3 tensor {in_shape}; only Dense layers fed by "
            "Flatten or global pooling of a spatial map can become convolutions."
        )
    spatial_axes = _spatial_weight_axes(layer, in_shape, view.context)
    if spatial_axes:
        layout = view.context.layout
        if isinstance(layer, keras.layers.Dense):
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
    if isinstance(layer, keras.layers.Dense):
        axes = [3]
    elif isinstance(getattr(layer, "axis", None), (int, list, tuple)):
        axes = [int(a) % 4 for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
    else:
        return []
    spatial = context.layout.spatial_axes
    return sorted(a for a in axes if a in spatial)


def _no_rule_error(view: NodeView) -> ConversionError:
    layer = view.layer
    head_mode = next(m for m in view.input_modes if not isinstance(m, Spatial))
    if isinstance(head_mode, FlattenedMap):
        what = f"the flattened features of Flatten '{head_mode.flatten_name}'"
        allowed = "Dense, or element-wise layers (Dropout, ReLU, Activation) before it"
    else:
        assert isinstance(head_mode, VectorMap)
        what = f"the classifier head's per-image vectors (from '{head_mode.origin}')"
        allowed = _FEATURE_LAYERS_TEXT
    if len(set(map(type, view.input_modes))) > 1:
        return ConversionError(
            f"Layer {describe(layer)} mixes {what} with a spatial tensor; on a score map the two do "
            "not line up. Keep the classifier head a chain of per-image layers."
        )
    return ConversionError(
        f"Layer {describe(layer)} receives {what}; on a score map it would be wrong, and no rule "
        f"converts it. Only {allowed} can act there: remove or replace it."
    )
