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
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    input_name,
    is_graph_model,
    node_arguments,
    nodes_in_order,
)
from keras_fcn_surgery.surgery.cloning import LayerCloner
from keras_fcn_surgery.surgery.rules import DEFAULT_RULES
from keras_fcn_surgery.surgery.rules.base import (
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
        nodes = nodes_in_order(graph)
        consumers = _consumers(nodes)
        for node in nodes:
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
                view = NodeView(layer, node, in_modes, in_shapes, out_shapes, self.context, consumers)
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
        raise _no_rule_error(view)

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


def _consumers(nodes) -> dict[int, list]:
    """The nodes that read each tensor, by ``id(tensor)``."""
    consumers: dict[int, list] = {}
    for node in nodes:
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node)
    return consumers


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
