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

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe, graph_of, input_name, is_graph_model, node_arguments, nodes_in_order
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
    copy_layer,
)

_FEATURE_LAYERS_TEXT = (
    "Dense, Dropout, Activation, Softmax, BatchNormalization, LayerNormalization, "
    "Add/Concatenate of head branches, and Reshape between (C,) and (1, 1, C)"
)
_MERGE_INTO_MAP = (keras.layers.Multiply, keras.layers.Add, keras.layers.Subtract)
_GLOBAL_POOLINGS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


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
        return copy_layer(view, SPATIAL)

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


def _spatial_weight_axes(layer, in_shape, context: Context) -> list[int]:
    """Spatial axes of a rank-4 map along which a layer's weights are laid.

    For example BatchNormalization(axis=1) on a channels-last map, or a Dense
    (which reads the last axis) on a channels-first map.
    """
    if len(in_shape) != 4 or not layer.weights:
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
