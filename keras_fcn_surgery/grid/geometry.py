"""Where each cell of a score map looks in the input image."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import (
    call_argument,
    describe,
    graph_of,
    is_builtin,
    is_graph_model,
    is_layer,
    model_facts,
    model_layout,
    nodes_in_order,
    operation_kind,
    output_names,
    probe_output_shapes,
    trace_call,
    traced_model,
)
from keras_fcn_surgery.grid import axis as gm
from keras_fcn_surgery.layout import Layout

# A stride measured from output lengths: the input grows by this many pixels (divisible by 1-10, 12, 14, 16...).
_STRIDE_PROBE = 20160
_MAX_TRACE_DEPTH = 8

# One axis transform per layer call: takes the states of its inputs, returns its output state.
AxisTransform = Callable[[list], "gm.AxisState"]


class MapGrid(Protocol):
    """Where the cells of a map look in its image: the one description every map, output and picture reads.

    Two kinds answer it: `Geometry`, an FCN's, computed from its layers, and
    `WindowGrid`, a regular grid of windows (the windowed method's, and a
    per-pixel map's). Cell ``(i, j)``'s window starts at ``offset + (i, j) *
    stride`` and spans ``receptive_field`` pixels.
    """

    @property
    def stride(self) -> tuple[int, int]: ...

    @property
    def receptive_field(self) -> tuple[int, int]: ...

    @property
    def offset(self) -> tuple[int, int]: ...

    @property
    def global_context(self) -> bool: ...

    @property
    def exact(self) -> bool: ...

    def output_size(self, input_size) -> tuple[int, int]: ...

    def input_box(self, i: int, j: int, input_size=None) -> tuple[int, int, int, int]: ...

    def at(self, input_size) -> MapGrid: ...


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of a score map.

    Attributes:
        stride: input pixels between neighbouring output cells.
        receptive_field: input pixels one output cell sees; None when some
            layer's window could not be derived (see `Geometry.unknown`).
        offset: input coordinate where cell 0's window starts (negative when the
            window reaches into padding), at the geometry's ``input_size``;
            None when ``receptive_field`` is.
        input_size: the input length these numbers were computed at.
        output_size: the output length at that input length.
    """

    stride: int
    receptive_field: int | None
    offset: int | None
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
    unknown: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """False when some layer's window could not be derived (`unknown` names it).

        Output sizes are exact even then (every such layer is asked for its
        output shape); the stride, receptive field and offsets are not known,
        so `input_box`, `exact_cells` and tiled `predict_map` refuse.
        """
        return not self.unknown

    @property
    def stride(self) -> tuple[int, int]:
        return (self.height.stride, self.width.stride)

    @property
    def receptive_field(self) -> tuple[int, int]:
        """Raises `ConversionError` when not `exact`."""
        self._require_exact("receptive field")
        return (self.height.receptive_field, self.width.receptive_field)  # type: ignore[return-value]

    @property
    def offset(self) -> tuple[int, int]:
        """Raises `ConversionError` when not `exact`."""
        self._require_exact("offset")
        return (self.height.offset, self.width.offset)  # type: ignore[return-value]

    def _require_exact(self, what: str) -> None:
        if self.unknown:
            raise ConversionError(
                f"The {what} of this network is unknown: {self.unknown[0]}. Output sizes are exact; for "
                "windows and tiles, rebuild that layer from built-in layers or `keras.ops` in its `call`."
            )

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

        Raises:
            ConversionError: when the geometry is not `exact`.
        """
        self._require_exact("receptive field")
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
            ConversionError: when the tile is too small for the network, or
                the geometry is not `exact` (no tiling can be proven exact).
        """
        if self.unknown:
            raise ConversionError(
                f"No tiling of this network can be proven exact: {self.unknown[0]}. Run it on the whole "
                "image (`tile=None`), or rebuild that layer from built-in layers or `keras.ops` in its `call`."
            )
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
                raise InputError(  # the input's to fix (CLI: exit 2), not the model's
                    f"An input {name} of {size} is smaller than the network's minimum of {minimum} "
                    f"(receptive field {state.receptive_field}): the score map would be empty. "
                    "Use a larger image (or pad it)."
                )
            states.append(state)
        return states

    def __str__(self) -> str:
        if self.unknown:
            return (
                f"stride {self.stride}, receptive field and offset unknown ({self.unknown[0]}) "
                f"at input {self.input_size} -> output {(self.height.output_size, self.width.output_size)}"
            )
        return (
            f"stride {self.stride}, receptive field {self.receptive_field}, offset {self.offset} "
            f"at input {self.input_size} -> output {(self.height.output_size, self.width.output_size)}"
        )


@dataclass(frozen=True)
class WindowGrid:
    """Where each cell of a windowed map looks (`inference.windowed`): the classifier's window at a stride.

    Cell ``(i, j)`` is the classifier on the crop of ``receptive_field``
    pixels at ``(i * s_h, j * s_w)``: stride ``s``, offset 0, no padding and
    no global context. It answers what a `Geometry` answers (``at``,
    ``output_size``, ``input_box``), so masks, GeoJSON boxes, pictures and
    the outputs' metadata place a windowed map's cells as they place an FCN's.

    Attributes:
        stride: ``(s_h, s_w)``: pixels between windows.
        receptive_field: ``(h, w)``: the classifier's input size (the window).
        input_size: the image size the grid is taken at (None: any).
    """

    stride: tuple[int, int]
    receptive_field: tuple[int, int]
    input_size: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)
    global_context: bool = False
    unknown: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return True

    def output_size(self, input_size) -> tuple[int, int]:
        """``(H', W')``: whole windows along each axis of an ``(H, W)`` image.

        Raises:
            InputError: for an image smaller than one window.
        """
        counts = []
        for name, length, side, step in zip(("height", "width"), input_size, self.receptive_field, self.stride):
            if int(length) < side:
                raise InputError(
                    f"Image {name} {int(length)} is smaller than the window of {self.receptive_field[0]}x"
                    f"{self.receptive_field[1]} pixels. Use a larger image (or pad it)."
                )
            counts.append((int(length) - side) // step + 1)
        return (counts[0], counts[1])

    def input_box(self, i: int, j: int, input_size=None) -> tuple[int, int, int, int]:
        """The crop of cell ``(i, j)``: ``(top, left, bottom, right)``, bottom/right exclusive."""
        top, left = i * self.stride[0], j * self.stride[1]
        return (top, left, top + self.receptive_field[0], left + self.receptive_field[1])

    def at(self, input_size) -> WindowGrid:
        """The same grid, recorded at ``input_size`` (a windowed grid does not depend on it)."""
        return replace(self, input_size=(int(input_size[0]), int(input_size[1])))

    @classmethod
    def per_pixel(cls) -> WindowGrid:
        """A per-pixel map's grid (a segmenter's): cell ``(i, j)`` is pixel ``(i, j)``."""
        return cls(stride=(1, 1), receptive_field=(1, 1))


def geometry(model, input_size=None, *, head: str = "window", output: str | None = None) -> Geometry:
    """The output stride, receptive field and offsets of a fully convolutional model.

    Computed from the layers' configurations (kernel size, stride, dilation and
    padding of convolutions and poolings, explicit paddings and croppings,
    `keras.ops` paddings and slices). A layer of another class (a custom layer,
    a keras-hub block) is traced into the sub-layers and operations its
    ``call`` is made of; where that fails its output size is asked of the
    layer itself at each input size, and the geometry reports that it is not
    `exact` (`Geometry.unknown` names the layer) instead of guessing.

    Args:
        model: a converted model, or a classifier (converted with
            ``convert(model, head=head, verify=False)`` first).
        input_size: ``(H, W)`` at which to report offsets; default: the
            classifier's input size, or the smallest valid size of an FCN.
        head: used only when ``model`` is a classifier.
        output: for a model with several outputs, the name of the one to
            describe (`graph.output_names`: the producing layer's name, or the
            key of a dict of outputs). None: all of them together, as the
            tiles of `predict_map` must serve them: their maps must lie on
            one grid (the same stride and size at every input size); the
            receptive field then covers every output's window, and a tile's
            exact cells are those exact in every output.

    Returns:
        A `Geometry`.

    Raises:
        InputError: for an ``output`` the model does not have.
        ConversionError: with ``output=None``, for outputs whose maps lie on
            different grids (say, one at stride 16 and one at stride 32): the
            message names each output's stride; ask for one by name.
    """
    model = traced_model(model)
    reference = tuple(int(d) for d in input_size) if input_size is not None else None
    if any(d is not None for d in _input_spatial(model)):
        from keras_fcn_surgery.surgery.convert import convert

        if reference is None:
            reference = tuple(int(d) for d in _input_spatial(model))
        model = convert(model, head=head, verify=False)
    programs = _axis_programs(model, output)
    if reference is None:
        reference = tuple(_smallest_valid(p) for p in programs)
    return _geometry_from_programs(programs, reference)


def _geometry_from_programs(programs, reference) -> Geometry:
    axes, is_global, unknown = [], False, []  # type: list[AxisGeometry], bool, list[str]
    for program, size in zip(programs, reference):
        state = _run(program, size)
        is_global = is_global or state.global_context
        known = not state.unknown
        axes.append(
            AxisGeometry(
                state.stride,
                state.receptive_field if known else None,
                state.offset if known else None,
                size,
                state.size,
            )
        )
        unknown.extend(u for u in state.unknown if u not in unknown)
    return Geometry(axes[0], axes[1], reference, is_global, programs, tuple(unknown))


def _input_spatial(model):
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ConversionError(f"Model '{model.name}' has a rank-{len(shape)} input; geometry needs images.")
    return model_layout(model).spatial_shape(shape)


def _axis_programs(model, output: str | None = None) -> tuple:
    """The two axes' `_Program`s of ``model`` (toward ``output``, None: every output), compiled once per model."""
    known = model_facts(model).axis_programs
    if output not in known:
        known[output] = _compile_axes(model, output)
    return known[output]


def _compile_axes(model, output: str | None) -> tuple:
    graph = graph_of(model)
    names = output_names(model)
    if output is not None and output not in names:
        raise InputError(
            f"Model '{model.name}' has no output named {output!r}; its outputs are {', '.join(map(repr, names))}."
        )
    inputs = {id(t): "input" if i == 0 else f"input{i}" for i, t in enumerate(graph.inputs)}
    # An output may be an input itself (a model of layers that are the identity at inference, left out).
    keys = [(name, inputs.get(id(tensor), _tensor_key(tensor))) for name, tensor in zip(names, graph.outputs)]
    if output is not None:
        keys = [key for key in keys if key[0] == output]
    return tuple(_program(graph, model_layout(model), axis, keys) for axis in (0, 1))


class _Program:
    """One axis's geometry as steps to run at any input size, and what runs of it gave (they are pure).

    ``steps``: each ``(output keys, input keys, transform)`` in graph order;
    ``output``: the output's key, or for several outputs together, their
    ``(name, key)`` pairs (see `_joint_outputs`). ``memo``: `_run`'s states by
    ``(size, first state, lenient)`` and `_smallest_valid`'s size: planning a
    masked slide asks for the same sizes thousands of times.
    """

    __slots__ = ("steps", "output", "memo")

    def __init__(self, steps: tuple, output):
        self.steps, self.output = steps, output
        self.memo: dict = {}


def _program(graph, layout: Layout, axis: int, outputs: list) -> _Program:
    """The `_Program` of one axis of ``graph`` towards ``outputs`` (``(name, key)`` pairs)."""
    steps: list = []
    names = {id(t): "input" if i == 0 else f"input{i}" for i, t in enumerate(graph.inputs)}
    _compile(graph, axis, layout, steps, names, 0)
    return _Program(tuple(steps), outputs[0][1] if len(outputs) == 1 else tuple(outputs))


def _tensor_key(tensor) -> str:
    return f"t{id(tensor)}"


def _compile(graph, axis: int, layout: Layout, steps: list, names: dict, depth: int) -> None:
    """Append the transforms of ``graph``'s nodes to ``steps``; nested models and traced layers inlined."""
    for node in nodes_in_order(graph):
        layer = node.operation
        sources = [names.get(id(t), _tensor_key(t)) for t in node.input_tensors]
        targets = [_tensor_key(t) for t in node.outputs]
        inner = None
        if is_graph_model(layer):
            inner = graph_of(layer)
        elif _needs_tracing(layer) and depth < _MAX_TRACE_DEPTH:
            inner = trace_call(node, layout.spatial_axes)
        if inner is not None:
            inner_names = {id(t): s for t, s in zip(inner.inputs, sources)}
            _compile(inner, axis, layout, steps, inner_names, depth + 1)
            for target, inner_output in zip(targets, inner.outputs):
                # A nested model may return its input (a `Sequential` of augmentations, left out at inference).
                steps.append(([target], [inner_names.get(id(inner_output), _tensor_key(inner_output))], _first))
        else:
            steps.append((targets, sources, _transform(node, axis, layout)))


def _needs_tracing(layer) -> bool:
    """A layer whose class geometry does not know: a custom layer, a keras-hub block, a Lambda."""
    if isinstance(layer, taxonomy.DILATED_POOLINGS):
        return False
    return is_layer(layer) and (not is_builtin(layer) or isinstance(layer, taxonomy.LAMBDAS))


def _first(states):
    return states[0]


def _transform(node, axis: int, layout: Layout):
    layer = node.operation
    if isinstance(layer, taxonomy.WINDOWS):
        kernel = (layer.pool_size if hasattr(layer, "pool_size") else layer.kernel_size)[axis]
        stride = layer.strides[axis]
        dilation = layer.dilation_rate[axis] if hasattr(layer, "dilation_rate") else 1
        padding = layer.padding
        return lambda states: gm.apply_window(states[0], kernel, stride, dilation, padding)
    if isinstance(layer, taxonomy.PADDINGS):
        before, after = layer.padding[axis]
        return lambda states: gm.apply_padding(states[0], before, after)
    if isinstance(layer, taxonomy.CROPPINGS):
        before, after = layer.cropping[axis]
        return lambda states: gm.apply_padding(states[0], -before, -after)
    if isinstance(layer, taxonomy.GLOBAL_POOLINGS):
        return lambda states: gm.apply_global(states[0])
    known = _pointwise_or_operation(node, axis, layout)
    if known is not None:
        return _global_inputs_stay_global(known)
    return _global_inputs_stay_global(_ProbedLayer(node, axis, layout, _why_unknown(layer)))


def _global_inputs_stay_global(transform):
    """Anything computed from broadcast vectors alone (squeeze-and-excitation) stays a broadcast vector."""

    def apply(states):
        if states and all(s.is_global for s in states):
            return gm.merge(states)
        return transform(states)

    return apply


def _pointwise_or_operation(node, axis: int, layout: Layout):
    """The exact transform of a pointwise layer or a known `keras.ops` operation, or None."""
    layer = node.operation
    rank = len(node.input_tensors[0].shape) if node.input_tensors else 0
    if is_layer(layer):
        if isinstance(layer, taxonomy.POINTWISE):
            return lambda states: _merge(layer, states)
        if isinstance(layer, taxonomy.DENSE) and layout.channels_last:
            return lambda states: _merge(layer, states)
        if isinstance(layer, (*taxonomy.CHANNEL_AXIS, *taxonomy.CONCATENATIONS)) and _on_channel_axis(
            layer.axis, rank, layout
        ):
            return lambda states: _merge(layer, states)
        return None
    kind = operation_kind(layer)
    if kind in ("unary", "binary"):
        return lambda states: _merge(layer, states)
    if kind in ("axis", "concatenate", "split") and _on_channel_axis(layer.axis, rank, layout):
        return lambda states: _merge(layer, states)
    if kind == "reduction" and rank == 4:
        axes = _axes(layer.axis, rank)
        if axes is not None and set(layout.spatial_axes) <= set(axes):
            return lambda states: gm.apply_global(states[0])
        if axes == [layout.channel_axis % 4]:
            return lambda states: states[0]
        return None
    if kind == "Pad" and rank == 4 and layer.mode == "constant":
        before, after = layer.pad_width[layout.spatial_axes[axis]]
        return lambda states: gm.apply_padding(states[0], before, after)
    if kind == "GetItem" and rank == 4:
        return _slice_transform(node, layout.spatial_axes[axis])
    return None


def _axes(axis, rank: int):
    if axis is None:
        return None
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


def _on_channel_axis(axis, rank: int, layout: Layout) -> bool:
    if rank != 4:
        return True  # vectors (the head, squeeze-and-excitation): no grid to change
    return _axes(axis, rank) == [layout.channel_axis % 4]


def _slice_transform(node, spatial_axis: int):
    """``x[:, a:b:s, ...]``: keeps every s-th cell from a on; None for other keys (integers, new axes)."""
    key = call_argument(node, 1)
    key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    if Ellipsis in key or any(k is None for k in key) or not all(isinstance(k, slice) for k in key):
        return None
    part = key[spatial_axis] if spatial_axis < len(key) else slice(None)

    def apply(states):
        start, stop, step = part.indices(states[0].size)
        kept = len(range(start, stop, step))
        if step < 1:
            return gm.apply_unknown(states[0], kept, 1, f"{describe(node.operation)} reverses an axis")
        return gm.apply_slice(states[0], start, step, kept)

    return apply


def _why_unknown(layer) -> str:
    if _needs_tracing(layer):
        return (
            f"layer {describe(layer)} is not a built-in layer and its `call` could not be traced into layers "
            "and `keras.ops` operations"
        )
    return f"{'layer' if is_layer(layer) else 'operation'} {describe(layer)} has no known window"


class _ProbedLayer:
    """A layer whose output length is asked of the layer itself; its window is unknown."""

    def __init__(self, node, axis: int, layout: Layout, why: str):
        self.node, self.axis, self.layout, self.why = node, axis, layout, why
        self._sizes: dict[tuple, int] = {}
        self._step: int | None = None

    def __call__(self, states):
        sizes = tuple(s.size for s in states)
        size = self._output_size(sizes)
        if self._step is None and size > 0:
            larger = self._output_size(tuple(n if s.is_global else n + _STRIDE_PROBE for n, s in zip(sizes, states)))
            grown = larger - size
            self._step = _STRIDE_PROBE // grown if grown > 0 and _STRIDE_PROBE % grown == 0 else 1
        maps = [s for s in states if not s.is_global] or list(states)
        return gm.apply_unknown(gm.merge(maps) if _aligned(maps) else maps[0], size, self._step or 1, self.why)

    def _output_size(self, sizes: tuple) -> int:
        if sizes not in self._sizes:
            self._sizes[sizes] = self._probe(sizes)
        return self._sizes[sizes]

    def _probe(self, sizes) -> int:
        if any(n < 1 for n in sizes):
            return 0
        shapes = []
        for tensor, n in zip(self.node.input_tensors, sizes):
            shape = list(tensor.shape)
            if len(shape) == 4:
                for spatial in self.layout.spatial_axes:
                    shape[spatial] = n
            shapes.append(tuple(shape))
        try:
            outputs = probe_output_shapes(self.node, shapes)
        except Exception:  # noqa: BLE001 - a layer that cannot take this size gives no map at it
            return 0
        first = outputs[0]
        if len(first) != 4:
            return 1
        length = first[self.layout.spatial_axes[self.axis]]
        if length is None:
            raise ConversionError(
                f"The output size of {describe(self.node.operation)} cannot be derived from its input size "
                "(Keras reports it as unknown), so neither can the network's geometry."
            )
        return int(length)


def _aligned(states) -> bool:
    return len({(s.size, s.stride) for s in states}) == 1


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


def _run(program: _Program, size: int, first: gm.AxisState | None = None, lenient: bool = False) -> gm.AxisState:
    """The state of the output axis at this input size.

    With ``lenient``, a merge of misaligned maps goes on with the smaller map
    instead of raising: enough to tell whether the input is large enough.
    """
    key = (size, first, lenient)
    if key not in program.memo:
        program.memo[key] = _run_steps(program, size, first, lenient)
    return program.memo[key]


def _run_steps(program: _Program, size: int, first: gm.AxisState | None, lenient: bool) -> gm.AxisState:
    values = {"input": first if first is not None else gm.input_state(size)}
    for targets, sources, transform in program.steps:
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
    if isinstance(program.output, str):
        return values[program.output]
    return _joint_outputs([(name, values[key]) for name, key in program.output], lenient)


def _joint_outputs(named_states, lenient: bool) -> gm.AxisState:
    """Several outputs' states as one, as tiles that serve them all see them: a merge of their maps.

    With ``lenient``, outputs of different sizes give the smaller size (enough
    to tell whether the input is large enough).

    Raises:
        ConversionError: for outputs at different strides or of different
            sizes (no one tiling serves them all).
    """
    states = [state for _, state in named_states]
    maps = [state for state in states if not state.is_global] or states
    if len({state.stride for state in maps}) > 1:
        each = ", ".join(f"{name!r} stride {state.stride}" for name, state in named_states)
    elif len({state.size for state in maps}) > 1 and all(state.size >= 1 for state in maps):
        if lenient:
            return gm.AxisState(size=min(state.size for state in maps), stride=maps[0].stride)
        each = ", ".join(f"{name!r} {state.size} cells" for name, state in named_states)
    else:
        return gm.merge(states)
    raise ConversionError(
        f"The model's outputs lie on different grids ({each}): no one geometry or tiling serves them all. "
        "Ask for one output's geometry "
        "(`geometry(model, output=NAME)`); a tiled or masked `predict_map` needs outputs on one grid "
        "(use `tile=None` and no `keep`)."
    )


def _smallest_valid(program: _Program) -> int:
    """The smallest input length that gives a non-empty map with every merge aligned."""
    if "smallest" not in program.memo:
        program.memo["smallest"] = _search_smallest_valid(program)
    return program.memo["smallest"]


def _search_smallest_valid(program: _Program) -> int:
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
