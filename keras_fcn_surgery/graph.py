"""Reading Keras 3 model graphs: nodes in order, layer descriptions, layouts.

This is the one module that touches Keras internals (``keras.src``, private
attributes of models, nodes and tensors). Everything else reads graphs through
the functions here, so a Keras release that moves them breaks one file.
"""

from __future__ import annotations

import inspect
import os
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any

import keras
from keras.src.models.functional import Functional

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.layout import Layout, common_layout
from keras_fcn_surgery.names import runtime_name


def describe(layer) -> str:
    """``'name' (Class)``, the way every message names a layer."""
    return f"'{layer.name}' ({layer.__class__.__name__})"


def is_graph_model(layer) -> bool:
    """True for Sequential and functional models, the ones made of a layer graph."""
    return isinstance(layer, (keras.Sequential, Functional))


def is_subclassed_model(layer) -> bool:
    """True for a `keras.Model` subclass whose graph is Python code (not a Sequential or functional model)."""
    return isinstance(layer, keras.Model) and not is_graph_model(layer)


def graph_of(model):
    """The functional graph behind a Sequential, functional or subclassed model.

    A subclassed model's graph is its `traced_model`.

    Raises:
        ConversionError: for a Sequential that was never given an input shape,
            or a subclassed model whose ``call`` does not trace.
    """
    if isinstance(model, keras.Sequential):
        graph = model._functional
        if graph is None:
            raise ConversionError(
                f"Sequential model '{model.name}' has no input shape, so its graph is unknown. "
                "Start it with `keras.Input(shape=...)` or call `model.build((None, H, W, C))` first."
            )
        return graph
    if isinstance(model, Functional):
        return model
    return traced_model(model)


@dataclass(eq=False)
class ModelFacts:
    """What this process learned about one model object, kept on the object itself (`model_facts`).

    It dies with the model: no table of the process outlives it or is keyed by
    its identity. A copy or an unpickled model starts with none (a file keeps
    what it records itself: `saving.record`). Each field belongs to the module
    that fills it.

    Attributes:
        traced: `traced_model`'s twin of the model (None until asked).
        traced_from: for a traced twin, the model it is the twin of.
        conversions: `surgery.fcn.as_fcn`'s FCNs of a classifier, by
            ``(head, input_size, verify)``.
        source: for an FCN, ``(weak reference to its classifier, (H, W))``
            (`remember_source`).
        rarefied: `surgery.atrous.rarefy`'s FCNs à trous of an FCN, by stride.
        origin: for an FCN à trous, ``(weak reference to its FCN, stride)``.
        record: what the ``.keras`` file the model was loaded from recorded
            (`saving.loading.recorded_source`).
        analysis: for a classifier, `inference.windowed.analysis` (its window
            and the places to split it).
        refusals: for a classifier, `inference.windowed.conversion`'s
            conversion errors, by ``(head, input_size)``: a refused model is
            not converted again on every call.
        plans: for an FCN, `inference.staged.plan_fcn`'s plans, by image size
            and tiling (the most recent last).
        stages: for an FCN, `inference.staged`'s stage models, by cut.
        forwards: `inference.engines.forward`'s compiled forward passes, by
            ``(engine, precision)``.
        choices: `inference.engines.choose_engine`'s choices under ``"auto"``,
            by ``(call shape, precision)``: ``(generation, choice)``.
        blas_split: whether `inference.blas.split_forward` splits the model at
            a head convolution (None until asked).
        policy_copies: `inference.engines.policy_copy`'s copies of the model,
            by dtype policy.
        stitch_plans: for an FCN à trous, `inference.stitch.stitch_plan`'s
            plans (or the refusal), by stride.
        axis_programs: `grid.geometry`'s compiled axes of the model, by
            output (None: every output).
        tile_arithmetic: for a stage model, `inference.staged`'s
            multiply-accumulates and exact cells of its tile shapes, by
            layout, channels and reference tile.
        fragment_plans: for an FCN, `inference.fragments.fragments_plan`'s
            plans (or the refusal), by stride.
    """

    traced: object = None
    traced_from: object = None
    conversions: dict = field(default_factory=dict)
    source: tuple | None = None
    rarefied: dict = field(default_factory=dict)
    origin: tuple | None = None
    record: dict | None = None
    analysis: object = None
    refusals: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    forwards: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    blas_split: bool | None = None
    policy_copies: dict = field(default_factory=dict)
    stitch_plans: dict = field(default_factory=dict)
    axis_programs: dict = field(default_factory=dict)
    tile_arithmetic: dict = field(default_factory=dict)
    fragment_plans: dict = field(default_factory=dict)

    # A copy of a model (copy, deepcopy, pickle) is another object: it learns its own facts.
    def __copy__(self) -> ModelFacts:
        return ModelFacts()

    def __deepcopy__(self, memo) -> ModelFacts:
        return ModelFacts()

    def __reduce__(self):
        return (ModelFacts, ())


# The attribute a model's facts are kept in: set past Keras's attribute tracking, so they are no layer, no
# weight and no part of the model's configuration or saved file.
_FACTS = "_kfs_facts"
_FACTS_LOCK = threading.Lock()


def model_facts(model) -> ModelFacts:
    """The `ModelFacts` kept on ``model`` (made empty on first use)."""
    facts = vars(model).get(_FACTS)
    if facts is None:
        with _FACTS_LOCK:
            facts = vars(model).get(_FACTS)
            if facts is None:
                facts = ModelFacts()
                object.__setattr__(model, _FACTS, facts)
    return facts


def remember_source(fcn, source, size) -> None:
    """Record that ``fcn`` was converted from ``source`` at input size ``size`` (``(H, W)``), for `source_of`.

    Kept on ``fcn`` (`graph.model_facts`), the classifier held weakly: `certify_map` reads it to know which
    crop a cell stands for and what to run on it.
    """
    model_facts(fcn).source = (weakref.ref(source), (int(size[0]), int(size[1])))


def source_of(fcn) -> tuple[keras.Model | None, tuple[int, int] | None]:
    """The classifier ``fcn`` was converted from in this process and that classifier's ``(H, W)``.

    ``(None, size)`` when the classifier is gone (garbage-collected), ``(None,
    None)`` for an FCN not converted in this process (loaded from a file: the
    file does not record it).
    """
    reference, size = model_facts(fcn).source or (None, None)
    return (reference() if reference is not None else None), size


def traced_model(model) -> keras.Model:
    """A functional model that computes what a subclassed model's ``call`` does, on the same layers.

    The ``call`` runs once on symbolic inputs of the model's built shape: the
    layers and `keras.ops` operations it calls are recorded as a graph, and
    subclassed models it calls are traced in turn (they become nested
    functional models). The weights are the model's own, shared, not copied.
    `surgery.verify.check_trace` compares the twin with the model (a ``call``
    may depend on what tracing cannot see). A Sequential or functional model is returned as it is, unless
    it calls subclassed models (then they are traced in it).

    Raises:
        ConversionError: when the input shape is unknown, or when ``call`` does
            not trace (Python control flow on tensor values, backend
            functions), naming the line.
    """
    facts = model_facts(model)
    twin = facts.traced
    if twin is None:
        if is_subclassed_model(model):
            twin = _trace(model)
        else:
            graph = graph_of(model)
            twin = _inline_subclassed(graph)
            if twin is graph:
                return model
        facts.traced = twin
        model_facts(twin).traced_from = model
    return twin  # type: ignore[return-value]


def traced_from(model):
    """The model ``model`` is the `traced_model` of, or None for a model that is not a traced twin."""
    return model_facts(model).traced_from


def _built_input_shape(model) -> tuple:
    """The input shape (batch axis included) a subclassed model was built or first called with."""
    shapes = [s for s in (getattr(model, "_build_shapes_dict", None) or {}).values() if s is not None]
    if len(shapes) > 1:
        raise ConversionError(
            f"Model {describe(model)} is a subclassed model with {len(shapes)} inputs; only one-image-input "
            "subclassed models are traced. Rebuild it as a functional model (`keras.Model(inputs, outputs)`)."
        )
    if shapes:
        return tuple(shapes[0])
    default = inspect.signature(model.build).parameters.get("input_shape")
    if default is not None and isinstance(default.default, (tuple, list)):
        return tuple(default.default)
    # Keras records no shape when its own symbolic build of `call` failed; the first layer's input is a
    # guess that the trace and the twin check confirm (or refute, naming the line that does not trace).
    for layer in model._flatten_layers(include_self=False, recursive=True):
        recorded = [s for s in (getattr(layer, "_build_shapes_dict", None) or {}).values() if s is not None]
        if recorded and len(recorded[0]) == 4:
            return tuple(recorded[0])
    raise ConversionError(
        f"Model {describe(model)} is a subclassed model whose input shape is unknown. Call it once on a batch "
        "of the size it was trained at (`model(x)`) or build it (`model.build((None, H, W, C))`) first."
    )


def _trace(model) -> keras.Model:
    shape = _built_input_shape(model)
    inputs = keras.Input(batch_shape=(None, *shape[1:]), name=runtime_name(model.name, "input"))
    try:
        outputs = model.call(inputs)
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported with its line
        raise ConversionError(
            f"Model {describe(model)} is a subclassed model whose `call` could not be traced on symbolic "
            f"inputs{_user_line(error)}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            "Write data-dependent steps with `keras.ops` (e.g. `keras.ops.where`), or rebuild the model as a "
            "functional model (`keras.Model(inputs, outputs)`) and load its weights into that."
        ) from error
    flat = keras.tree.flatten(outputs)
    if not flat or not all(isinstance(t, keras.KerasTensor) for t in flat):
        raise ConversionError(
            f"Model {describe(model)} is a subclassed model whose `call` returns something other than tensors "
            "computed from its input; rebuild it as a functional model (`keras.Model(inputs, outputs)`)."
        )
    return _inline_subclassed(Functional(inputs, outputs, name=model.name))


def _inline_subclassed(graph) -> keras.Model:
    """``graph`` with every call of a subclassed model replaced by a call of its traced twin."""
    nodes = _nodes_in_order(graph)
    if not any(is_subclassed_model(node.operation) for node in nodes):
        return graph
    values = {id(t): t for t in graph.inputs}
    for node in nodes:
        operation = node.operation
        if is_subclassed_model(operation):
            operation = traced_model(operation)
        args, kwargs = node.arguments.fill_in(values)
        outputs = keras.tree.flatten(operation(*args, **kwargs))
        for tensor, value in zip(node.outputs, outputs):
            values[id(tensor)] = value
    outputs = keras.tree.pack_sequence_as(graph._outputs_struct, [values[id(t)] for t in graph.outputs])
    return Functional(graph._inputs_struct, outputs, name=graph.name)


def _user_line(error: BaseException) -> str:
    """`` at file.py:12 (`code`)``: the deepest frame of the failure outside Keras and TensorFlow, or ''."""
    library = (os.sep + "keras" + os.sep, os.sep + "tensorflow" + os.sep, os.sep + "keras_fcn_surgery" + os.sep)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not any(part in f.filename for part in library)]
    if not frames:
        return ""
    frame = frames[-1]
    code = f" (`{frame.line.strip()}`)" if frame.line else ""
    return f" at {os.path.basename(frame.filename)}:{frame.lineno}{code}"


@dataclass(frozen=True, eq=False)
class Call:
    """One recorded call of a model's graph: what the package reads of a Keras ``Node`` (which stays in this module).

    Attributes:
        operation: the layer or `keras.ops` operation called.
        input_tensors: the symbolic tensors it read.
        outputs: the symbolic tensors it made.
    """

    operation: Any
    input_tensors: tuple
    outputs: tuple
    _node: Any = field(repr=False)


def _as_call(node) -> Call:
    return Call(node.operation, tuple(node.input_tensors), tuple(node.outputs), node)


def nodes_in_order(graph) -> list[Call]:
    """The graph's calls, inputs first, in an order where every call follows its inputs."""
    return [_as_call(node) for node in _nodes_in_order(graph)]


def _nodes_in_order(graph):
    ordered = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                ordered.append(node)
    return ordered


def iter_layers(model):
    """Every layer of a model, nested models (subclassed ones too) entered, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def spatial_data_format(model) -> str:
    """The layout of the model's spatial maps: ``"channels_last"`` or ``"channels_first"``.

    Read from its convolutions and poolings (Flatten's own setting is about how it
    reads a map, not about the map). A model without any falls back to Keras's
    global ``image_data_format``.

    Raises:
        ConversionError: when the model mixes both layouts.
    """
    return model_layout(model).data_format


def producer_of(tensor):
    """The operation (layer or `keras.ops` call) that produced a symbolic tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    return getattr(history, "operation", None)


def producer_input(tensor):
    """The one input tensor of the call that produced a symbolic tensor, or None (no call, or several inputs)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    inputs = history.operation._inbound_nodes[history.node_index].input_tensors
    return inputs[0] if len(inputs) == 1 else None


def batch_norm_folds(model) -> dict[str, Any]:
    """The BatchNormalizations of a functional model that fold into the convolution they read, by name.

    A BatchNormalization folds (`surgery.kernels.fold_affine_after_conv`) where it
    reads, on the channel axis, the output of a Conv2D or DepthwiseConv2D with a
    linear activation that nothing else reads (not a model output either), each
    layer called once. Returns ``{batch norm's name: (convolution, batch norm)}``;
    empty for a Sequential or subclassed model (their graphs are not rebuilt
    call by call).
    """
    if not isinstance(model, Functional) or isinstance(model, keras.Sequential):
        return {}
    calls = nodes_in_order(model)
    readers: dict[int, int] = {}
    uses: dict[int, int] = {}
    for call in calls:
        uses[id(call.operation)] = uses.get(id(call.operation), 0) + 1
        for tensor in call.input_tensors:
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    for tensor in keras.tree.flatten(model.outputs):
        readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    folds = {}
    for call in calls:
        norm = call.operation
        if len(call.input_tensors) != 1 or len(call.input_tensors[0].shape) != 4:
            continue
        source = call.input_tensors[0]
        conv = producer_of(source)
        if not taxonomy.folds_into(norm, conv):
            continue
        if uses[id(conv)] != 1 or uses[id(norm)] != 1 or readers[id(source)] != 1:
            continue
        folds[norm.name] = (conv, norm)
    return folds


def output_names(model) -> tuple[str, ...]:
    """Each output's name, in the order of ``model.outputs``.

    The key of a model built with a dict of outputs (nested keys joined by
    ``/``); otherwise the name of the layer or operation that produces the
    output (Keras's ``output_names``). A name that repeats gets ``_2``,
    ``_3``... in order, so names are unique.
    """
    structure = getattr(model, "_outputs_struct", None)
    if isinstance(structure, dict):
        names = ["/".join(str(part) for part in path) for path, _ in keras.tree.flatten_with_path(structure)]
    else:
        names = []
        for index, tensor in enumerate(model.outputs):
            operation = producer_of(tensor)
            names.append(operation.name if operation is not None else f"output_{index}")
    unique: list[str] = []
    for name in names:
        candidate, count = name, 1
        while candidate in unique:
            count += 1
            candidate = f"{name}_{count}"
        unique.append(candidate)
    return tuple(unique)


def input_name(tensor, default: str | None = None) -> str:
    """The name of the `keras.Input` behind a model input tensor."""
    operation = producer_of(tensor)
    if operation is not None:
        return operation.name
    return default if default is not None else tensor.name


def node_arguments(call: Call, values_by_id: dict):
    """A call's arguments with every symbolic tensor replaced by ``values_by_id[id(tensor)]``.

    Returns:
        ``(args, kwargs)`` ready to call the call's operation (or its replacement) with.
    """
    return call._node.arguments.fill_in(values_by_id)


def model_layout(model) -> Layout:
    """The `Layout` of the model's spatial maps (see `spatial_data_format`).

    Raises:
        ConversionError: when the model mixes both layouts.
    """
    spatial = [layer for layer in iter_layers(model) if isinstance(layer, taxonomy.SPATIAL_LAYOUT)]
    return common_layout(model.name, spatial, default=keras.config.image_data_format(), describe=describe)


def patch_tf2onnx() -> None:
    """Keras's compatibility patch that lets tf2onnx run under numpy 2 (idempotent)."""
    from keras.src.export.tf2onnx_lib import patch_tf2onnx as keras_patch

    keras_patch()


def tensor_shapes(model, input_shape) -> dict:
    """Static shapes of every tensor in a model's graph for one input shape, nested models entered.

    Args:
        model: a Sequential or functional model with one input.
        input_shape: the input's full shape, batch included.

    Returns:
        ``{id(tensor): shape}`` for the graph's tensors (those of nested
        models too), each shape a tuple of ints.
    """
    shapes: dict = {}
    _propagate(graph_of(model), [keras.KerasTensor(tuple(input_shape))], shapes)
    return shapes


def _propagate(graph, inputs, shapes: dict) -> list:
    values = {id(t): v for t, v in zip(graph.inputs, inputs)}
    for tensor, value in zip(graph.inputs, inputs):
        shapes[id(tensor)] = tuple(value.shape)
    for node in _nodes_in_order(graph):
        operation = node.operation
        if is_graph_model(operation):
            outputs = _propagate(graph_of(operation), [values[id(t)] for t in node.input_tensors], shapes)
        else:
            result = _output_spec(node, values)
            outputs = list(result) if isinstance(result, (list, tuple)) else [result]
        for tensor, value in zip(node.outputs, outputs):
            values[id(tensor)] = value
            shapes[id(tensor)] = tuple(value.shape)
    return [values[id(t)] for t in graph.outputs]


def _output_spec(node, values):
    """What ``node``'s operation gives on ``values`` (symbolic): a layer of one tensor that computes its output
    shape is asked that shape directly (what `compute_output_spec` does after binding the call's arguments, at a
    tenth of the time: masked plans ask thousands of shapes)."""
    operation, arguments = node.operation, node.arguments
    one_tensor = len(arguments.args) == 1 and not arguments.kwargs and isinstance(arguments.args[0], keras.KerasTensor)
    by_shape = is_layer(operation) and type(operation).compute_output_spec is keras.layers.Layer.compute_output_spec
    if one_tensor and by_shape and not getattr(operation.compute_output_shape, "_is_default", False):
        shape = operation.compute_output_shape(tuple(values[id(arguments.args[0])].shape))
        if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape):
            return keras.KerasTensor(shape, dtype=operation.compute_dtype)
    args, kwargs = arguments.fill_in(values)
    return operation.compute_output_spec(*args, **kwargs)


def sub_model(model, start, stop, name: str):
    """The part of a model's graph from tensor ``start`` to tensor ``stop``, as a functional model.

    ``start`` must be a tensor that everything up to ``stop`` depends on only
    through it (the model's input, or a cut of its graph).
    """
    graph = graph_of(model)
    inputs = graph.inputs[0] if start is None else start
    return keras.Model(inputs, stop, name=name)


def flat_nodes(model):
    """The calls of a model's graph in order (`Call`), those of nested models in place of the nested model."""
    for node in nodes_in_order(graph_of(model)):
        if is_graph_model(node.operation):
            yield from flat_nodes(node.operation)
        else:
            yield node


def is_layer(operation) -> bool:
    """True for a `keras.layers.Layer`; False for a bare `keras.ops` operation recorded in a graph.

    Keras 3 records calls such as ``x + 3.0``, ``keras.ops.relu(x)``,
    ``ops.pad`` or ``ops.split`` on symbolic tensors as `Operation` nodes that
    are not layers: no weights, no layer config.
    """
    return isinstance(operation, keras.layers.Layer)


def finalize_state(layer) -> None:
    """Recompute what a layer derives from its weights once they are assigned (an adapted `Normalization`'s mean).

    A preprocessing layer keeps values computed from its variables (``mean``
    and ``variance`` from ``adapt_mean`` and ``adapt_variance``); Keras
    refreshes them when it loads weights, not when a variable is assigned.
    """
    refresh = getattr(layer, "finalize_state", None)
    if callable(refresh) and getattr(layer, "built", False):
        refresh()


def weights_of(operation) -> list:
    """The weights of a layer; none for a `keras.ops` operation."""
    return list(operation.weights) if is_layer(operation) else []


_BUILTIN_MODULES = ("keras.src.layers.", "keras.src.ops.", "keras.src.models.")


def is_builtin(operation) -> bool:
    """True for Keras's own layers and operations (not custom, keras.applications' or keras-hub's classes)."""
    return type(operation).__module__.startswith(_BUILTIN_MODULES)


def sublayers(layer) -> list:
    """The layers a layer tracks (its attributes that are layers), recursively, itself excluded."""
    if not is_layer(layer):
        return []
    return list(layer._flatten_layers(include_self=False, recursive=True))


def _call_arguments(node, values: dict):
    """`node_arguments`, less the keyword arguments (``training``, ``mask``) the layer's ``call`` does not take.

    ``Layer.__call__`` records them in the node and drops them itself before
    calling ``call``; code that calls ``call`` or ``compute_output_spec``
    directly must drop them too.
    """
    args, kwargs = node.arguments.fill_in(values)
    operation = node.operation
    if not is_layer(operation):
        return args, kwargs
    parameters = inspect.signature(operation.call).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return args, kwargs
    return args, {k: v for k, v in kwargs.items() if k in parameters}


def _symbolic(shape, dtype):
    return keras.KerasTensor(tuple(shape), dtype=dtype)


def probe_output_shapes(call: Call, input_shapes) -> list[tuple]:
    """The output shapes of a call's operation when its input tensors have ``input_shapes``.

    Raises:
        Exception: whatever the operation raises when it cannot work at those shapes.
    """
    node = call._node
    values = {id(t): _symbolic(shape, t.dtype) for t, shape in zip(node.input_tensors, input_shapes)}
    args, kwargs = _call_arguments(node, values)
    outputs = node.operation.compute_output_spec(*args, **kwargs)
    return [tuple(t.shape) for t in keras.tree.flatten(outputs)]


def trace_call(call: Call, spatial_axes):
    """The call's layer's ``call`` traced as a functional graph of sub-layers and operations, or None.

    Layers written with `keras.ops` (keras.applications' and keras-hub's
    blocks) record, when called on symbolic inputs, the sub-layer calls and
    operations they are made of. The inputs take any height and width
    (``spatial_axes`` of rank-4 inputs are ``None``). None when the call does
    not trace (it uses backend functions, or needs static sizes).
    """
    node = call._node
    layer = node.operation
    if not is_layer(layer) or is_graph_model(layer):
        return None
    inputs, values = [], {}
    for tensor in node.input_tensors:
        shape = list(tensor.shape)
        if len(shape) == 4:
            for axis in spatial_axes:
                shape[axis] = None
        symbolic = keras.Input(batch_shape=tuple(shape), dtype=tensor.dtype)
        inputs.append(symbolic)
        values[id(tensor)] = symbolic
    try:
        args, kwargs = _call_arguments(node, values)
        outputs = layer.call(*args, **kwargs)
        flat = keras.tree.flatten(outputs)
        if not flat or not all(isinstance(t, keras.KerasTensor) for t in flat):
            return None
        return Functional(inputs, flat, name=runtime_name(layer.name, "traced"))
    except Exception:  # noqa: BLE001 - a call that does not trace is reported as not exact by the caller
        return None


def operation_kind(operation) -> str:
    """What a `keras.ops` operation does (see `taxonomy.operation_kind`); a custom one's class name.

    Only for `keras.ops` operations (see `is_layer`).
    """
    name = type(operation).__name__
    return taxonomy.operation_kind(name) if is_builtin(operation) else name


def reduction_of(operation) -> tuple[tuple[int, ...] | None, bool]:
    """``(axes, keepdims)`` of a `keras.ops` reduction (``ops.mean``, ``ops.max``...): axes None for all."""
    axis = getattr(operation, "axis", None)
    axes = None if axis is None else tuple(int(a) for a in (axis if isinstance(axis, (list, tuple)) else [axis]))
    return axes, bool(getattr(operation, "keepdims", False))


def call_argument(call: Call, position: int, default=None):
    """The positional argument ``position`` of a call as recorded (a symbolic tensor or a constant)."""
    args = call._node.arguments.args
    return args[position] if len(args) > position else default


def with_axis(operation, axis):
    """A new operation like ``operation`` acting along ``axis`` instead."""
    config = operation.get_config()
    config["axis"] = axis
    return type(operation).from_config(config)


def constant_arguments(call: Call) -> list[tuple[int, object]]:
    """``(position, value)`` of a call's positional arguments that are not symbolic tensors."""
    return [(i, a) for i, a in enumerate(call._node.arguments.args) if not isinstance(a, keras.KerasTensor)]


def call_inputs(model, arrays: list):
    """``arrays`` (one per model input) in the structure ``model`` was built with: a list for a model built
    as ``keras.Model([x], ...)`` (as Keras 2 files load), else the bare array of a one-input model.

    Calling such a model with another structure works but warns ("The structure of `inputs` doesn't match").
    """
    structure = getattr(model, "_inputs_struct", None)
    if structure is None:
        return arrays[0] if len(arrays) == 1 else list(arrays)
    return keras.tree.pack_sequence_as(structure, list(arrays))


# Flat traces: a classifier as one graph of the calls inside its layers ------------------------------------
_FLAT_TRACE_DEPTH = 8


@dataclass(frozen=True)
class FlatTrace:
    """A model's computation recorded as one graph, layers' insides included, at one batch size.

    Nested models are inlined and every layer that is not a built-in one (a
    custom or keras-hub block), or a built-in one made of sub-layers (such as
    `keras.layers.MultiHeadAttention`), is replaced by the sub-layer calls and
    `keras.ops` operations its ``call`` makes, recursively, where its ``call``
    traces; a layer whose ``call`` does not trace stays one call. The layers
    and weights are the model's own (shared, not copied); values a ``call``
    computes from weights alone (a position embedding looked up at fixed
    positions, a class token tiled to the batch) are recorded as constants of
    that moment. Calls that mention the batch size (tiling a class token to
    it) are recorded at ``batch_size``, so the trace runs at that batch size
    only.

    Attributes:
        input: the symbolic image batch, ``(batch_size, ...)``.
        outputs: the symbolic outputs, in the model's order.
        nodes: the calls (`Call`) from ``input`` to ``outputs``, each after its inputs.
    """

    input: object
    outputs: tuple
    nodes: tuple

    def index_of(self, tensor) -> int:
        """The position in `nodes` of the call that produced ``tensor`` (-1 for `input`)."""
        if tensor is self.input:
            return -1
        for index, node in enumerate(self.nodes):
            if any(output is tensor for output in node.outputs):
                return index
        raise ValueError(f"{tensor} is not a tensor of this trace")

    def output_of(self, index: int):
        """The one output of the call at ``index`` (`input` for -1)."""
        return self.input if index < 0 else self.nodes[index].outputs[0]

    def operation_name(self, index: int) -> str:
        """The name of the layer or operation at ``index`` (``"input"`` for -1)."""
        return "input" if index < 0 else str(self.nodes[index].operation.name)

    def cut_indices(self) -> list[int]:
        """Positions (-1 for the input) whose one output carries all later computation.

        After such a call nothing reads a tensor made before it: the trace
        splits there into a part before and a part after.
        """
        output_ids = {id(t) for t in self.outputs}
        return [
            i
            for i in cut_positions(self.nodes, [self.input], self.outputs)
            if i < 0 or (len(self.nodes[i].outputs) == 1 and id(self.nodes[i].outputs[0]) not in output_ids)
        ]


def cut_positions(nodes, inputs, outputs=()) -> list[int]:
    """Positions ``p`` (-1 for the inputs) in ``nodes`` (each after its inputs) that no edge crosses.

    No tensor made before ``nodes[p]`` (or an input, made at -1) is read after
    it: what ``nodes[p]`` outputs carries all later computation. ``outputs``
    count as read after the last node (a cut must not drop an output made
    before it).
    """
    position = {id(t): -1 for t in inputs}
    for index, node in enumerate(nodes):
        for tensor in node.outputs:
            position[id(tensor)] = index
    count = len(nodes)
    reach = [-1] * (count + 1)  # reach[p + 1]: the latest read of a tensor made before position p
    reads = [(index, tensor) for index, node in enumerate(nodes) for tensor in node.input_tensors]
    for index, tensor in reads + [(count, tensor) for tensor in outputs]:
        made = position.get(id(tensor), -1)
        if made + 2 <= count:
            reach[made + 2] = max(reach[made + 2], index)
    latest, found = -1, []
    for index in range(-1, count):
        latest = max(latest, reach[index + 1])
        if latest <= index:
            found.append(index)
    return found


def flat_trace(model, batch_size: int) -> FlatTrace:
    """The `FlatTrace` of a one-input model at ``batch_size``.

    Raises:
        ConversionError: for a model with several inputs or a graph that cannot
            be read (see `graph_of`).
    """
    graph = graph_of(model)
    if len(graph.inputs) != 1:
        raise ConversionError(
            f"Model '{model.name}' has {len(graph.inputs)} inputs; a windowed map needs one image input."
        )
    source = graph.inputs[0]
    shape = (int(batch_size), *tuple(source.shape)[1:])
    nodes, sources, targets = _nodes_in_order(graph), list(graph.inputs), list(graph.outputs)
    refused: set = set()
    for _ in range(_FLAT_TRACE_DEPTH):
        image = keras.Input(batch_shape=shape, dtype=source.dtype)
        outputs = _record(nodes, sources, targets, [image], refused)
        nodes, sources, targets = _nodes_between([image], outputs), [image], outputs
        if not any(_traceable(n.operation) and id(n.operation) not in refused for n in nodes):
            break
    return FlatTrace(sources[0], tuple(targets), tuple(_as_call(node) for node in nodes))


def _record(nodes, sources, targets, inputs, refused: set) -> list:
    """Call ``nodes`` again on ``inputs`` (in place of ``sources``): nested models inlined, layers traced."""
    values = {id(t): v for t, v in zip(sources, inputs)}
    for node in nodes:
        operation = node.operation
        outputs = None
        if is_graph_model(operation):
            inner = graph_of(operation)
            arguments = [values[id(t)] for t in node.input_tensors]
            outputs = _record(_nodes_in_order(inner), inner.inputs, inner.outputs, arguments, refused)
        elif _traceable(operation) and id(operation) not in refused:
            outputs = _record_call(node, values)
            if outputs is None:
                refused.add(id(operation))
        if outputs is None:
            args, kwargs = node.arguments.fill_in(values)
            outputs = keras.tree.flatten(operation(*args, **kwargs))
        for tensor, value in zip(node.outputs, outputs):
            values[id(tensor)] = value
    return [values[id(t)] for t in targets]


def _traceable(operation) -> bool:
    if not is_layer(operation) or is_graph_model(operation):
        return False
    return not is_builtin(operation) or bool(sublayers(operation))


def _record_call(node, values: dict):
    """The outputs of the node's layer's ``call`` run on symbolic tensors (its inner calls recorded), or None."""
    layer = node.operation
    try:
        args, kwargs = _call_arguments(node, values)
        results = keras.tree.flatten(layer.call(*args, **kwargs))
    except Exception:  # noqa: BLE001 - a call that does not trace stays one call
        return None
    if len(results) != len(node.outputs) or not all(isinstance(t, keras.KerasTensor) for t in results):
        return None
    inputs = [values[id(t)] for t in node.input_tensors]
    if _nodes_between(inputs, results, strict=False) is None:
        return None  # the call reads something besides its inputs (a tensor of another graph)
    return results


def nodes_between(inputs, outputs, *, strict: bool = True):
    """The calls (`Call`) that compute ``outputs`` from ``inputs``, each after its inputs.

    Args:
        inputs: symbolic tensors the walk stops at.
        outputs: symbolic tensors to compute.
        strict: raise when some output depends on a model input or a tensor
            other than ``inputs`` (``inputs`` is not a cut); with False,
            return None instead.

    Raises:
        ConversionError: with ``strict``, as above.
    """
    nodes = _nodes_between(inputs, outputs, strict=strict)
    return None if nodes is None else [_as_call(node) for node in nodes]


def _nodes_between(inputs, outputs, *, strict: bool = True):
    """`nodes_between` in Keras nodes."""
    stops = {id(t) for t in inputs}
    seen: set = set()
    ordered: list = []
    stack = [(t, False) for t in reversed(list(outputs))]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in stops:
            continue
        history = getattr(tensor, "_keras_history", None)
        node = None if history is None else history.operation._inbound_nodes[history.node_index]
        if node is None or node.is_input:
            if strict:
                raise ConversionError(
                    f"Tensor {getattr(tensor, 'name', tensor)} is computed from more than the given start: the "
                    "graph has no cut there."
                )
            return None
        if expanded:
            if id(node) not in seen:
                seen.add(id(node))
                ordered.append(node)
            continue
        if id(node) in seen:
            continue
        stack.append((tensor, True))
        stack.extend((t, False) for t in reversed(list(node.input_tensors)))
    return ordered


def graph_part(nodes, start, stops, name: str) -> keras.Model:
    """A model that computes ``stops`` from ``start`` by running ``nodes`` (from `nodes_between`) again.

    The calls are the recorded layers' own (shared weights); layer names need
    not be unique, as a functional model requires. It runs at the batch size
    the calls were recorded at (see `FlatTrace`).
    """
    return _GraphPart(tuple(call._node for call in nodes), start, tuple(stops), name=name)


class _Replay:
    """Recorded calls, kept out of Keras's attribute tracking."""

    def __init__(self, nodes, start, stops):
        self.nodes, self.start, self.stops = nodes, start, stops

    def run(self, value, training: bool = False):
        values = {id(self.start): value}
        for node in self.nodes:
            args, kwargs = node.arguments.fill_in(values)
            if "training" in kwargs:
                # A call records the ``training`` it resolved: ``True`` for a random augmentation built
                # outside a model (a `Sequential` named ``data_augmentation``). The replay's own wins.
                kwargs["training"] = training
            for tensor, result in zip(node.outputs, keras.tree.flatten(node.operation(*args, **kwargs))):
                values[id(tensor)] = result
        results = [values[id(t)] for t in self.stops]
        return results[0] if len(results) == 1 else results


class _GraphPart(keras.Model):
    def __init__(self, nodes, start, stops, name: str):
        super().__init__(name=name)
        self._replay = _Replay(nodes, start, stops)
        self.start_shape = tuple(start.shape)
        self.built = True

    @property
    def outputs(self) -> list:
        """The symbolic tensors it computes (as a functional model's ``outputs``)."""
        return list(self._replay.stops)

    def call(self, inputs, training=False):
        return self._replay.run(inputs, bool(training))
