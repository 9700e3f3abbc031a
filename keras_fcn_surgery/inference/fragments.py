"""Multi-pooling ("fragments") of an FCN's tail: its exact map at a finer stride, a third way beside à trous and stitch.

Bailer et al. (BMVC 2017, multi-pooling and unwarping) and Giusti et al. (2013, max-pooling fragments): where à
trous (`surgery.atrous.rarefy`) removes a layer's stride ``f`` and dilates every later window by it, this way
computes that layer without the stride it loses and rearranges its map into ``f_h f_w`` fragments stacked in the
batch (space to batch: fragment ``(a, b)`` holds rows ``a::f_h`` and columns ``b::f_w``). Every later layer runs on
the fragments with its own, undilated window (a later removed stride fragments again), and each output is
interleaved back at the end (batch to space: "unwarping"). Cell ``i`` of fragment ``a`` is cell ``a + f i`` of the
à trous map, so the result is the à trous map cell for cell, for the same multiply-accumulates; but the map is
rearranged once per removed stride for the whole tail, where TensorFlow and XLA rearrange it around every dilated
convolution.

Sides that are not multiples of ``f``: the fragments are padded to one length at their end; the cells past a
fragment's own end are computed from the padding and cropped away at the end (a `valid` window never lets them
reach a kept cell). A `same` window or a padding layer would read them where the à trous map reads its zero
padding, so they are set to zero before it. The models are built per input size (the lengths are static), from
the FCN's own layers (its weights shared, not copied); only a layer whose stride changes is a copy.

It runs as an execution of the rarefied FCN (`inference.engines`: engine ``"fragments"``), like shift-and-stitch
(`inference.stitch`): ``engine="auto"`` times it against the à trous pass and the other executions on this
machine and keeps the fastest (below the measuring threshold the à trous pass runs: it has the fewest
multiply-accumulates), ``engine="fragments"`` forces it; the map, its tiles and its geometry stay the rarefied
FCN's. The fragments models run compiled where the backend compiles (under XLA on TensorFlow). `fragments_map`
computes one image's map; `fragments_cost` counts its multiply-accumulates.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import ops

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.cost import layer_macs
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    is_layer,
    model_facts,
    model_layout,
)
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.surgery.atrous import (
    AxisState,
    Rarefier,
    execution_refusal,
    finest_exact,
    origin_of,
    rarefy,
    rarefy_axis,
)
from keras_fcn_surgery.surgery.cloning import copy_weights


@dataclass(frozen=True)
class _Tag:
    """What a tensor of the fragments model is, per axis.

    Attributes:
        state: the `AxisState` pair of the matching tensor of the rarefied FCN (``rate``: the product of the
            removed strides, the fragments per axis).
        length: that tensor's length per axis (the à trous map's).
        factors: the removed strides in the order the map was fragmented by them, ``(f_h, f_w)`` each.
    """

    state: tuple[AxisState, AxisState]
    length: tuple[int, int]
    factors: tuple[tuple[int, int], ...] = ()

    @property
    def rates(self) -> tuple[int, int]:
        return self.state[0].rate, self.state[1].rate


@dataclass
class FragmentPlan:
    """An FCN's map at ``stride`` by fragments: what is built once, and the models built per input size.

    Attributes:
        fcn: the FCN.
        stride: the map's ``(s_h, s_w)``.
        exact: the stride the fragments compute every cell at (``stride`` where it divides the FCN's; else
            ``gcd(s, S)``, every ``stride / exact``-th cell kept, as `surgery.atrous.at_stride` does).
        layout: the FCN's `Layout`.
        layers: the copies of the layers whose stride changes, by the source layer.
        models: ``(model, multiply-accumulates)`` by input ``(H, W)``.
    """

    fcn: keras.Model
    stride: tuple[int, int]
    exact: tuple[int, int]
    layout: Layout
    layers: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    @property
    def keep_every(self) -> tuple[int, int]:
        return self.stride[0] // self.exact[0], self.stride[1] // self.exact[1]

    def model(self, size) -> tuple[keras.Model, int]:
        """``(model, multiply-accumulates a pass)`` for an input of ``size`` ``(H, W)``, built once."""
        size = (int(size[0]), int(size[1]))
        if size not in self.models:
            self.models[size] = _Fragmenter(self, size).build()
        return self.models[size]


def fragments_plan(fcn, stride) -> FragmentPlan:
    """The `FragmentPlan` of ``fcn`` at ``stride`` (``s`` or ``(s_h, s_w)``, finer than its own), made once.

    Raises:
        InputError: for a stride that is not finer than the FCN's on some axis.
        ConversionError: for an FCN à trous cannot make exact at ``stride`` (the same layers refused, by name), or
            one whose layers cannot be run on fragments (named).
    """
    target = (int(stride), int(stride)) if not isinstance(stride, (tuple, list)) else (int(stride[0]), int(stride[1]))
    own = tuple(geometry(fcn).stride)
    exact = finest_exact(target, own)
    if min(target) < 1 or exact == own:
        raise InputError(
            f"Fragments compute maps finer than {own[0]}x{own[1]}, the stride of '{fcn.name}'. "
            f"Received: {target[0]}x{target[1]}"
        )
    made = model_facts(fcn).fragment_plans
    if target not in made:
        try:
            rarefy(fcn, exact)  # refuses by name what no map at this stride computes exactly
            plan = FragmentPlan(fcn, target, exact, model_layout(fcn))
            low = geometry(rarefy(fcn, exact)).min_input_size
            plan.model((max(int(low[0]), 1), max(int(low[1]), 1)))  # refuses what cannot run on fragments
            made[target] = plan
        except ConversionError as error:
            made[target] = error  # a refusal is found once: plans and engine choices ask again
    if isinstance(made[target], ConversionError):
        raise ConversionError(str(made[target]))
    return made[target]


def fragments_refusal(model, precision: str | None = None) -> str | None:
    """None where ``model`` is an FCN at a finer stride made by `surgery.atrous` whose map fragments compute at
    ``precision`` (None or ``"float32"``: reduced precisions run à trous); else why not."""
    if precision not in (None, "float32"):
        return f"fragments compute in float32 only (asked: {precision})"
    return execution_refusal(model, fragments_plan)


def fragments_forward(model, run):
    """``numpy batch -> numpy map`` of ``model`` (see `fragments_refusal`) by fragments; ``run(part)`` is the
    forward function of a fragments model (an execution of `inference.engines`)."""
    fcn, stride = origin_of(model)  # type: ignore[misc]
    reference, name = weakref.ref(fcn), model.name  # weak, as the rarefied FCN holds its FCN: this is cached on it

    def forward(batch):
        live = reference()
        if live is None:
            raise InputError(f"The FCN that '{name}' was made from is gone: its map by fragments cannot be built.")
        return fragmented(fragments_plan(live, stride), run)(batch)

    return forward


def fragmented(plan: FragmentPlan, run):
    """The batch function of ``plan``: each batch through the fragments model of its input size."""

    def forward(batch):
        batch = np.asarray(batch)
        return run(plan.model(plan.layout.spatial_shape(batch.shape))[0])(batch)

    return forward


def fragments_map(fcn, image, stride) -> np.ndarray:
    """The map of ``fcn`` at ``stride`` on one ``image`` (the model's layout, preprocessed), by fragments.

    Returns:
        The map in the model's layout without the batch axis: the shape and cells of
        ``at_stride(fcn, stride)``'s map of ``image``.

    Raises:
        InputError, ConversionError: as `fragments_plan`, or for an image too small.
    """
    plan = fragments_plan(fcn, stride)
    image = np.asarray(image, dtype=np.float32)
    size = plan.layout.image_size(image.shape)
    low = geometry(rarefy(fcn, plan.exact)).min_input_size
    if size[0] < low[0] or size[1] < low[1]:
        raise InputError(
            f"An image of {size[0]}x{size[1]} is smaller than the {low[0]}x{low[1]} that '{fcn.name}' maps."
        )
    model = plan.model(size)[0]
    return np.asarray(model(image[None], training=False))[0]


def fragments_cost(fcn, stride, image_size) -> int:
    """Multiply-accumulates of `fragments_map` on an image of ``image_size``: the à trous pass's, plus those of
    the padded cells where a side is not a multiple of a removed stride."""
    return fragments_plan(fcn, stride).model(image_size)[1]


class _Fragmenter(Rarefier):
    """One walk of an FCN's graph (nested models inlined) building its fragments model for one input size."""

    def __init__(self, plan: FragmentPlan, size: tuple[int, int]):
        super().__init__(plan.fcn, plan.exact)
        self.plan, self.size, self.macs = plan, size, 0

    def refuse(self, layer, why: str) -> ConversionError:
        return ConversionError(
            f"Cannot run {describe(layer)} of '{self.fcn.name}' on fragments for a map at stride "
            f"{self.target[0]}x{self.target[1]}: {why}. Use its map à trous (engine 'auto' or the backend's own)."
        )

    def build(self) -> tuple[keras.Model, int]:  # type: ignore[override]
        graph = graph_of(self.fcn)
        if len(graph.inputs) != 1:
            raise ConversionError(f"Cannot fragment '{self.fcn.name}': it takes {len(graph.inputs)} inputs, not one.")
        source = graph.inputs[0]
        channels = int(self.layout.channels(tuple(source.shape)))
        shape = self.layout.batch_shape(None, self.size[0], self.size[1], channels)[1:]
        new_input = keras.Input(shape=shape, dtype=source.dtype, name=source.name)
        start = _Tag((AxisState(), AxisState()), self.size)
        outputs, tags = self.run(graph, [new_input], [start])
        maps = []
        for tensor, tag in zip(outputs, tags):
            if len(tensor.shape) != 4:
                raise ConversionError(f"Cannot fragment '{self.fcn.name}': an output of rank {len(tensor.shape)}.")
            maps.append(self.unwarp(tensor, tag))
        if self.plan.keep_every != (1, 1):
            self.keep_every = self.plan.keep_every
            maps = [self.thin(tensor) for tensor in maps]
        single = len(maps) == 1 and not isinstance(self.fcn.output, (list, tuple, dict))
        model = keras.Model(new_input, maps[0] if single else maps, name=f"{self.fcn.name}_fragments")
        return model, self.macs

    MIXED_MERGE = "it merges maps fragmented differently"

    def constant_state(self) -> _Tag:
        return _Tag((AxisState(), AxisState()), self.size)

    def nested(self, model, args, kwargs, input_tags):
        """A nested model inlined: its graph walked on the new tensors."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        graph = graph_of(model)
        if kwargs or len(args) != len(graph.inputs):
            raise self.refuse(model, "a nested model called with keyword arguments")
        return self.run(graph, list(args), input_tags)

    def call(self, layer, node, args, kwargs, tag: _Tag):  # type: ignore[override]
        """The layer (its own, or a copy with the stride it keeps) on the fragments, and its output's tag."""
        if is_layer(layer) and isinstance(layer, (*taxonomy.WINDOWS, *taxonomy.DILATED_POOLINGS)):
            return self.windowed(layer, args, kwargs, tag)
        if is_layer(layer) and isinstance(layer, (*taxonomy.PADDINGS, *taxonomy.CROPPINGS)):
            # À trous scales the border by the rate; on fragments (cells ``rate`` apart) it is the layer's own.
            padding = isinstance(layer, taxonomy.PADDINGS)
            if padding:
                args = (self.zeroed(args[0], tag), *args[1:])
            border = layer.padding if padding else layer.cropping
            sign = 1 if padding else -1
            length = tuple(n + sign * r * (b + a) for n, r, (b, a) in zip(tag.length, tag.rates, border))
            return layer(*args, **kwargs), _Tag(tag.state, length, tag.factors)  # type: ignore[arg-type]
        if self.pointwise(layer, node):
            return layer(*args, **kwargs), tag
        if is_layer(layer) and isinstance(layer, taxonomy.GLOBAL_POOLINGS):
            raise self.refuse(layer, "it pools the whole map")
        raise self.refuse(layer, "its window is unknown (not a convolution, pooling, padding or pointwise layer)")

    def windowed(self, layer, args, kwargs, tag: _Tag):
        kernel = layer.pool_size if hasattr(layer, "pool_size") else layer.kernel_size
        dilation = tuple(getattr(layer, "dilation_rate", (1, 1)))
        axes = [rarefy_axis(tag.state[a], self.target[a], layer.strides[a], dilation[a]) for a in range(2)]
        if None in axes:
            raise self.refuse(layer, "its stride cannot be split to reach the map's")
        strides = (axes[0].stride, axes[1].stride)  # type: ignore[union-attr]
        state = (axes[0].state, axes[1].state)  # type: ignore[union-attr]
        length = tuple(
            _window_length(n, k, w.stride, w.dilation, layer.padding)  # type: ignore[union-attr]
            for n, k, w in zip(tag.length, kernel, axes)
        )
        inputs = args[0]
        if layer.padding == "same" and max(kernel) > 1:
            inputs = self.zeroed(inputs, tag)
        copy = layer if strides == tuple(layer.strides) else self.restrided(layer, strides)
        made = copy(inputs, *args[1:], **kwargs)
        if copy is not layer and not self.plan.layers[id(layer)][1]:
            copy_weights(layer, copy)  # after its first call, which built it
            self.plan.layers[id(layer)] = (copy, True)
        self.macs += layer_macs(copy, tuple(inputs.shape), tuple(made.shape)) * tag.rates[0] * tag.rates[1]
        factor = (state[0].rate // tag.rates[0], state[1].rate // tag.rates[1])
        factors = tag.factors
        if factor != (1, 1):
            made = self.fragment(made, factor)
            factors = (*factors, factor)
        out = _Tag(state, length, factors)  # type: ignore[arg-type]
        sides = self.layout.spatial_shape(tuple(made.shape))
        if any(m != -(-n // r) for m, n, r in zip(sides, out.length, out.rates)):  # pragma: no cover - a bug
            raise self.refuse(layer, f"fragments of {sides} cells do not tile a map of {out.length}")
        return made, out

    def restrided(self, layer, strides):
        """The copy of ``layer`` with ``strides`` (the part of its stride it keeps), made once per FCN."""
        key = id(layer)
        if key not in self.plan.layers:
            config = {**layer.get_config(), "strides": strides}
            try:
                copy = layer.__class__.from_config(config)
            except ValueError as error:
                raise self.refuse(layer, f"Keras cannot make it with strides {strides} ({error})") from error
            self.plan.layers[key] = (copy, False)
        return self.plan.layers[key][0]

    def fragment(self, tensor, factor):
        """Space to batch: the map's ``factor`` fragments stacked after each image, its sides padded to multiples."""
        layout = self.layout
        sides = layout.spatial_shape(tuple(tensor.shape))
        counts = [-(-int(m) // f) for m, f in zip(sides, factor)]
        if any(c * f != m for c, f, m in zip(counts, factor, sides)):
            widths = [[0, 0] for _ in range(4)]
            for axis, c, f, m in zip(layout.spatial_axes, counts, factor, sides):
                widths[axis][1] = c * f - int(m)
            tensor = ops.pad(tensor, widths)
        split, offsets, rest = [], [], []
        for axis in range(1, 4):
            if axis in layout.spatial_axes:
                index = layout.spatial_axes.index(axis)
                rest.append(len(split) + 1)
                offsets.append(len(split) + 2)
                split += [counts[index], factor[index]]
            else:
                rest.append(len(split) + 1)
                split.append(int(tensor.shape[axis]))
        tensor = ops.reshape(tensor, (-1, *split))
        tensor = ops.transpose(tensor, (0, *offsets, *rest))
        return ops.reshape(tensor, (-1, *[split[r - 1] for r in rest]))

    def unwarp(self, tensor, tag: _Tag):
        """Batch to space: the fragments interleaved back into the à trous map, cropped to its length."""
        if not tag.factors:
            return tensor
        layout = self.layout
        shape = [int(d) for d in tensor.shape[1:]]
        digits = [f for pair in tag.factors for f in pair]  # (f_h1, f_w1, f_h2, f_w2, ...) after the batch axis
        tensor = ops.reshape(tensor, (-1, *digits, *shape))
        order, sizes = [0], []
        for axis in range(1, 4):
            position = 1 + len(digits) + axis - 1
            if axis in layout.spatial_axes:
                index = layout.spatial_axes.index(axis)
                # Cell i of the last fragmenting is the coarsest digit: row = i K + a_L ... + a_1.
                order += [position] + [1 + 2 * step + index for step in reversed(range(len(tag.factors)))]
                sizes.append(shape[axis - 1] * tag.rates[index])
            else:
                order.append(position)
                sizes.append(shape[axis - 1])
        tensor = ops.reshape(ops.transpose(tensor, order), (-1, *sizes))
        key = [slice(None)] * 4
        for axis, n in zip(layout.spatial_axes, tag.length):
            key[axis] = slice(0, n)
        return tensor[tuple(key)]

    def zeroed(self, tensor, tag: _Tag):
        """``tensor`` with the cells past each fragment's own end (computed from padding) set to zero."""
        rates = tag.rates
        sides = self.layout.spatial_shape(tuple(tensor.shape))
        if all(r * int(m) <= n for r, m, n in zip(rates, sides, tag.length)):
            return tensor
        count = rates[0] * rates[1]
        kept = np.zeros((count, int(sides[0]), int(sides[1])), np.float32)
        for number, (a, b) in enumerate(_fragment_offsets(tag.factors)):
            rows = a + rates[0] * np.arange(int(sides[0])) < tag.length[0]
            cols = b + rates[1] * np.arange(int(sides[1])) < tag.length[1]
            kept[number] = np.outer(rows, cols)
        mask = kept.reshape(self.layout.batch_shape(count, int(sides[0]), int(sides[1]), 1))
        shape = tuple(int(d) for d in tensor.shape[1:])
        grouped = ops.reshape(tensor, (-1, count, *shape))
        grouped = grouped * ops.cast(mask[None], tensor.dtype)
        return ops.reshape(grouped, (-1, *shape))


def _fragment_offsets(factors) -> list[tuple[int, int]]:
    """The à trous offset ``(a, b)`` of each fragment, in the batch's order (each fragmenting a finer digit)."""
    result = [(0, 0)]
    scale = [1, 1]
    for fh, fw in factors:
        result = [(a + scale[0] * i, b + scale[1] * j) for a, b in result for i in range(fh) for j in range(fw)]
        scale = [scale[0] * fh, scale[1] * fw]
    return result


def _window_length(n: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    """The à trous output length of a window of ``kernel`` cells spread by ``dilation``, at ``stride``."""
    if padding == "same":
        return math.ceil(n / stride)
    return max(0, (n - dilation * (kernel - 1) - 1) // stride + 1)
