"""Shift-and-stitch of an FCN's tail: its exact map at a stride s that divides its stride S, another way than à trous.

Long, Shelhamer and Darrell (FCN, section 3.2): the head (the layers up to
the deepest cut whose map is at stride s) runs once over the image; the tail
(the layers after it, strides kept) runs on each of the ``(S_h / s_h)
(S_w / s_w)`` shifts of the head's map by whole cells, and the tails' maps are
interleaved: cell ``i r + a`` of the map at s is cell ``i`` of the tail on the
head's map shifted by ``a`` cells. For a tail of `valid` windows this is the
map `surgery.atrous.rarefy` computes, cell for cell (the tests compare them);
it costs more multiply-accumulates (the tail's layers before its first stride
run once per shift) but runs the network's own undilated windows.

It runs as an execution of the rarefied FCN (`inference.engines`: engine
``"stitch"``): where `rarefy` made the FCN, ``engine="auto"`` times it against
the à trous pass on this machine and keeps the faster, ``engine="stitch"``
forces it; the map, its tiles and its geometry stay the rarefied FCN's.
`stitch_map` computes one image's map; `stitch_cost` counts its
multiply-accumulates (more than à trous': the plan prints both).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.cost import pass_cost
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import describe, flat_trace, graph_part, is_layer, model_facts, model_layout, nodes_between
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.surgery.atrous import execution_refusal, origin_of, rarefy


@dataclass(frozen=True)
class StitchPlan:
    """An FCN cut for shift-and-stitch at ``stride``: ``head`` (to the cut, at ``stride``) and ``tail`` (after it).

    Attributes:
        stride: the map's ``(s_h, s_w)``.
        shifts: ``(S_h / s_h, S_w / s_w)``: the tail runs ``shifts[0] * shifts[1]`` times.
        cut: the name of the layer or operation the head ends at.
        head: the model from the image to the cut's map (at ``stride``).
        tail: the model from the cut's map to the FCN's outputs (the strides kept).
        layout: the FCN's `Layout`.
    """

    stride: tuple[int, int]
    shifts: tuple[int, int]
    cut: str
    head: keras.Model
    tail: keras.Model
    layout: Layout


def stitch_plan(fcn, stride) -> StitchPlan:
    """The `StitchPlan` of ``fcn`` at ``stride`` (``s`` or ``(s_h, s_w)``, dividing its stride), made once.

    Raises:
        InputError: for a stride that is the FCN's or does not divide it.
        ConversionError: for an FCN à trous cannot make exact at ``stride``
            (the same layers refused, by name), one of several outputs, no cut
            at ``stride``, or a `same` window in the tail (its padding would
            follow each shifted map's border, not the image's).
    """
    target = (int(stride), int(stride)) if not isinstance(stride, (tuple, list)) else (int(stride[0]), int(stride[1]))
    own = tuple(geometry(fcn).stride)
    if target == own or any(s < 1 or S % s for s, S in zip(target, own)):
        raise InputError(
            f"Shift-and-stitch computes maps at a stride that divides {own[0]}x{own[1]}, the stride of "
            f"'{fcn.name}', and is finer. Received: {target[0]}x{target[1]}"
        )
    made = model_facts(fcn).stitch_plans
    if target not in made:
        try:
            made[target] = _plan(fcn, target, own)
        except ConversionError as error:
            made[target] = error  # a refusal is found once: plans and engine choices ask again
    if isinstance(made[target], ConversionError):
        raise ConversionError(str(made[target]))
    return made[target]


def _plan(fcn, target, own) -> StitchPlan:
    rarefy(fcn, target)  # refuses by name what no map at this stride computes exactly
    if len(fcn.outputs) != 1:
        raise ConversionError(f"Shift-and-stitch takes an FCN of one output; '{fcn.name}' has {len(fcn.outputs)}.")
    trace = flat_trace(fcn, 1)
    found = None
    for index in trace.cut_indices():
        tensor = trace.output_of(index)
        if index < 0 or len(tensor.shape) != 4:
            continue
        head = keras.Model(trace.input, tensor, name=f"{fcn.name}_head")
        reached = tuple(geometry(head).stride)
        if reached == target:
            found = (index, head)
        elif any(r > t or t % r for r, t in zip(reached, target)):
            break
    if found is None:
        raise ConversionError(
            f"'{fcn.name}' has no layer whose map is at stride {target[0]}x{target[1]} with nothing else read "
            "after it: its tail cannot be shifted and stitched there. Use its map à trous (`rarefy`)."
        )
    index, head = found
    start = trace.output_of(index)
    nodes = nodes_between([start], trace.outputs)
    for node in nodes:
        layer = node.operation
        window = getattr(layer, "pool_size", getattr(layer, "kernel_size", None))
        if is_layer(layer) and getattr(layer, "padding", "valid") == "same" and window and max(window) > 1:
            raise ConversionError(
                f"Cannot shift and stitch the tail of '{fcn.name}' at {describe(layer)}: its `same` padding would "
                "pad each shifted map's border, not the image's. Use its map à trous (`rarefy`)."
            )
        if is_layer(layer) and isinstance(layer, taxonomy.GLOBAL_POOLINGS):
            raise ConversionError(f"Cannot shift and stitch the tail of '{fcn.name}': {describe(layer)} pools the map.")
    try:
        tail = keras.Model(start, trace.outputs[0], name=f"{fcn.name}_tail")  # a functional model: costs count it
    except ValueError:
        tail = graph_part(nodes, start, trace.outputs, name=f"{fcn.name}_tail")
    shifts = (own[0] // target[0], own[1] // target[1])
    return StitchPlan(target, shifts, trace.operation_name(index), head, tail, model_layout(fcn))


def stitch_map(fcn, image, stride) -> np.ndarray:
    """The map of ``fcn`` at ``stride`` on one ``image`` (the model's layout, preprocessed), by shift-and-stitch.

    Returns:
        The map in the model's layout without the batch axis: the shape and
        cells of ``rarefy(fcn, stride)``'s map of ``image``.

    Raises:
        InputError, ConversionError: as `stitch_plan`, or for an image too small.
    """
    plan = stitch_plan(fcn, stride)
    run = stitched(plan, geometry(rarefy(fcn, plan.stride)), lambda part: lambda x: part(x, training=False))
    return run(np.asarray(image, dtype=np.float32)[None])[0]


def stitch_refusal(model) -> str | None:
    """None where ``model`` is an FCN `rarefy` made (at a stride dividing its FCN's) whose tail shift-and-stitch
    computes; else why not."""
    return execution_refusal(model, stitch_plan)


def stitched_forward(model, run):
    """``numpy batch -> numpy map`` of ``model`` (see `stitch_refusal`) by shift-and-stitch of its FCN's tail;
    ``run(part)`` is the forward function of the head or the tail (an execution of `inference.engines`)."""
    fcn, stride = origin_of(model)  # type: ignore[misc]
    return stitched(stitch_plan(fcn, stride), geometry(model), run)


def stitched(plan: StitchPlan, grid, run):
    """The batch function of ``plan``: the head once, the tail on every shift of its map, interleaved into the
    map of ``grid`` (the rarefied FCN's geometry)."""
    head, tail = run(plan.head), run(plan.tail)
    layout, steps = plan.layout, plan.shifts
    axes = layout.spatial_axes
    shifts = [(a, b) for a in range(steps[0]) for b in range(steps[1])]

    def at(first, step=(None, None), stop=(None, None)):
        key = [slice(None)] * 4
        for axis, start, every, end in zip(axes, first, step, stop):
            key[axis] = slice(start, end, every)
        return tuple(key)

    def forward(batch):
        batch = np.asarray(batch)
        size = grid.output_size(layout.spatial_shape(batch.shape))
        maps = np.asarray(head(batch))
        parts = [np.asarray(tail(maps[at((a, b))])) for a, b in shifts]
        shape = list(parts[0].shape)
        shape[axes[0]], shape[axes[1]] = size
        out = np.zeros(shape, dtype=parts[0].dtype)
        for (a, b), part in zip(shifts, parts):
            cells = (len(range(a, size[0], steps[0])), len(range(b, size[1], steps[1])))
            out[at((a, b), steps)] = part[at((0, 0), stop=cells)]
        return out

    return forward


def stitch_cost(fcn, stride, image_size) -> int:
    """Multiply-accumulates of `stitch_map` on an image of ``image_size``: the head once, the tail per shift."""
    plan = stitch_plan(fcn, stride)
    channels = int(plan.layout.channels(tuple(fcn.inputs[0].shape)))
    shape = plan.layout.batch_shape(1, int(image_size[0]), int(image_size[1]), channels)
    head = pass_cost(plan.head, shape)
    tail = 0
    spatial = plan.layout.spatial_shape(head.output_shape)
    for a in range(plan.shifts[0]):
        for b in range(plan.shifts[1]):
            shifted = plan.layout.batch_shape(
                1, spatial[0] - a, spatial[1] - b, plan.layout.channels(head.output_shape)
            )
            tail += pass_cost(plan.tail, shifted).macs
    return head.macs + tail
