"""Filter rarefaction (à trous): an FCN of stride S made into one of a stride s that divides S.

Long, Shelhamer and Darrell (FCN, section 3.2): the strided layers past the
point where the strides multiply beyond s lose their stride, and every later
window (convolution, depthwise or separable convolution, pooling) is dilated
by the strides removed before it. The result computes every cell of the map at
stride s with the original weights: for a `valid` network, each cell is the
classifier on its crop; the cells at multiples of S are the FCN's own.

A stride s that does not divide S (s = 12 with S = 32, s = 3 with S = 8) is
reached from the finest exact stride below it: `at_stride` rarefies to
g = gcd(s, S) per axis and keeps every (s / g)-th cell of that map, which is
the map at stride s (cell 0 stays where it was, so the offset is the FCN's).

The arithmetic per axis is `rarefy_axis` (pure); `rarefy` walks the FCN's
graph (nested models entered) and rebuilds it with the new strides and
dilations, copying every weight. What it cannot rarefy exactly (a stride
removed from a `same` layer, whose padding depends on the input size; an
even `same` kernel dilated; a global pooling; a layer whose window is
unknown) is refused by name, with the way out: the windowed map.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import keras

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.cost import pass_cost
from keras_fcn_surgery.dilated_pooling import DilatedAveragePooling2D, DilatedMaxPooling2D
from keras_fcn_surgery.errors import ConversionError, InputError, first_line
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    is_graph_model,
    is_layer,
    model_facts,
    model_layout,
    node_arguments,
    nodes_in_order,
    operation_kind,
    remember_source,
    source_of,
)
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.surgery.cloning import LayerCloner, copy_weights

WAY_OUT = (
    "Use `method='windowed'` (the classifier's tail on every window, at any multiple of its shared stride) or "
    "`sliding_window_predict(model, image, stride)` for an exact map at that stride."
)


@dataclass(frozen=True)
class AxisState:
    """One axis of a tensor of the rarefied network.

    Attributes:
        kept: the product of the strides kept so far (the tensor's stride in
            input pixels).
        rate: the product of the strides removed so far: the original
            network's tensor is every ``rate``-th cell of this one.
    """

    kept: int = 1
    rate: int = 1


@dataclass(frozen=True)
class AxisWindow:
    """What a window (kernel or pool) of the original network becomes on one axis."""

    stride: int
    dilation: int
    state: AxisState

    @property
    def removed(self) -> bool:
        """Whether some of the window's stride was removed, or its window dilated."""
        return self.state.rate > 1


def rarefy_axis(state: AxisState, target: int, stride: int, dilation: int = 1) -> AxisWindow | None:
    """The stride and dilation of a window of ``stride`` and ``dilation`` at ``state``, for a map at ``target``.

    Strides are kept while their product divides ``target``; the first that
    does not keeps the part that reaches ``target`` exactly (``target / kept``,
    which must divide it) and loses the rest; every later window loses its
    stride and is dilated by the strides removed before it.

    Returns:
        The window's `AxisWindow`, or None when ``target`` cannot be reached
        (``target / kept`` does not divide the stride).
    """
    if state.rate == 1:
        if target % (state.kept * stride) == 0:
            return AxisWindow(stride, dilation, AxisState(state.kept * stride, 1))
        keep = target // state.kept
        if target % state.kept or stride % keep:
            return None
        return AxisWindow(keep, dilation, AxisState(target, stride // keep))
    return AxisWindow(1, dilation * state.rate, AxisState(state.kept, state.rate * stride))


def same_padding_stays_exact(kernel: int, dilation: int, factor: int) -> bool:
    """Whether a stride-1 `same` window dilated ``factor`` times pads like the original on every phase.

    The original pads ``floor(d (k-1) / 2)`` cells before; the dilated one
    ``floor(factor d (k-1) / 2)`` pixels, ``factor`` times as many only when
    ``d (k-1)`` is even.
    """
    return factor == 1 or (dilation * (kernel - 1)) % 2 == 0


@dataclass(frozen=True)
class FinerStride:
    """What a map à trous costs, next to the other ways to the same map (a plan's ``finer``).

    Attributes:
        network_stride: the FCN's own stride ``(S_h, S_w)``.
        stride: the map's ``(s_h, s_w)``.
        macs: multiply-accumulates of one whole-image pass of the rarefied FCN.
        sliding_macs: those of the classifier on every window at ``stride``
            (the sliding window: one crop per cell).
        stitch_macs: those of naive shift-and-stitch: the FCN on each of the
            ``(S_h / g_h) (S_w / g_w)`` shifted images (``g``: ``exact_stride``).
        fcn_macs: those of the FCN's own map, at its stride.
        exact_stride: the stride ``g = gcd(s, S)`` per axis the rarefied FCN
            computes every cell at; ``stride`` where it divides ``S``, else
            every ``(s / g)``-th cell of that map is kept.
        windowed_macs: those of the classifier's windowed map at ``stride``
            (`inference.windowed`), when the plan weighed it and it can run
            there; else None.
        weighed: whether the plan chose between this way and the windowed
            map (a stride that does not divide ``S``) by their costs.
        chosen: the way the map is computed: ``"à trous"`` or ``"windowed"``.
        tail_stitch_macs: those of shift-and-stitch of the tail
            (`inference.stitch`: the head once, the tail per shift), the
            execution ``engine="stitch"`` runs, where it can; else None.
        fragments_macs: those of multi-pooling fragments
            (`inference.fragments`: the tail undilated on the fragments of
            each removed stride, interleaved back), the execution
            ``engine="fragments"`` runs, where it can; else None. À trous'
            and a few more (cells of fragments padded to one length).
    """

    network_stride: tuple[int, int]
    stride: tuple[int, int]
    macs: int
    sliding_macs: int
    stitch_macs: int
    fcn_macs: int
    exact_stride: tuple[int, int] | None = None
    windowed_macs: int | None = None
    weighed: bool = False
    chosen: str = "à trous"
    tail_stitch_macs: int | None = None
    fragments_macs: int | None = None

    def __str__(self) -> str:
        exact = self.exact_stride or self.stride
        thinned = (self.stride[0] // exact[0], self.stride[1] // exact[1])
        way = "à trous"
        if thinned != (1, 1):
            way += (
                f" at {exact[0]}x{exact[1]} (the finest exact stride below), every {thinned[0]}x{thinned[1]} cell kept"
            )
        windowed = ""
        if self.weighed and self.windowed_macs is None:
            windowed = "; the windowed method cannot run at that stride"
        elif self.weighed and self.windowed_macs is not None:
            mark = " (chosen)" if self.chosen == "windowed" else ""
            windowed = f"; the windowed method at that stride{mark} {self.windowed_macs / 1e9:.3g} GMAC"
        mark = " (chosen)" if self.weighed and self.chosen == "à trous" else ""
        return (
            f"{way}: stride {self.stride[0]}x{self.stride[1]} from the FCN's {self.network_stride[0]}x"
            f"{self.network_stride[1]}{mark}: {self.macs / 1e9:.3g} GMAC{windowed}; sliding window at that stride "
            f"{self.sliding_macs / 1e9:.3g} GMAC ({self.sliding_macs / max(self.macs, 1):.1f} x), shift-and-stitch "
            f"{self.stitch_macs / 1e9:.3g} GMAC"
            + (
                f", shift-and-stitch of the tail (engine 'stitch') {self.tail_stitch_macs / 1e9:.3g} GMAC"
                if self.tail_stitch_macs is not None
                else ""
            )
            + (
                f", multi-pooling fragments (engine 'fragments') {self.fragments_macs / 1e9:.3g} GMAC"
                if self.fragments_macs is not None
                else ""
            )
            + f", the FCN at its own stride {self.fcn_macs / 1e9:.3g} GMAC"
        )


def origin_of(model) -> tuple[keras.Model, tuple[int, int]] | None:
    """``(fcn, stride)`` for a model `rarefy` made in this process (its FCN still alive), else None."""
    reference, stride = model_facts(model).origin or (None, None)
    fcn = reference() if reference is not None else None
    return None if fcn is None else (fcn, stride)


def execution_refusal(model, plan_of) -> str | None:
    """Why an execution of an FCN at a finer stride (shift-and-stitch, fragments) cannot run ``model``, or None.

    ``plan_of(fcn, stride)`` builds that execution's plan for the FCN and the
    stride `rarefy` made ``model`` from, raising where it cannot.
    """
    origin = origin_of(model)
    if origin is None:
        return f"'{model.name}' is not an FCN at a finer stride made by `rarefy` in this process"
    try:
        plan_of(*origin)
    except (ConversionError, InputError) as error:
        return first_line(str(error))
    return None


def finer_stride_cost(finer, image_size, map_size) -> FinerStride | None:
    """The `FinerStride` of a map of ``finer`` (made by `rarefy`) on an image of ``image_size``; None for
    any other model."""
    origin = origin_of(finer)
    if origin is None:
        return None
    fcn, stride = origin
    layout = model_layout(fcn)
    channels = int(layout.channels(tuple(fcn.inputs[0].shape)))
    size = (int(image_size[0]), int(image_size[1]))
    grid = geometry(fcn)
    classifier, crop = source_of(fcn)
    if crop is None:
        crop = grid.receptive_field if grid.exact else grid.min_input_size
    window = pass_cost(fcn, layout.batch_shape(1, crop[0], crop[1], channels)).macs
    whole = pass_cost(fcn, layout.batch_shape(1, size[0], size[1], channels)).macs
    exact = finest_exact(stride, grid.stride)
    shifts = (grid.stride[0] // exact[0]) * (grid.stride[1] // exact[1])
    return FinerStride(
        network_stride=tuple(grid.stride),  # type: ignore[arg-type]
        stride=stride,
        macs=pass_cost(finer, layout.batch_shape(1, size[0], size[1], channels)).macs,
        sliding_macs=window * int(map_size[0]) * int(map_size[1]),
        stitch_macs=whole * shifts,
        fcn_macs=whole,
        exact_stride=exact,
    )


def rarefy(fcn, stride) -> keras.Model:
    """The FCN computing ``fcn``'s map at ``stride`` (``s`` or ``(s_h, s_w)``, dividing its stride), à trous.

    The same weights (copied), the strides past the cut removed and later
    windows dilated. Made once per FCN and stride; ``fcn`` itself at its own
    stride.

    Args:
        fcn: a fully convolutional model (what `convert` returns).
        stride: the map's stride in pixels, per axis; it must divide the
            FCN's stride on each axis.

    Returns:
        A `keras.Model`: input and outputs as ``fcn``'s, maps at ``stride``.

    Raises:
        InputError: for a stride that does not divide the FCN's.
        ConversionError: naming the layer that cannot be rarefied exactly, and
            the way out (a windowed map).

    Example:

    ```python
    finer = rarefy(fcn, 8)  # a stride-32 FCN's map every 8 pixels
    ```
    """
    target = _pair(stride)
    own = tuple(geometry(fcn).stride)
    if any(s < 1 or S % s for s, S in zip(target, own)):
        raise InputError(
            f"A stride of {target[0]}x{target[1]} does not divide {own[0]}x{own[1]}, the stride of '{fcn.name}': "
            f"à trous maps are at its divisors. {WAY_OUT}"
        )
    if target == own:
        return fcn
    made = model_facts(fcn).rarefied
    if target not in made:
        finer = Rarefier(fcn, target).build()
        source, size = source_of(fcn)
        if source is not None and size is not None:
            remember_source(finer, source, size)  # its certificates run the same classifier
        made[target] = finer
        model_facts(finer).origin = (weakref.ref(fcn), target)  # weak: the FCN holds its rarefied ones, not back
    return made[target]


def at_stride(fcn, stride) -> keras.Model:
    """The FCN computing ``fcn``'s map at any ``stride`` (``s`` or ``(s_h, s_w)``), exactly.

    Where ``s`` divides the FCN's stride ``S``, `rarefy`. Elsewhere the map is
    computed à trous at the finest exact stride below, ``g = gcd(s, S)`` per
    axis, and every ``(s / g)``-th cell of it is kept (a strided slice of the
    outputs): cell ``i`` of the result is cell ``i s / g`` of the map at ``g``,
    whose window starts at ``i s`` pixels, the same offset and receptive field.
    Made once per FCN and stride.

    Args:
        fcn: a fully convolutional model (what `convert` returns).
        stride: the map's stride in pixels, per axis (any positive integer).

    Returns:
        A `keras.Model`: input and outputs as ``fcn``'s, maps at ``stride``.

    Raises:
        InputError: for a stride below 1.
        ConversionError: naming the layer that cannot be rarefied to ``g``
            exactly, and the way out (a windowed map).

    Example:

    ```python
    every_12 = at_stride(fcn, 12)  # a stride-32 FCN à trous at 4, every third cell kept
    ```
    """
    target = _pair(stride)
    if any(s < 1 for s in target):
        raise InputError(f"Expected a stride of at least 1 pixel. Received: {target[0]}x{target[1]}")
    own = tuple(geometry(fcn).stride)
    exact = finest_exact(target, own)
    if exact == target:
        return rarefy(fcn, target)
    made = model_facts(fcn).rarefied
    if target not in made:
        thinned = Rarefier(fcn, exact, keep_every=(target[0] // exact[0], target[1] // exact[1])).build()
        source, size = source_of(fcn)
        if source is not None and size is not None:
            remember_source(thinned, source, size)
        made[target] = thinned
        model_facts(thinned).origin = (weakref.ref(fcn), target)
    return made[target]


def finest_exact(stride, own) -> tuple[int, int]:
    """``gcd(s, S)`` per axis: the finest stride below ``stride`` that à trous reaches exactly."""
    return math.gcd(int(stride[0]), int(own[0])), math.gcd(int(stride[1]), int(own[1]))


def _pair(stride) -> tuple[int, int]:
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2:
            raise InputError(f"Expected `stride` to be an int or a pair (s_h, s_w). Received: {stride!r}")
        return int(stride[0]), int(stride[1])
    return int(stride), int(stride)


class Rarefier:
    """One walk of an FCN's graph (nested models entered): the states of its tensors, and the rebuilt model."""

    def __init__(self, fcn, target: tuple[int, int], keep_every: tuple[int, int] = (1, 1)):
        self.fcn, self.target, self.keep_every = fcn, target, keep_every
        self.layout: Layout = model_layout(fcn)
        self.cloner = LayerCloner()
        self.windows: dict[int, tuple] = {}  # a shared layer's rarefied copy, by the source layer

    def refuse(self, layer, why: str) -> ConversionError:
        return ConversionError(
            f"Cannot rarefy {describe(layer)} for a map at stride {self.target[0]}x{self.target[1]} of "
            f"'{self.fcn.name}': {why}. {WAY_OUT}"
        )

    def build(self) -> keras.Model:
        graph = graph_of(self.fcn)
        if len(graph.inputs) != 1:
            raise ConversionError(f"Cannot rarefy '{self.fcn.name}': it takes {len(graph.inputs)} inputs, not one.")
        source = graph.inputs[0]
        new_input = keras.Input(shape=tuple(source.shape[1:]), dtype=source.dtype, name=source.name)
        outputs, states = self.run(graph, [new_input], [(AxisState(), AxisState())])
        for tensor, state in zip(graph.outputs, states):
            kept = (state[0].kept, state[1].kept)
            if kept != self.target:
                raise ConversionError(
                    f"Cannot rarefy '{self.fcn.name}' to stride {self.target[0]}x{self.target[1]}: its output "
                    f"'{tensor.name}' reaches stride {kept[0]}x{kept[1]} (its strides cannot be split there). "
                    f"{WAY_OUT}"
                )
        name = f"{self.fcn.name}_atrous"
        if self.keep_every != (1, 1):
            outputs = [self.thin(tensor) for tensor in outputs]
            stride = (self.target[0] * self.keep_every[0], self.target[1] * self.keep_every[1])
            name = f"{self.fcn.name}_stride{stride[0]}x{stride[1]}"
        single = len(outputs) == 1 and not isinstance(self.fcn.output, (list, tuple, dict))
        return keras.Model(new_input, outputs[0] if single else outputs, name=name)

    def thin(self, tensor):
        """Every ``keep_every``-th cell of a map, from its first (a strided slice, which the geometry reads)."""
        key = [slice(None)] * len(tensor.shape)
        for axis, step in zip(self.layout.spatial_axes, self.keep_every):
            key[axis] = slice(None, None, step)
        return tensor[tuple(key)]

    def run(self, graph, inputs: list, input_states: list):
        """Rebuild ``graph`` on ``inputs`` (new tensors) whose states are ``input_states``.

        The walk of every rebuild at a finer stride: a subclass (the fragments
        of `inference.fragments`) gives its own `nested`, `call` and
        `constant_state` (the state of a tensor no input reaches).
        """
        values = {id(t): new for t, new in zip(graph.inputs, inputs)}
        states = {id(t): s for t, s in zip(graph.inputs, input_states)}
        for node in nodes_in_order(graph):
            operation = node.operation
            known = [states[id(t)] for t in node.input_tensors if id(t) in states]
            if len(set(known)) > 1:
                raise self.refuse(operation, self.MIXED_MERGE)
            state = known[0] if known else self.constant_state()
            args, kwargs = node_arguments(node, values)
            if is_graph_model(operation):
                made, out_states = self.nested(operation, args, kwargs, [states[id(t)] for t in node.input_tensors])
            else:
                made, out_state = self.call(operation, node, args, kwargs, state)
                out_states = [out_state] * len(node.outputs)
            made = made if isinstance(made, (list, tuple)) else [made]
            for tensor, new, new_state in zip(node.outputs, made, out_states):
                values[id(tensor)] = new
                states[id(tensor)] = new_state
        return [values[id(t)] for t in graph.outputs], [states[id(t)] for t in graph.outputs]

    MIXED_MERGE = "it merges maps of different strides"

    def constant_state(self):
        """The state of a tensor that no input reaches (a constant): at the input's grid."""
        return (AxisState(), AxisState())

    def nested(self, model, args, kwargs, input_states):
        graph = graph_of(model)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # ``mask=None``, as Keras records it
        if kwargs or len(args) != len(graph.inputs):
            raise self.refuse(model, "a nested model called with keyword arguments")
        if id(model) in self.windows:
            raise self.refuse(model, "a nested model called more than once")
        inner_inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype) for t in graph.inputs]
        outputs, states = self.run(graph, inner_inputs, input_states)
        inner = keras.Model(inner_inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
        self.windows[id(model)] = (inner, None)
        made = inner(*args)
        return made, states

    def call(self, layer, node, args, kwargs, state):
        """The new layer (or operation) on the new tensors, and its output's state."""
        dense = all(s.rate == 1 for s in state)
        if is_layer(layer) and isinstance(layer, (*taxonomy.WINDOWS, *taxonomy.DILATED_POOLINGS)):
            new_layer, out_state = self.window(layer, state)
            if new_layer is None:
                return self.cloner.call(layer, args, kwargs), out_state
            return self.windowed_call(layer, new_layer, args, kwargs), out_state
        if is_layer(layer) and isinstance(layer, (*taxonomy.PADDINGS, *taxonomy.CROPPINGS)):
            if dense:
                return self.cloner.call(layer, args, kwargs), state
            return self.scaled_border(layer, args, kwargs, state), state
        if self.pointwise(layer, node):
            return self.cloner.call(layer, args, kwargs), state
        if is_layer(layer) and isinstance(layer, taxonomy.GLOBAL_POOLINGS):
            raise self.refuse(layer, "it pools the whole map (global context): no map at a finer stride is exact")
        raise self.refuse(layer, "its window is unknown (not a convolution, pooling, padding or pointwise layer)")

    def pointwise(self, layer, node) -> bool:
        if not is_layer(layer):
            return operation_kind(layer) in ("unary", "binary")
        if isinstance(layer, taxonomy.POINTWISE):
            return True
        if isinstance(layer, taxonomy.DENSE):
            return self.layout.channels_last
        if isinstance(layer, (*taxonomy.CHANNEL_AXIS, *taxonomy.CONCATENATIONS)):
            rank = len(node.input_tensors[0].shape)
            axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
            return rank == 4 and [int(a) % 4 for a in axes] == [self.layout.channel_axis]
        return False

    def window(self, layer, state):
        """``(new layer or None when unchanged, output state)`` of a convolution or pooling."""
        kernel = layer.pool_size if hasattr(layer, "pool_size") else layer.kernel_size
        dilation = tuple(getattr(layer, "dilation_rate", (1, 1)))
        axes = []
        for axis in range(2):
            made = rarefy_axis(state[axis], self.target[axis], layer.strides[axis], dilation[axis])
            if made is None:
                raise self.refuse(
                    layer,
                    f"its stride {layer.strides[axis]} cannot be split to reach stride {self.target[axis]} "
                    f"(the strides before it multiply to {state[axis].kept})",
                )
            axes.append(made)
        out_state = (axes[0].state, axes[1].state)
        strides = (axes[0].stride, axes[1].stride)
        dilations = (axes[0].dilation, axes[1].dilation)
        if strides == tuple(layer.strides) and dilations == dilation:
            return None, out_state
        if layer.padding == "same":
            if strides != tuple(layer.strides):
                raise self.refuse(
                    layer,
                    "its stride would be removed, but its `same` padding depends on the input size, so the "
                    "shifted maps would not be exact",
                )
            if isinstance(layer, taxonomy.POOLINGS):
                raise self.refuse(layer, "a `same` pooling cannot be dilated exactly (its border windows shrink)")
            if not all(same_padding_stays_exact(k, d, n // d) for k, d, n in zip(kernel, dilation, dilations)):
                raise self.refuse(layer, "an even `same` kernel pads unevenly once dilated")
        key = id(layer)
        if key in self.windows:
            copy, made_for = self.windows[key]
            if made_for != (strides, dilations):
                raise self.refuse(layer, "a layer shared by maps of different strides")
            return copy, out_state
        config = {**layer.get_config(), "strides": strides}
        if isinstance(layer, taxonomy.POOLINGS):
            if dilations == (1, 1):
                copy = layer.__class__.from_config(config)
            else:
                dilated = DilatedMaxPooling2D if isinstance(layer, taxonomy.MAX_POOLINGS) else DilatedAveragePooling2D
                copy = dilated.from_config({**config, "dilation_rate": dilations})
        else:
            try:
                copy = layer.__class__.from_config({**config, "dilation_rate": dilations})
            except ValueError as error:
                raise self.refuse(
                    layer, f"Keras takes no convolution with both a stride and a dilation ({error})"
                ) from error
        self.windows[key] = (copy, (strides, dilations))
        return copy, out_state

    def windowed_call(self, layer, copy, args, kwargs):
        first = not copy.built
        made = copy(*args, **kwargs)
        if first and layer.weights:
            copy_weights(layer, copy)
        return made

    def scaled_border(self, layer, args, kwargs, state):
        key = id(layer)
        rates = (state[0].rate, state[1].rate)
        if key in self.windows:
            copy, made_for = self.windows[key]
            if made_for != rates:
                raise self.refuse(layer, "a layer shared by maps of different strides")
            return copy(*args, **kwargs)
        field = "padding" if isinstance(layer, taxonomy.PADDINGS) else "cropping"
        border = getattr(layer, field)
        scaled = tuple((before * r, after * r) for (before, after), r in zip(border, rates))
        copy = layer.__class__.from_config({**layer.get_config(), field: scaled})
        self.windows[key] = (copy, rates)
        return copy(*args, **kwargs)
