"""Where each cell of a score map looks in the input image."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe, graph_of, is_graph_model, model_layout, nodes_in_order
from keras_fcn_surgery.grid import axis as gm

_WINDOW_LAYERS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)
_GLOBAL_LAYERS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
_UNSUPPORTED = (keras.layers.Conv2DTranspose, keras.layers.UpSampling2D, keras.layers.Resizing)

# One axis transform per layer call: takes the states of its inputs, returns its output state.
AxisTransform = Callable[[list], "gm.AxisState"]


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of a score map.

    Attributes:
        stride: input pixels between neighbouring output cells.
        receptive_field: input pixels one output cell sees.
        offset: input coordinate where cell 0's window starts (negative when the
            window reaches into padding), at the geometry's ``input_size``.
        input_size: the input length these numbers were computed at.
        output_size: the output length at that input length.
    """

    stride: int
    receptive_field: int
    offset: int
    input_size: int
    output_size: int


@dataclass(frozen=True)
class Geometry:
    """How a fully convolutional model's output cells map onto its input.

    Built by `geometry`. ``height`` and ``width`` describe the two axes at
    ``input_size``; `output_size` and `input_box` work at any size.
    ``global_context`` is True when some layer pools over the whole image
    (squeeze-and-excitation blocks), so a cell also depends on pixels outside
    its box.
    """

    height: AxisGeometry
    width: AxisGeometry
    input_size: tuple[int, int]
    global_context: bool
    _axis_programs: tuple

    @property
    def stride(self) -> tuple[int, int]:
        return (self.height.stride, self.width.stride)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return (self.height.receptive_field, self.width.receptive_field)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.height.offset, self.width.offset)

    def output_size(self, input_size) -> tuple[int, int]:
        """``(H', W')`` of the score map for an ``(H, W)`` input.

        Raises:
            ConversionError: when the input is too small for the network.
        """
        states = self._states(input_size)
        return (states[0].size, states[1].size)

    def input_box(self, i: int, j: int, input_size=None) -> tuple[int, int, int, int]:
        """Input pixels seen by output cell ``(i, j)``: ``(top, left, bottom, right)``, bottom/right exclusive.

        The box may reach outside the image (into padding). ``input_size``
        defaults to the geometry's own; it matters for ``same`` padding.
        """
        rows, cols = self._states(input_size or self.input_size)
        top = rows.offset + i * rows.stride
        left = cols.offset + j * cols.stride
        return (top, left, top + rows.receptive_field, left + cols.receptive_field)

    def at(self, input_size) -> Geometry:
        """The same geometry with offsets computed for another input size."""
        return _geometry_from_programs(self._axis_programs, tuple(int(d) for d in input_size))

    def exact_cells(self, tile_size, *, at_image_start=(True, True), at_image_end=(True, True)) -> tuple:
        """The cells of a tile's map that equal the whole image's map.

        The tile must pad like the whole image: its origin on a multiple of
        `stride` and each side congruent to the image's side modulo `stride`
        (every ``same`` padding then pads it as it pads the image). Where a
        tile's edge lies inside the image, the cells whose windows reach across
        it, at any layer, are not exact; where the edge is the image's edge,
        the network's own padding is the image's padding.

        Args:
            tile_size: ``(H, W)`` of the tile.
            at_image_start: per axis, whether the tile's top (left) edge is the image's.
            at_image_end: per axis, whether the tile's bottom (right) edge is the image's.

        Returns:
            ``((row_start, row_stop), (col_start, col_stop))`` in the tile's
            output cells, stop exclusive (start == stop when none is exact).

        Raises:
            ConversionError: when the tile is too small for the network.
        """
        self._states(tile_size)
        ranges = []
        for program, size, starts, ends in zip(
            self._axis_programs, (int(d) for d in tile_size), at_image_start, at_image_end
        ):
            first = gm.input_state(size, -math.inf if starts else 0, math.inf if ends else size)
            state = _run(program, size, first)
            start = 0 if math.isinf(state.exact_start) else min(max(int(state.exact_start), 0), state.size)
            stop = state.size if math.isinf(state.exact_stop) else min(max(int(state.exact_stop), start), state.size)
            ranges.append((start, stop))
        return tuple(ranges)

    @property
    def min_input_size(self) -> tuple[int, int]:
        """The smallest ``(H, W)`` that gives a non-empty map."""
        return tuple(_smallest_valid(program) for program in self._axis_programs)  # type: ignore[return-value]

    def _states(self, input_size):
        height, width = (int(d) for d in input_size)
        states = []
        for program, size, name in zip(self._axis_programs, (height, width), ("height", "width")):
            try:
                state = _run(program, size)
            except _MisalignedMerge as error:
                raise ConversionError(
                    f"An input {name} of {size} does not fit the network: {error} "
                    f"The next {name} that works is {_next_aligned(program, size)}."
                ) from error
            if state.size < 1:
                minimum = _smallest_valid(program)
                raise ConversionError(
                    f"An input {name} of {size} is smaller than the network's minimum of {minimum} "
                    f"(receptive field {state.receptive_field}): the score map would be empty. "
                    "Use a larger image (or pad it)."
                )
            states.append(state)
        return states

    def __str__(self) -> str:
        return (
            f"stride {self.stride}, receptive field {self.receptive_field}, offset {self.offset} "
            f"at input {self.input_size} -> output {(self.height.output_size, self.width.output_size)}"
        )


def geometry(model, input_size=None, *, head: str = "window") -> Geometry:
    """The output stride, receptive field and offsets of a fully convolutional model.

    Computed from the layers' configurations (kernel size, stride, dilation and
    padding of convolutions and poolings, explicit paddings and croppings).

    Args:
        model: a converted model, or a classifier (converted with
            ``convert(model, head=head, verify=False)`` first).
        input_size: ``(H, W)`` at which to report offsets; default: the
            classifier's input size, or the smallest valid size of an FCN.
        head: used only when ``model`` is a classifier.

    Returns:
        A `Geometry`.
    """
    reference = tuple(int(d) for d in input_size) if input_size is not None else None
    if any(d is not None for d in _input_spatial(model)):
        from keras_fcn_surgery.surgery.convert import convert

        if reference is None:
            reference = tuple(int(d) for d in _input_spatial(model))
        model = convert(model, head=head, verify=False)
    programs = _axis_programs(model)
    if reference is None:
        reference = tuple(_smallest_valid(p) for p in programs)
    return _geometry_from_programs(programs, reference)


def _geometry_from_programs(programs, reference) -> Geometry:
    axes, is_global = [], False
    for program, size in zip(programs, reference):
        state = _run(program, size)
        is_global = is_global or state.global_context
        axes.append(AxisGeometry(state.stride, state.receptive_field, state.offset, size, state.size))
    return Geometry(axes[0], axes[1], reference, is_global, programs)


def _input_spatial(model):
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ConversionError(f"Model '{model.name}' has a rank-{len(shape)} input; geometry needs images.")
    return model_layout(model).spatial_shape(shape)


def _axis_programs(model) -> tuple:
    return tuple(_program(model, axis) for axis in (0, 1))


def _program(model, axis: int) -> tuple:
    """``(steps, output key)``: each step ``(output keys, input keys, transform)`` in graph order."""
    graph = graph_of(model)
    steps: list = []
    _compile(graph, axis, steps, {id(t): "input" if i == 0 else f"input{i}" for i, t in enumerate(graph.inputs)})
    return tuple(steps), _tensor_key(graph.outputs[0])


def _tensor_key(tensor) -> str:
    return f"t{id(tensor)}"


def _compile(graph, axis: int, steps: list, names: dict) -> None:
    """Append the transforms of ``graph``'s nodes to ``steps``, nested models inlined."""
    for node in nodes_in_order(graph):
        layer = node.operation
        sources = [names.get(id(t), _tensor_key(t)) for t in node.input_tensors]
        targets = [_tensor_key(t) for t in node.outputs]
        if is_graph_model(layer):
            inner = graph_of(layer)
            _compile(inner, axis, steps, {id(t): s for t, s in zip(inner.inputs, sources)})
            for target, inner_output in zip(targets, inner.outputs):
                steps.append(([target], [_tensor_key(inner_output)], _first))
        else:
            steps.append((targets, sources, _transform(layer, axis)))


def _first(states):
    return states[0]


def _transform(layer, axis: int):
    if isinstance(layer, _UNSUPPORTED):
        raise ConversionError(
            f"Layer {describe(layer)} changes the map size by a factor; geometry covers only "
            "convolutions, poolings, paddings and croppings."
        )
    if isinstance(layer, _WINDOW_LAYERS):
        kernel = (layer.pool_size if hasattr(layer, "pool_size") else layer.kernel_size)[axis]
        stride = layer.strides[axis]
        dilation = layer.dilation_rate[axis] if hasattr(layer, "dilation_rate") else 1
        padding = layer.padding
        return lambda states: gm.apply_window(states[0], kernel, stride, dilation, padding)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        before, after = layer.padding[axis]
        return lambda states: gm.apply_padding(states[0], before, after)
    if isinstance(layer, keras.layers.Cropping2D):
        before, after = layer.cropping[axis]
        return lambda states: gm.apply_padding(states[0], -before, -after)
    if isinstance(layer, _GLOBAL_LAYERS):
        return lambda states: gm.apply_global(states[0])
    return lambda states: _merge(layer, states)


class _MisalignedMerge(ConversionError):
    """A merge whose input maps have different sizes at this input size (its branches shrink differently)."""

    def __init__(self, message: str, fallback: gm.AxisState):
        super().__init__(message)
        self.fallback = fallback


def _merge(layer, states):
    if len(states) == 1:
        return states[0]
    try:
        return gm.merge(states)
    except ValueError as error:
        maps = [s for s in states if not s.is_global]
        fallback = gm.AxisState(size=min(s.size for s in maps), stride=maps[0].stride)
        sizes = sorted({s.size for s in maps})
        raise _MisalignedMerge(
            f"Layer {describe(layer)} would merge maps of sizes {sizes} there: its branches shrink "
            "differently, so only some input sizes work.",
            fallback,
        ) from error


def _run(program, size: int, first: gm.AxisState | None = None, lenient: bool = False) -> gm.AxisState:
    """The state of the output axis at this input size.

    With ``lenient``, a merge of misaligned maps goes on with the smaller map
    instead of raising: enough to tell whether the input is large enough.
    """
    steps, output = program
    values = {"input": first if first is not None else gm.input_state(size)}
    for targets, sources, transform in steps:
        inputs = [values[s] for s in sources if s in values]
        if not inputs:
            continue
        try:
            result = transform(inputs)
        except _MisalignedMerge as error:
            if not lenient:
                raise
            result = error.fallback
        for target in targets:
            values[target] = result
    return values[output]


def _smallest_valid(program) -> int:
    """The smallest input length that gives a non-empty map with every merge aligned."""
    low, high = 1, 1
    while _run(program, high, lenient=True).size < 1:
        high *= 2
        if high > 1 << 20:
            raise ConversionError("The network gives an empty map at every input size up to 2^20 pixels.")
    while low < high:
        middle = (low + high) // 2
        if _run(program, middle, lenient=True).size >= 1:
            high = middle
        else:
            low = middle + 1
    return _next_aligned(program, high)


def _next_aligned(program, size: int) -> int:
    """The first length from ``size`` on at which every merge lines up (the network's own sizes do)."""
    error = None
    for candidate in range(size, size + 4096):
        try:
            if _run(program, candidate).size >= 1:
                return candidate
        except _MisalignedMerge as misaligned:
            error = error or misaligned
    raise ConversionError(f"No input size from {size} to {size + 4095} works: {error}")
