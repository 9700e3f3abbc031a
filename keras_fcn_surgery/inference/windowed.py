"""Exact dense maps of any classifier: what convolves runs once over the image, the rest on each window.

A classifier whose tail is tied to one input size (a transformer's tokens,
class token and position embeddings) or looks at the whole window
(squeeze-and-excitation) has no exact FCN. Its map at a stride ``s`` is still
the classifier on every crop at that stride, and the crops share work: the
part of the network up to a *split* that commutes with cropping (a patch
embedding, a convolutional stem) computes, on a crop, a crop of what it
computes on the whole image.

The split is a tensor of the classifier's `graph.FlatTrace` (its layers'
insides included) that carries all later computation, a spatial map, and
whose *prefix* (the graph up to it) converts to an FCN whose geometry is
exact and has no global context. The prefix runs once over the image as that
FCN (`predict_map`: tiled, staged, masked as usual); the *tail* (the trace
from the split to the outputs: the classifier's own layers and weights) runs
on each window's part of the prefix's map, in batches.

Why it is exact. Windows start on multiples of ``s``, a multiple of the
prefix's stride ``P``, and the pass covers the image rows and columns the
windows cover, whose length is congruent to the window's modulo ``P``. A
window is then an exact tile of that region (`grid.tiling`): the cells of its
prefix map whose windows stay inside it equal the region map's cells
(`Geometry.exact_cells`). The other cells, near the window's edges where a
``same`` padding of the prefix pads the crop but not the image, are the
prefix run on a strip of the crop along that edge: a strip at the crop's edge
whose length is congruent to the window's modulo ``P`` is an exact tile of
the crop in turn. So every window's prefix map is the classifier's own prefix
map of the crop, and the tail computes the classifier's output on the crop.
A valid patch embedding (ViT, DeiT, Swin) needs no strips.

Of the splits (the input itself, where nothing is shared, to the deepest
one), the plan takes the one that computes least for the image and stride
(`plan_windows`).

Memory stays bounded on a slide: the windows run in horizontal *bands* of
window rows, and the prefix runs over each band's pixel rows only (a band
starts on a multiple of ``s``, so the argument above holds for a band as for
the region; neighbouring bands overlap by a window less one stride, computed
again). A band holds as many window rows as keep its shared map within the
memory budget, and at least as many as keep that recomputation within a
quarter of the prefix's work (past the budget such a band's map goes to a
temporary file); the image is read tile by tile and the map written window
by window, so neither is ever held whole.

A classifier is analysed once (`analysis`: its trace, its prefixes'
conversions), as `as_fcn` converts it once: the prefixes' weights are copied
then, and values a layer computes from its weights alone (a position
embedding at fixed positions) are recorded then. Give a model whose weights
changed since as a new model object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_fcn_surgery.cost import layer_macs, pass_cost
from keras_fcn_surgery.errors import ConversionError, InputError, VerificationError, first_line
from keras_fcn_surgery.graph import (
    describe,
    flat_trace,
    graph_part,
    model_facts,
    model_layout,
    nodes_between,
    sublayers,
    traced_model,
)
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import Geometry, WindowGrid, geometry
from keras_fcn_surgery.inference import engines, runner
from keras_fcn_surgery.inference.staged import plan_fcn
from keras_fcn_surgery.inference.store import DiskMap, Scratch, file_backed
from keras_fcn_surgery.layout import ImageSpec, Layout
from keras_fcn_surgery.names import runtime_name
from keras_fcn_surgery.options import MAP_METHODS
from keras_fcn_surgery.surgery.atrous import FinerStride, at_stride, rarefy
from keras_fcn_surgery.surgery.convert import convert
from keras_fcn_surgery.surgery.fcn import FcnSpec, as_fcn, is_fully_convolutional, map_outputs
from keras_fcn_surgery.surgery.verify import compare_arrays, tolerance_for
from keras_fcn_surgery.taxonomy import NOT_IDENTITY_AUGMENTATIONS

if TYPE_CHECKING:
    from keras_fcn_surgery.inference.mapper import MapOptions

# Bytes of a band's shared prefix map kept in memory (bands are sized to it); a larger one goes to a temporary file.
DEFAULT_MEMORY_BUDGET = 64 << 20


@dataclass(frozen=True)
class _Band:
    """One axis of a window's prefix map: which cells come from the shared map, which from strips.

    Attributes:
        cells: the window's prefix-map cells along the axis.
        exact: ``(start, stop)``: the cells equal to the shared map's (for a
            window whose edges lie inside the image).
        before: pixels of the strip at the window's start whose prefix map
            gives cells ``[0, start)``; None when ``start`` is 0.
        after: pixels of the strip at the window's end that gives cells
            ``[stop, cells)``; None when ``stop`` is ``cells``.
    """

    cells: int
    exact: tuple[int, int]
    before: int | None
    after: int | None


@dataclass(frozen=True)
class _Split:
    """One place to split a classifier into a shared prefix and a windowed tail."""

    index: int  # position in the trace of the call whose output is the split (-1: the input)
    name: str
    prefix: keras.Model | None  # the prefix as an FCN; None at the input
    grid: Geometry | None
    stride: tuple[int, int]
    cells: tuple[int, int]
    channels: int
    bands: tuple[_Band, _Band]
    prefix_macs: int  # of the prefix on one window (from the trace)
    strip_macs: int  # of the strips of one window
    tail_macs: int  # of the tail on one window

    def strips(self) -> list[tuple[int, str, int]]:
        """``(axis, "before" | "after", length)`` of each strip one window computes."""
        found = []
        for axis, band in enumerate(self.bands):
            for side in ("before", "after"):
                length = getattr(band, side)
                if length is not None:
                    found.append((axis, side, length))
        return found


@dataclass
class _Analysis:
    """A classifier's splits, found once (`analysis`)."""

    model: keras.Model  # the classifier (its traced twin for a subclassed one)
    layout: Layout
    window: tuple[int, int]
    channels: int
    classes: int
    splits: list  # of _Split, shallowest first; splits[0] is the input
    window_macs: int
    blocked_by: str  # why the deepest split is not deeper
    tails: dict = field(default_factory=dict)  # (split index, batch) -> tail model
    traces: dict = field(default_factory=dict)  # batch -> FlatTrace
    verified: set = field(default_factory=set)

    def trace(self, batch: int):
        if batch not in self.traces:
            self.traces[batch] = flat_trace(self.model, batch)
        return self.traces[batch]

    def tail(self, split: _Split, batch: int) -> keras.Model:
        key = (split.index, batch)
        if key not in self.tails:
            trace = self.trace(batch)
            reference = self.trace(1)
            if len(trace.nodes) != len(reference.nodes) or (
                split.index >= 0 and trace.nodes[split.index].operation is not reference.nodes[split.index].operation
            ):
                raise ConversionError(
                    f"Model '{self.model.name}' records a different graph at a batch of {batch}; its windowed map "
                    "cannot be batched. Pass `batch_size=1`."
                )
            start = trace.output_of(split.index)
            nodes = nodes_between([start], trace.outputs)
            name = runtime_name(self.model.name, "after", split.name)
            self.tails[key] = graph_part(nodes, start, trace.outputs, name=name)
        return self.tails[key]


@dataclass(frozen=True)
class WindowedPlan:
    """How `predict_map` computes a classifier's exact map window by window (the windowed method).

    Attributes:
        image_size: ``(H, W)`` of the image.
        map_size: ``(H', W')``: windows along each axis.
        window: ``(h, w)``: the classifier's input size.
        stride: ``(s_h, s_w)``: pixels between windows.
        split: the layer or operation whose output is shared (``"input"``
            when nothing is: every window runs the whole classifier).
        prefix_stride: the stride of the shared map (every ``stride`` is a
            multiple of it).
        deepest_split: the deepest possible split, and ``blocked_by``: what
            ends the shareable part there (a layer that pools over the whole
            window, ties the model to one size, or is not exact).
        region: ``(H_r, W_r)``: the image part the windows cover, which the
            prefix runs over.
        prefix_plan: the `PredictionPlan` of the prefix's pass over the
            first band (tiles, stages), or None when nothing is shared.
        windows: windows computed (the kept ones, with ``keep``).
        batch_size: windows per call of the tail.
        strips: per window, the strips along its edges on which the prefix
            runs again (``"top 9"``: the top 9 pixel rows), where its ``same``
            padding pads a crop differently from the image.
        prefix_macs: multiply-accumulates of the prefix's pass.
        strip_macs: of all windows' strips.
        tail_macs: of all windows' tails.
        sliding_macs: of the classifier on every computed window (the
            naive sliding window).
        fcn_macs: of one whole-image pass of the classifier's FCN where it
            converts (approximate where it has global context), else None.
        kept_fraction: the share of windows a ``keep`` mask keeps.
        bands: bands of window rows the windows run in (one: the whole
            region at once).
        band_rows: window rows per band (the last may have fewer).
        band_bytes: bytes of one band's shared map: with the tiles and
            batches in flight, the memory the pass holds (``band_store``
            ``"disk"``: a temporary file instead, read window by window).
        band_store: ``"memory"`` or ``"disk"``.
        finer: at a stride that neither divides nor is a multiple of the
            classifier's FCN's, the `FinerStride` costs of the way not chosen
            (its FCN à trous, thinned) next to this one; None otherwise.
    """

    image_size: tuple[int, int]
    map_size: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    split: str
    prefix_stride: tuple[int, int]
    deepest_split: str
    blocked_by: str
    region: tuple[int, int]
    prefix_plan: object
    windows: int
    batch_size: int
    strips: tuple[str, ...]
    prefix_macs: int
    strip_macs: int
    tail_macs: int
    sliding_macs: int
    fcn_macs: int | None
    kept_fraction: float = 1.0
    bands: int = 1
    band_rows: int = 0
    band_bytes: int = 0
    band_store: str = "memory"
    finer: FinerStride | None = None
    _bands: tuple = field(default=(), repr=False, compare=False)  # (first row, stop row, needed) per band
    _split: object = field(default=None, repr=False, compare=False)
    _analysis: object = field(default=None, repr=False, compare=False)

    method = "windowed"

    @property
    def grid(self) -> WindowGrid:
        """Where the map's cells look: the window at ``stride``, offset 0 (for masks, boxes, pictures)."""
        return WindowGrid(self.stride, self.window, self.image_size)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the whole windowed pass."""
        return self.prefix_macs + self.strip_macs + self.tail_macs

    @property
    def saved(self) -> float:
        """The share of the sliding window's computation the shared prefix saves (0 when nothing is shared)."""
        return 1.0 - self.macs / self.sliding_macs if self.sliding_macs else 0.0

    def __str__(self) -> str:
        def gmac(value):
            return f"{value / 1e9:.3g} GMAC"

        strips = ", ".join(self.strips) if self.strips else "none"
        lines = [
            f"{self.image_size[0]}x{self.image_size[1]} -> map {self.map_size[0]}x{self.map_size[1]}, windowed: "
            f"{self.windows} windows of {self.window[0]}x{self.window[1]} at stride {self.stride[0]}x{self.stride[1]}"
            + (f" ({self.kept_fraction:.0%} kept)" if self.kept_fraction < 1 else ""),
            f"split after '{self.split}' (shared map at stride {self.prefix_stride[0]}x{self.prefix_stride[1]}; "
            f"deepest possible '{self.deepest_split}', then {self.blocked_by})",
            f"prefix over {self.region[0]}x{self.region[1]} pixels: {gmac(self.prefix_macs)}; strips per window: "
            f"{strips}: {gmac(self.strip_macs)}; tails in batches of {self.batch_size}: {gmac(self.tail_macs)}",
            f"{self.bands} band{'s' if self.bands != 1 else ''} of up to {self.band_rows} window rows, shared map "
            f"{self.band_bytes / 2**20:.3g} MiB per band ({self.band_store})",
            f"total {gmac(self.macs)} against {gmac(self.sliding_macs)} for the sliding window "
            f"({self.saved:.1%} saved)"
            + ("; nothing is shared: this is the sliding window's cost" if self.split == "input" else "")
            + (f"; the FCN (not exact on crops) {gmac(self.fcn_macs)}" if self.fcn_macs is not None else ""),
            *([str(self.finer)] if self.finer is not None else []),
        ]
        return "\n".join(lines)


def analysis(model) -> _Analysis:
    """The splits of a classifier, found once per model (its trace and its prefixes' conversions).

    Raises:
        ConversionError: for a model that does not take one fixed-size image
            and return one vector of scores.
    """
    facts = model_facts(model)
    if facts.analysis is None:
        facts.analysis = _analyse(model)
    return facts.analysis  # type: ignore[return-value]


def _analyse(model) -> _Analysis:
    twin = traced_model(model)
    layout = model_layout(twin)
    shape = tuple(twin.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in layout.spatial_shape(shape)) or layout.channels(shape) is None:
        raise ConversionError(
            f"Model '{twin.name}' takes inputs of shape {shape}; a windowed map needs a classifier with a fixed "
            "input size (the window): build it with one (`input_shape=(H, W, C)`), or compute the map of its FCN "
            "(`kfs.predict_map(kfs.as_fcn(model, input_size=(H, W)), image)`)."
        )
    if len(twin.outputs) != 1 or len(twin.outputs[0].shape) != 2:
        outputs = ", ".join(str(tuple(t.shape)) for t in twin.outputs)
        raise ConversionError(
            f"Model '{twin.name}' returns {outputs}; a windowed map needs a classifier with one output, a vector "
            "of scores per image."
        )
    height, width = (int(d) for d in layout.spatial_shape(shape))
    window = (height, width)
    channels = int(layout.channels(shape))
    trace = flat_trace(twin, 1)
    node_macs = [_node_macs(node) for node in trace.nodes]
    total = sum(node_macs)
    identity = _Split(
        index=-1,
        name="input",
        prefix=None,
        grid=None,
        stride=(1, 1),
        cells=(window[0], window[1]),
        channels=channels,
        bands=_whole_bands(window),
        prefix_macs=0,
        strip_macs=0,
        tail_macs=total,
    )
    splits, blocked_by = [identity], "no later spatial map carries all the computation"
    for index in trace.cut_indices():
        tensor = trace.output_of(index)
        if index < 0 or len(tensor.shape) != 4:
            continue
        name = trace.operation_name(index)
        operation = describe(trace.nodes[index].operation)
        try:
            part = keras.Model(trace.input, tensor, name=runtime_name(twin.name, "to", name))
            prefix = convert(part, verify=False)
            grid = geometry(prefix)
        except (ConversionError, ValueError) as error:
            blocked_by = f"{operation}'s part of the graph does not convert ({str(error).splitlines()[0]})"
            break
        if grid.global_context:
            blocked_by = f"the part up to {operation} pools over the whole window"
            break
        if not grid.exact or model_layout(prefix) != layout:
            blocked_by = f"the geometry up to {operation} is not exact" + (
                f" ({grid.unknown[0]})" if grid.unknown else ""
            )
            break
        cells = grid.output_size(window)
        if tuple(cells) != tuple(int(d) for d in layout.spatial_shape(tuple(tensor.shape))):
            blocked_by = f"the FCN of the part up to {operation} gives another map size"
            break
        bands = tuple(_band(grid, window, axis) for axis in (0, 1))
        if any(b.before == window[a] or b.after == window[a] for a, b in enumerate(bands)):
            continue  # its strips would be whole windows: nothing is shared
        split_channels = int(layout.channels(tuple(tensor.shape)))
        strip_macs = sum(
            pass_cost(prefix, layout.batch_shape(1, *_strip_size(window, axis, length), channels)).macs
            for axis, band in enumerate(bands)
            for length in (band.before, band.after)
            if length is not None
        )
        before = sum(node_macs[: index + 1])
        splits.append(
            _Split(
                index=index,
                name=name,
                prefix=prefix,
                grid=grid,
                stride=grid.stride,
                cells=(cells[0], cells[1]),
                channels=split_channels,
                bands=(bands[0], bands[1]),
                prefix_macs=before,
                strip_macs=strip_macs,
                tail_macs=total - before,
            )
        )
    return _Analysis(twin, layout, window, channels, int(twin.outputs[0].shape[-1]), splits, total, blocked_by)


def _node_macs(node) -> int:
    if not node.input_tensors or not node.outputs:
        return 0
    shapes = tuple(node.input_tensors[0].shape), tuple(node.outputs[0].shape)
    if any(d is None for shape in shapes for d in shape):
        return 0  # a size the trace does not know (a reshape to -1): not counted
    return layer_macs(node.operation, *shapes)


def _whole_bands(window) -> tuple[_Band, _Band]:
    return tuple(_Band(n, (0, n), None, None) for n in window)  # type: ignore[return-value]


def _strip_size(window, axis: int, length: int) -> tuple[int, int]:
    size = list(window)
    size[axis] = length
    return (size[0], size[1])


def _band(grid: Geometry, window, axis: int) -> _Band:
    """Which cells of a window's prefix map along ``axis`` are shared, and the strips that give the others."""
    cells = grid.output_size(window)[axis]
    start, stop = grid.exact_cells(window, at_image_start=(False, False), at_image_end=(False, False))[axis]
    if stop <= start:
        start = stop = 0
    before = None if start == 0 else _strip(grid, window, axis, cells, need=start, at_start=True)
    after = None if stop == cells else _strip(grid, window, axis, cells, need=stop, at_start=False)
    return _Band(cells, (start, stop) if stop > start else (0, 0), before, after)


def _strip(grid: Geometry, window, axis: int, cells: int, *, need: int, at_start: bool) -> int:
    """The shortest strip along a window's start (end) edge whose exact cells cover ``[0, need)`` (``[need, cells)``).

    Strips keep the window's length modulo the prefix's stride, so each pads
    like the window: cell ``k`` of the end strip is the window's cell
    ``(window - length) / stride + k``. The whole window when no shorter strip does.
    """
    stride, length = grid.stride[axis], window[axis]
    low = grid.min_input_size[axis]
    first = low + (length - low) % stride
    for side in range(first, length, stride):
        size = _strip_size(window, axis, side)
        starts, ends = [True, True], [True, True]
        (ends if at_start else starts)[axis] = False
        try:
            begin, end = grid.exact_cells(size, at_image_start=tuple(starts), at_image_end=tuple(ends))[axis]
            own = grid.output_size(size)[axis]
        except ConversionError:
            continue
        if at_start and begin == 0 and end >= need:
            return side
        offset = (length - side) // stride
        if not at_start and offset + own == cells and end == own and offset + begin <= need:
            return side
    return length


def check_method(method) -> str:
    """``method`` when it is one of `options.MAP_METHODS`.

    Raises:
        InputError: otherwise.
    """
    if method not in MAP_METHODS:
        raise InputError(f"Expected `method` among {', '.join(map(repr, MAP_METHODS))}. Received: {method!r}")
    return method


def route(model, stride, method: str, *, head: str = "window", input_size=None):
    """``("fcn", fcn)`` or ``("windowed", None)``: how `predict_map` computes the map of ``model``.

    An FCN runs as itself, or à trous at another ``stride``
    (`surgery.atrous.at_stride`: at the finest exact stride below where
    ``stride`` does not divide its own, every few cells kept); a classifier as
    `choose_method` says. Anything else is returned as it is, for
    `predict_map`'s own checks to refuse.

    Raises:
        InputError: for ``method="windowed"`` or a multiple of its stride with
            an FCN (a windowed map of its classifier), or an unknown ``method``.
        ConversionError: an FCN with a layer that cannot be rarefied (named).
    """
    check_method(method)
    if not isinstance(model, keras.Model):
        return "fcn", model
    if not is_fully_convolutional(model):
        return choose_method(model, stride, method, head=head, input_size=input_size)
    if method == "windowed":
        raise InputError(
            f"Model '{model.name}' is already fully convolutional: its map has one cell per stride. A windowed map "
            "runs a classifier on every crop: pass the classifier itself."
        )
    if stride is not None:
        requested, own = runner.pair(stride, "stride"), tuple(geometry(model).stride)
        if requested != own and divides(own, requested):
            raise InputError(
                f"The FCN '{model.name}' has stride {own[0]}x{own[1]}; its map cannot be at stride "
                f"{requested[0]}x{requested[1]}. Pass the classifier with `stride=` for a windowed map at that stride."
            )
        if requested != own:
            # The same FCN à trous (at gcd(s, S), every (s / g)-th cell kept where s does not divide S): refused by
            # name where not exact.
            return "fcn", at_stride(model, requested)
    return "fcn", model


def choose_method(model, stride, method: str, *, head: str = "window", input_size=None):
    """``("fcn", fcn)`` or ``("windowed", None)``: how `predict_map` computes a classifier's map.

    ``"auto"``: the classifier's FCN (``as_fcn(model, head=head,
    input_size=input_size)``) where it converts, has no global context and
    ``stride`` is None or its stride; at a ``stride`` that divides the FCN's,
    the FCN à trous (`surgery.atrous.rarefy`) where it is exact; at one that
    neither divides nor is a multiple of it, the FCN à trous at the finest
    exact stride below, thinned (`surgery.atrous.at_stride`), where it is exact
    and costs fewer multiply-accumulates than the windowed map
    (`thinned_if_cheaper`); else windowed (a classifier that takes any input
    size has no window: its FCN then, as long as ``stride`` is None).
    ``"fcn"``: the FCN, at any ``stride`` (`surgery.atrous.at_stride`).

    Raises:
        ConversionError: ``"fcn"`` for a classifier that does not convert, or
            at another stride a layer cannot be rarefied (named).
    """
    check_method(method)
    if method == "windowed":
        return "windowed", None
    fcn, refusal = conversion(model, head, input_size)
    if refusal is not None:
        if method == "fcn":
            raise refusal
        return "windowed", None
    if method == "auto" and stride is None and len(fcn.outputs) > 1:
        return "fcn", fcn  # a windowed map takes one output; its FCN's maps of every output
    grid = geometry(fcn)
    requested = None if stride is None else runner.pair(stride, "stride")
    other = requested is not None and requested != tuple(grid.stride)
    finer = other and divides(requested, grid.stride)
    if method == "fcn":
        return "fcn", at_stride(fcn, requested) if other else fcn
    if finer and not grid.global_context:
        try:
            return "fcn", rarefy(fcn, requested)
        except ConversionError:
            return "windowed", None  # a layer à trous cannot make exact: the windowed map, as the plan says
    if other and not grid.global_context and not divides(grid.stride, requested):
        thinned = thinned_if_cheaper(model, fcn, requested)
        return ("windowed", None) if thinned is None else ("fcn", thinned)
    if other:
        return "windowed", None  # a multiple of the FCN's: the windowed map shares all it does, tails once per cell
    if grid.global_context and has_window(model):
        return "windowed", None
    return "fcn", fcn


def thinned_candidate(model, stride):
    """A classifier's FCN à trous at the finest exact stride below ``stride``, thinned to it
    (`surgery.atrous.at_stride`), where ``stride`` neither divides nor is a multiple of the FCN's and that is
    exact; else None."""
    fcn, _ = conversion(model)
    if fcn is None or stride is None:
        return None
    requested, grid = runner.pair(stride, "stride"), geometry(fcn)
    if grid.global_context or divides(requested, grid.stride) or divides(grid.stride, requested):
        return None
    try:
        return at_stride(fcn, requested)
    except ConversionError:
        return None  # a layer à trous cannot make exact there: the windowed map only


def thinned_if_cheaper(model, fcn, stride):
    """`at_stride` of ``fcn`` where it is exact and costs no more multiply-accumulates than ``model``'s windowed
    map at ``stride``, on an image of `_REFERENCE_WINDOWS` windows a side; else None.

    A map's cost grows with the image's area either way; this size counts both ways' borders as little as a
    large image does, and the plan (`inference.mapper`) prints both costs at the image's own size.
    """
    try:
        thinned = at_stride(fcn, stride)
    except ConversionError:
        return None
    try:
        found = analysis(model)
    except ConversionError:
        return thinned  # no window: the windowed map cannot run
    size = tuple(w * _REFERENCE_WINDOWS for w in found.window)
    macs = pass_cost(thinned, found.layout.batch_shape(1, size[0], size[1], found.channels)).macs
    windowed = windowed_macs(model, size, stride)
    return thinned if windowed is None or macs <= windowed else None


_REFERENCE_WINDOWS = 4


def windowed_macs(model, image_size, stride) -> int | None:
    """Multiply-accumulates of ``model``'s windowed map of an image of ``image_size`` at ``stride`` (its cheapest
    split), or None where it has none (no window, an image smaller than one, a stride it cannot take)."""
    try:
        return plan_windows(model, image_size, stride=stride).macs
    except (ConversionError, InputError):
        return None


def divides(stride, own) -> bool:
    """Whether a map at ``stride`` ``(s_h, s_w)`` is a finer grid of one at ``own``: each divides its own."""
    return all(s >= 1 and o % s == 0 for s, o in zip(stride, own))


def is_finer_stride(model, stride) -> bool:
    """Whether the classifier's FCN may compute its map at ``stride`` à trous: ``stride`` is not the FCN's, nor a
    multiple of it (`choose_method` decides between à trous and windowed)."""
    fcn, _ = conversion(model)
    if fcn is None or stride is None:
        return False
    requested, own = runner.pair(stride, "stride"), tuple(geometry(fcn).stride)
    return requested != own and not divides(own, requested)


def has_window(model) -> bool:
    """Whether ``model`` takes one fixed input size (a window), as a windowed map needs."""
    twin = traced_model(model)
    shape = tuple(twin.inputs[0].shape)
    layout = model_layout(twin)
    return len(shape) == 4 and all(d is not None for d in layout.spatial_shape(shape))


def conversion(model, head: str = "window", input_size=None):
    """``(fcn, None)`` for a classifier that converts (`as_fcn`), ``(None, error)`` for one that is refused.

    A refusal is remembered per model (and head and size) as `as_fcn`
    remembers a conversion: a transformer is not converted again on every call.
    """
    key = (head, None if input_size is None else tuple(int(d) for d in input_size))
    refusals = model_facts(model).refusals
    if key in refusals:
        return None, refusals[key]
    try:
        return as_fcn(model, head=head, input_size=input_size), None
    except ConversionError as error:
        refusals[key] = error
        return None, error


def check_stride(model, stride) -> tuple[int, int]:
    """The stride of a classifier's windowed map: ``stride`` as ``(s_h, s_w)``, or its default (`default_stride`).

    Raises:
        InputError: for a stride that is not a multiple of the stride of the
            deepest split (naming it), or none for a classifier without an FCN.
        ConversionError: for a model that is not a classifier with a window.
    """
    found = analysis(model)
    strides = runner.pair(stride, "stride") if stride is not None else default_stride(model)
    deepest = found.splits[-1]
    if any(s % p for s, p in zip(strides, deepest.stride)):
        raise InputError(
            f"A stride of {strides[0]}x{strides[1]} pixels is not a multiple of {deepest.stride[0]}x"
            f"{deepest.stride[1]}, the stride of the map '{found.model.name}' shares up to '{deepest.name}'. Use a "
            f"multiple of it (such as {deepest.stride[0] * max(1, strides[0] // deepest.stride[0])}), or "
            "`sliding_window_predict(model, image, stride)` to run the whole classifier on every crop."
        )
    return strides


def window_grid(model, stride=None) -> WindowGrid:
    """The grid of a classifier's windowed map at ``stride`` (checked as `check_stride` does)."""
    return WindowGrid(check_stride(model, stride), analysis(model).window)


def map_spec(model):
    """The `FcnSpec` of a classifier's windowed map: its layout, channels and one output's classes."""
    found = analysis(model)
    return FcnSpec(found.layout, found.channels, found.classes, map_outputs(found.model))


def shared_stride(model) -> tuple[int, int]:
    """The stride of the deepest map a classifier's windows can share: a windowed map's stride is a multiple of it."""
    return analysis(model).splits[-1].stride


def default_stride(model) -> tuple[int, int]:
    """The stride of a classifier's map when none is given: its FCN's.

    Raises:
        InputError: for a classifier that does not convert (a transformer).
    """
    fcn, error = conversion(model)
    if fcn is not None:
        return tuple(geometry(fcn).stride)  # type: ignore[return-value]
    found = analysis(model)
    deepest = found.splits[-1]
    if deepest.index < 0:
        shared = (
            f"any number of pixels: nothing is shared between its windows ({found.blocked_by}), so each window "
            "runs the whole classifier, as the sliding window does"
        )
    else:
        shared = (
            f"a multiple of {deepest.stride[0]}x{deepest.stride[1]} (the stride of its shared part, up to "
            f"'{deepest.name}')"
        )
    raise InputError(
        f"Model '{found.model.name}' has no FCN ({str(error).splitlines()[0]}), so its map needs a `stride=`: "
        f"pixels between windows, {shared}."
    ) from error


def plan_windows(
    model,
    image_size,
    *,
    stride=None,
    tile=None,
    staged: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    keep=None,
) -> WindowedPlan:
    """The plan of a classifier's exact windowed map: the split, the windows and the cost.

    Args:
        model: a classifier with a fixed input size (the window).
        image_size: ``(H, W)`` of the image.
        stride: pixels between windows, ``s`` or ``(s_h, s_w)``; a multiple
            of the stride of the deepest split. Default: the classifier's FCN's.
        tile: for the prefix's pass, as for `predict_map`.
        staged: for the prefix's pass, as for `predict_map`.
        memory_budget: for the prefix's pass, as for `predict_map`.
        batch_size: windows per call of the tail (default: about 1 million
            input pixels of windows).
        keep: None, or a boolean ``(H', W')`` array over the windows: only the
            kept windows are computed.

    Raises:
        InputError: for a stride that is not a multiple of the deepest
            split's, an image smaller than a window, or a ``keep`` of the
            wrong shape.
        ConversionError: for a model that is not such a classifier.
    """
    found = analysis(model)
    size = tuple(int(d) for d in image_size)
    strides = check_stride(model, stride)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    counts = []
    for name, length, side, step in zip(("height", "width"), size, found.window, strides):
        if length < side:
            raise InputError(
                f"Image {name} {length} is smaller than the window of {found.window[0]}x{found.window[1]} pixels "
                f"of '{found.model.name}'. Use a larger image (or pad it)."
            )
        counts.append((length - side) // step + 1)
    map_size = (counts[0], counts[1])
    mask = None
    if keep is not None:
        mask = np.asarray(keep)
        if mask.shape != map_size:
            raise InputError(
                f"`keep` has shape {mask.shape}, but the windowed map of this image has {map_size[0]}x{map_size[1]} "
                "cells. Give one boolean per window."
            )
        mask = mask.astype(bool, copy=False)
    windows = int(np.count_nonzero(mask)) if mask is not None else counts[0] * counts[1]
    region = tuple((n - 1) * s + w for n, s, w in zip(counts, strides, found.window))
    best, best_cost = found.splits[0], None
    for split in found.splits:
        if any(s % p for s, p in zip(strides, split.stride)):
            continue
        shared = 0.0
        if split.prefix is not None:
            needed = _needed_cells(split, map_size, strides, found.window, mask)
            shared = _region_macs(split, region, found) * (1.0 if needed is None else float(np.mean(needed)))
        cost = shared + windows * (split.strip_macs + split.tail_macs)
        if best_cost is None or cost <= best_cost:  # a tie goes to the deeper split (its elementwise layers)
            best, best_cost = split, cost
    per_batch = batch_size or max(1, runner.PIXELS_PER_BATCH // (found.window[0] * found.window[1]))
    per_batch = max(1, min(per_batch, windows))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    rows_per_band, band_bytes = _band_rows(best, found, map_size, strides, region, budget)
    bands, prefix_plan, prefix_macs = [], None, 0
    for first in range(0, map_size[0], rows_per_band):
        stop = min(first + rows_per_band, map_size[0])
        part = None if mask is None else mask[first:stop]
        if part is not None and not part.any():
            continue  # no kept window: nothing of the band runs
        needed = None
        if best.prefix is not None:
            needed = _needed_cells(best, (stop - first, map_size[1]), strides, found.window, part)
            band_plan = plan_fcn(
                best.prefix,
                _band_size(first, stop, strides, found.window, region),
                tile=tile,
                staged=staged,
                memory_budget=memory_budget,
                keep=needed,
            )
            prefix_plan = prefix_plan or band_plan
            prefix_macs += band_plan.macs
        bands.append((first, stop, needed))
    return WindowedPlan(
        image_size=size,  # type: ignore[arg-type]
        map_size=map_size,
        window=found.window,
        stride=strides,
        split=best.name,
        prefix_stride=best.stride,
        deepest_split=found.splits[-1].name,
        blocked_by=found.blocked_by,
        region=region,  # type: ignore[arg-type]
        prefix_plan=prefix_plan,
        windows=windows,
        batch_size=per_batch,
        strips=tuple(_strip_names(best)),
        prefix_macs=prefix_macs,
        strip_macs=windows * best.strip_macs,
        tail_macs=windows * best.tail_macs,
        sliding_macs=windows * found.window_macs,
        fcn_macs=_fcn_macs(model, found, size),
        kept_fraction=windows / (counts[0] * counts[1]),
        bands=len(bands),
        band_rows=rows_per_band,
        band_bytes=band_bytes,
        band_store="disk" if band_bytes > budget else "memory",
        _bands=tuple(bands),
        _split=best,
        _analysis=found,
    )


def _strip_names(split: _Split) -> list[str]:
    names = {(0, "before"): "top", (0, "after"): "bottom", (1, "before"): "left", (1, "after"): "right"}
    return [f"{names[(axis, side)]} {length}" for axis, side, length in split.strips()]


def _region_macs(split: _Split, region, found: _Analysis) -> int:
    return pass_cost(split.prefix, found.layout.batch_shape(1, region[0], region[1], found.channels)).macs


# Bands overlap by a window less one stride, computed again: at least this many strides per window overlap keep
# that within a quarter of the prefix's work.
_OVERLAP_SHARE = 4


def _band_size(first: int, stop: int, strides, window, region) -> tuple[int, int]:
    """The pixels ``(rows, cols)`` of the band of window rows ``[first, stop)``."""
    return ((stop - first - 1) * strides[0] + window[0], region[1])


def _band_bytes(split: _Split, found: _Analysis, rows: int, strides, region) -> int:
    if split.prefix is None:
        return 0
    cells = split.grid.output_size(_band_size(0, rows, strides, found.window, region))  # type: ignore[union-attr]
    return cells[0] * cells[1] * split.channels * 4


def _band_rows(split: _Split, found: _Analysis, map_size, strides, region, budget: int) -> tuple[int, int]:
    """Window rows per band and the bytes of a band's shared map.

    As many rows as keep the band's map within ``budget``, and at least as
    many as keep the overlap's recomputation within a quarter of the
    prefix's work (each band recomputes ``window - stride`` pixel rows).
    """
    total = map_size[0]
    if split.prefix is None or _band_bytes(split, found, total, strides, region) <= budget:
        return total, _band_bytes(split, found, total, strides, region)
    low, high = 1, total  # the most rows within the budget (at least one)
    while low < high:
        middle = (low + high + 1) // 2
        if _band_bytes(split, found, middle, strides, region) <= budget:
            low = middle
        else:
            high = middle - 1
    overlap = -(-_OVERLAP_SHARE * max(0, found.window[0] - strides[0]) // strides[0])
    rows = min(total, max(low, overlap, 1))
    return rows, _band_bytes(split, found, rows, strides, region)


def _fcn_macs(model, found: _Analysis, size) -> int | None:
    fcn = conversion(model)[0]
    if fcn is None:
        return None
    return pass_cost(fcn, found.layout.batch_shape(1, size[0], size[1], found.channels)).macs


def _needed_cells(split: _Split, map_size, strides, window, mask) -> np.ndarray | None:
    """The cells of the prefix's map the kept windows read from it (None: all windows are kept)."""
    if mask is None:
        return None
    axes = []
    for count, step, band, stride in zip(map_size, strides, split.bands, split.stride):
        first = [i * step // stride for i in range(count)]
        axes.append([tiling.AxisTile(f + band.exact[0], f + band.exact[1], 0, 0, 0) for f in first])
    size = split.grid.output_size(  # type: ignore[union-attr]
        tuple((n - 1) * s + w for n, s, w in zip(map_size, strides, window))
    )
    return tiling.pixels_read(size, axes[0], axes[1], mask)


def run_windowed(plan: WindowedPlan, image, *, out=None, keep=None, prefix_pass, options: MapOptions, progress=None):
    """Run a windowed ``plan`` on ``image`` into ``out`` (allocated when None); a `Mapper` calls it.

    ``prefix_pass(prefix, region, shared, needed)`` computes the shared
    prefix's map of one band's ``region`` of pixels into ``shared``, only the
    ``needed`` cells (None: all): the mapper runs it as an FCN's map.
    ``options``: the mapper's `MapOptions`, of which the windows use
    ``inputs.preprocess``, ``execution.engine`` and ``tiling.spill_dir``.
    """
    found: _Analysis = plan._analysis  # type: ignore[assignment]
    spec = ImageSpec(found.layout, found.channels)
    image = runner.with_channel_axis(image, spec)
    shape = found.layout.image_shape(plan.map_size[0], plan.map_size[1], found.classes)
    out = runner.output_arrays(out, {"scores": shape}, found.model)[0]
    split: _Split = plan._split  # type: ignore[assignment]
    mask = None if keep is None else np.asarray(keep, dtype=bool)
    if mask is not None:
        runner.fill_nan(out, found.layout)
    pixels = file_backed(image)
    scratch = Scratch("kfs-windowed-", options.tiling.spill_dir)
    try:
        with scratch:
            for first, stop, needed in plan._bands:  # bands of window rows: the shared map of one at a time
                shared = None
                if split.prefix is not None:
                    size = _band_size(first, stop, plan.stride, plan.window, plan.region)
                    cells = split.grid.output_size(size)  # type: ignore[union-attr]
                    shape = found.layout.image_shape(cells[0], cells[1], split.channels)
                    shared = scratch.array("prefix", shape, "float32", on_disk=plan.band_store == "disk")
                    region = _Region(pixels, found.layout, size, top=first * plan.stride[0])
                    prefix_pass(split.prefix, region, shared, needed)
                rows = (first, stop)
                _run_windows(plan, pixels, shared, out, mask, options, progress, rows)
        return out
    except OSError as error:
        raise ConversionError(
            f"Could not write or read the shared map in {scratch.where()}: {error}. Free disk space, pass "
            "`spill_dir=` on a larger disk, or raise `memory_budget=` to keep it in memory."
        ) from error
    finally:
        if isinstance(pixels, DiskMap):
            pixels.close()


class _Region:
    """``size`` pixels of an image from row ``top``, column 0, sliced lazily (the part a band of windows covers)."""

    def __init__(self, image, layout: Layout, size, top: int = 0):
        self._image = image
        self._top = int(top)
        shape = list(image.shape)
        self._rows, cols = layout.image_spatial_axes
        shape[self._rows], shape[cols] = size
        self.shape = tuple(shape)

    def __getitem__(self, index):
        index = list(index if isinstance(index, tuple) else (index,))
        index += [slice(None)] * (len(self.shape) - len(index))
        start, stop, step = index[self._rows].indices(self.shape[self._rows])
        index[self._rows] = slice(start + self._top, stop + self._top, step)
        return self._image[tuple(index)]


def _run_windows(plan: WindowedPlan, pixels, shared, out, mask, options: MapOptions, progress, band) -> None:
    """The windows of rows ``band`` (``[first, stop)``), their prefix maps from ``shared``, the band's map."""
    found: _Analysis = plan._analysis  # type: ignore[assignment]
    split: _Split = plan._split  # type: ignore[assignment]
    spec = ImageSpec(found.layout, found.channels)
    preprocess, engine = options.inputs.preprocess, options.execution.engine
    layout = found.layout
    first, stop = band
    if mask is not None:
        rows, cols = np.nonzero(mask[first:stop])
    else:
        rows, cols = np.indices((stop - first, plan.map_size[1])).reshape(2, -1)
    positions = list(zip((rows + first).tolist(), cols.tolist()))
    dtype = runner.input_dtype(found.model)
    chosen = engine if engine in ("xla", "jax") else engines.native()  # the backend's own, or as asked
    batch = plan.batch_size
    _verify_split(found, split)

    def load(group):
        if split.prefix is None:
            return np.stack([_crop(pixels, spec, plan, cell, preprocess, dtype) for cell in group])
        return _window_maps(plan, pixels, shared, group, preprocess, dtype, first)

    def forward(inputs):
        return engines.forward(found.tail(split, len(inputs)), chosen)(inputs)

    with runner.progress_bar(len(positions), progress, "windows") as bar:

        def write(group, scores):
            for (i, j), vector in zip(group, np.asarray(scores)):
                out[layout.image_index(slice(i, i + 1), slice(j, j + 1))] = _cell(vector, layout)
            bar.update(len(group))

        groups = [positions[start : start + batch] for start in range(0, len(positions), batch)]
        # Windows read from pixels alone are prefetched; a prefix's strips run a model, so they load in turn.
        runner.run_batches(forward, groups, load, write, prefetch=split.prefix is None)


def _cell(vector, layout: Layout) -> np.ndarray:
    return layout.image_from_channels_last(np.asarray(vector, dtype=np.float32).reshape(1, 1, -1))


def _crop(pixels, spec, plan: WindowedPlan, cell, preprocess, dtype, rows=None, cols=None) -> np.ndarray:
    """The pixels of cell ``(i, j)``'s window (of its ``rows`` and ``cols`` spans only, where given)."""
    top, left = cell[0] * plan.stride[0], cell[1] * plan.stride[1]
    first_row, last_row = rows if rows is not None else (0, plan.window[0])
    first_col, last_col = cols if cols is not None else (0, plan.window[1])
    return runner.read_tile(
        pixels,
        spec,
        tiling.AxisTile(top + first_row, top + last_row, 0, 0, 0),
        tiling.AxisTile(left + first_col, left + last_col, 0, 0, 0),
        preprocess,
        dtype,
    )


def _window_maps(plan: WindowedPlan, pixels, shared, group, preprocess, dtype, first: int):
    """The prefix's map of each window in ``group``: shared cells from ``shared`` (the map of the band from
    window row ``first``), the rest from strips."""
    found: _Analysis = plan._analysis  # type: ignore[assignment]
    split: _Split = plan._split  # type: ignore[assignment]
    spec = ImageSpec(found.layout, found.channels)
    layout = found.layout
    cells = split.cells
    maps = np.empty((len(group), *layout.image_shape(cells[0], cells[1], split.channels)), dtype=np.float32)
    for k, (i, j) in enumerate(group):
        top, left = (i - first) * plan.stride[0] // split.stride[0], j * plan.stride[1] // split.stride[1]
        maps[k] = shared[layout.image_index(slice(top, top + cells[0]), slice(left, left + cells[1]))]

    def span_of(strip):
        axis, side, length = strip
        return (0, length) if side == "before" else (plan.window[axis] - length, plan.window[axis])

    def load(strip):
        span = span_of(strip)
        rows, cols = (span, None) if strip[0] == 0 else (None, span)
        return np.stack([_crop(pixels, spec, plan, cell, preprocess, dtype, rows, cols) for cell in group])

    def write(strip, result):
        axis, side, _ = strip
        band = split.bands[axis]
        computed = np.asarray(result, dtype=np.float32)
        offset = span_of(strip)[0] // split.stride[axis]
        wanted = (0, band.exact[0]) if side == "before" else (band.exact[1], band.cells)
        target = [slice(None), slice(None)]
        source = [slice(None), slice(None)]
        target[axis] = slice(*wanted)
        source[axis] = slice(wanted[0] - offset, wanted[1] - offset)
        maps[(slice(None), *layout.image_index(*target))] = computed[(slice(None), *layout.image_index(*source))]

    runner.run_batches(engines.forward(split.prefix, engines.native()), split.strips(), load, write)
    return maps


def _verify_split(found: _Analysis, split: _Split) -> None:
    """Check once that the prefix's FCN and the tail compose to the classifier (two random windows)."""
    if split.index in found.verified:
        return
    batch = np.random.default_rng(0).standard_normal((2, *tuple(found.model.inputs[0].shape)[1:])).astype("float32")
    try:
        expected = np.asarray(keras.ops.convert_to_numpy(found.model(batch, training=False)))
    except Exception as error:  # noqa: BLE001 - the user's classifier fails on its own input size
        inner = sublayers(found.model)
        culprits = [describe(layer) for layer in inner if isinstance(layer, NOT_IDENTITY_AUGMENTATIONS)]
        cause = f"; layer {culprits[0]} is not the identity at inference: remove it" if culprits else ""
        raise ConversionError(
            f"Model '{found.model.name}' fails at inference on images of its own input size "
            f"{found.window[0]}x{found.window[1]} ({first_line(str(error))}), so it has no map{cause}."
        ) from error
    middle = batch if split.prefix is None else keras.ops.convert_to_numpy(split.prefix(batch, training=False))
    got = np.asarray(keras.ops.convert_to_numpy(found.tail(split, 2)(middle)))
    result = compare_arrays([(expected, got)], tolerance=tolerance_for(found.model), input_shape=batch.shape)
    if not result.passed:
        raise VerificationError(
            f"Split after '{split.name}' of model '{found.model.name}' does not reproduce it ({result}). Please "
            "report the model; `sliding_window_predict` runs it on every crop meanwhile."
        )
    found.verified.add(split.index)
