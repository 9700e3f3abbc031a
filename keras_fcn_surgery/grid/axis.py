"""Integer geometry of one spatial axis through windowed layers (pure functions).

The state of an axis at some tensor: its ``size``, and how its cells map to
input pixels: cell ``i`` sees input pixels ``[offset + i * stride,
offset + i * stride + receptive_field)``. ``offset`` is negative where padding
reaches outside the image.

For tiled inference a state also carries ``[exact_start, exact_stop)``: the
cells of a tile's map that equal the whole image's map. A bound is infinite
where the tile's edge is the image's edge (the padding there is the image's own
padding); a finite bound starts at the tile's edge and moves inwards at every
layer whose window reaches across it. This assumes the tile pads like the whole
image: its origin on a multiple of the total stride and its length congruent
to the image's length modulo that stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AxisState:
    size: int
    stride: int = 1
    offset: int = 0
    receptive_field: int = 1
    # A broadcast vector (a global pooling's output): it has no grid of its own.
    is_global: bool = False
    # Some value on the way depends on the whole input along this axis.
    global_context: bool = False
    # Cells equal to the whole-image pass (tiled inference; see the module docstring).
    exact_start: float = -math.inf
    exact_stop: float = math.inf
    # Layers on the way whose receptive field and offset could not be derived (their descriptions).
    unknown: tuple[str, ...] = ()


def input_state(size: int, exact_start: float = -math.inf, exact_stop: float = math.inf) -> AxisState:
    """State of the input itself; ``exact_*`` finite at a tile's edges inside the image (0 and ``size``)."""
    return AxisState(size=size, exact_start=exact_start, exact_stop=exact_stop)


def same_padding_before(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Padding TensorFlow puts before the first element for ``padding="same"``."""
    effective = dilation * (kernel - 1) + 1
    output = math.ceil(size / stride)
    total = max((output - 1) * stride + effective - size, 0)
    return total // 2


def window_output_size(size: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    """Output length of a convolution or pooling window along one axis (0 when empty)."""
    effective = dilation * (kernel - 1) + 1
    if padding == "same":
        return math.ceil(size / stride)
    return (size - effective) // stride + 1 if size >= effective else 0


def apply_window(state: AxisState, kernel: int, stride: int, dilation: int, padding: str) -> AxisState:
    """State after a convolution or pooling with this kernel, stride, dilation and padding."""
    if padding not in ("same", "valid"):
        raise ValueError(f"Expected padding 'same' or 'valid'. Received: padding={padding!r}")
    effective = dilation * (kernel - 1) + 1
    before = same_padding_before(state.size, kernel, stride, dilation) if padding == "same" else 0
    size = window_output_size(state.size, kernel, stride, dilation, padding) if state.size >= 1 else 0
    # Cell j reads input cells [j * stride - before, j * stride - before + effective).
    start, stop = state.exact_start, state.exact_stop
    if math.isfinite(start):
        start = max(0, -((-(start + before)) // stride))
    if math.isfinite(stop):
        stop = min(size, (stop - effective + before) // stride + 1)
    return replace(
        state,
        size=size,
        stride=state.stride * stride,
        offset=state.offset - before * state.stride,
        receptive_field=state.receptive_field + (effective - 1) * state.stride,
        exact_start=start,
        exact_stop=stop,
    )


def apply_padding(state: AxisState, before: int, after: int) -> AxisState:
    """State after explicit zero padding (negative values crop).

    An empty axis (size 0) stays empty: Keras cannot pad or crop it, and a crop
    of the whole axis or more leaves it empty.
    """
    size = max(state.size + before + after, 0) if state.size >= 1 else 0
    start, stop = state.exact_start, state.exact_stop
    if math.isfinite(start):
        start = max(0, start + before)
    if math.isfinite(stop):
        stop = min(size, stop + before)
    return replace(state, size=size, offset=state.offset - before * state.stride, exact_start=start, exact_stop=stop)


def apply_global(state: AxisState) -> AxisState:
    """State after a global pooling: one cell that sees everything (exact only if the whole axis is)."""
    whole = math.isinf(state.exact_start) and math.isinf(state.exact_stop)
    return replace(
        state,
        size=1 if state.size >= 1 else 0,
        offset=0,
        receptive_field=state.size,
        is_global=True,
        global_context=True,
        exact_start=state.exact_start if whole else 0,
        exact_stop=state.exact_stop if whole else 0,
    )


def merge(states: list[AxisState]) -> AxisState:
    """State of an element-wise merge or concatenation of maps.

    Global inputs (broadcast vectors) do not change the grid; the boxes of the
    map inputs are united.
    """
    maps = [s for s in states if not s.is_global] or states
    unknown = _union(s.unknown for s in states)
    if any(s.size < 1 for s in states):
        return AxisState(
            size=0, stride=maps[0].stride, global_context=any(s.global_context for s in states), unknown=unknown
        )
    sizes = {s.size for s in maps}
    strides = {s.stride for s in maps}
    if len(sizes) > 1 or len(strides) > 1:
        raise ValueError(f"Merged maps do not line up: sizes {sorted(sizes)}, strides {sorted(strides)}")
    start = min(s.offset for s in maps)
    end = max(s.offset + s.receptive_field for s in maps)
    return AxisState(
        size=maps[0].size,
        stride=maps[0].stride,
        offset=start,
        receptive_field=end - start,
        is_global=all(s.is_global for s in states),
        global_context=any(s.global_context for s in states),
        exact_start=max(s.exact_start for s in states),
        exact_stop=min(s.exact_stop for s in states),
        unknown=unknown,
    )


def apply_slice(state: AxisState, start: int, step: int, size: int) -> AxisState:
    """State after keeping every ``step``-th cell from cell ``start`` on, ``size`` cells (strided slicing)."""
    if step < 1:
        raise ValueError(f"Expected a positive slice step. Received: step={step}")
    first, last = state.exact_start, state.exact_stop
    if math.isfinite(first):
        first = max(0, -((-(first - start)) // step))
    if math.isfinite(last):
        last = min(size, max(0, (last - 1 - start) // step + 1))
    return replace(
        state,
        size=size,
        stride=state.stride * step,
        offset=state.offset + start * state.stride,
        exact_start=first,
        exact_stop=last,
    )


def apply_unknown(state: AxisState, size: int, step: int, why: str) -> AxisState:
    """State after a layer whose output length is known (``size``) but whose window is not.

    ``step`` is the layer's own stride where its output lengths show one (1
    otherwise); the receptive field and offset stay as they were and are
    marked unknown by ``why``, and no cell counts as equal to the whole image's.
    """
    return replace(
        state,
        size=size,
        stride=state.stride * max(step, 1),
        exact_start=0,
        exact_stop=0,
        unknown=_union([state.unknown, (why,)]),
    )


def _union(groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for item in group:
            seen.setdefault(item, None)
    return tuple(seen)
