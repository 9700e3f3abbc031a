"""Choosing where to cut a network into stages for staged tiling (pure functions).

A network cut at tensors ``c_1 .. c_{n-1}`` (boundaries ``0 .. n``, 0 the
input and ``n`` the output) runs as stages ``(b_0, b_1), (b_1, b_2) ...``:
each stage is tiled on the stored map of the one before, so its tiles overlap
by that stage's own receptive field only. Which boundaries to use is a
shortest path over the boundaries, the cost of a stage given by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from keras_fcn_surgery.errors import loop_bound_exceeded


def cheapest_chain(count: int, cost: Callable[[int, int], float | None]) -> tuple[list[int], float]:
    """The cheapest increasing chain of boundaries from 0 to ``count``.

    Args:
        count: the last boundary (the network's output); boundaries are
            ``0 .. count``.
        cost: ``cost(i, j)`` for ``i < j``, the cost of one stage from boundary
            ``i`` to ``j``, or None when that stage is impossible.

    Returns:
        ``(boundaries, total)``: ``[0, ..., count]`` and its summed cost;
        ``([], inf)`` when no chain exists.
    """
    best = [math.inf] * (count + 1)
    previous = [-1] * (count + 1)
    best[0] = 0.0
    for j in range(1, count + 1):
        for i in range(j):
            if math.isinf(best[i]):
                continue
            step = cost(i, j)
            if step is not None and best[i] + step < best[j]:
                best[j], previous[j] = best[i] + step, i
    if math.isinf(best[count]):
        return [], math.inf
    return _chain_back(previous, count), best[count]


def _chain_back(previous: Sequence[int], count: int) -> list[int]:
    """The chain ending at ``count`` read back through ``previous`` (each boundary's predecessor), 0 first.

    Predecessors decrease, so a chain has at most ``count + 1`` boundaries; more is a bug.
    """
    chain = [count]
    while chain[-1] != 0:
        if len(chain) > count:
            raise loop_bound_exceeded("cheapest_chain", count + 1, count=count, previous=list(previous))
        chain.append(previous[chain[-1]])
    return chain[::-1]


def scaled_tile(base: Sequence[int], factor: float, limit: Sequence[int]) -> tuple[int, ...]:
    """``base`` scaled by ``factor`` (rounded down, at least 1), each side at most ``limit``'s."""
    return tuple(max(1, min(int(b * factor), n)) for b, n in zip(base, limit))


def memory_scale(base_elements: int, budget_elements: int) -> float:
    """How far the sides of a tile may grow (or must shrink) for its activations to fit a budget.

    Activations grow with the tile's area, so with the square root of the
    budget's ratio to the tile's own.
    """
    if base_elements < 1:
        return 1.0
    return math.sqrt(budget_elements / base_elements)


def place_stores(sizes: Sequence[int], budget: int) -> list[bool]:
    """Which stored stage outputs stay in memory (True) rather than spill to disk.

    While a stage runs, its input map and its output map are both held; the
    ones kept in memory must fit ``budget`` bytes together.

    Args:
        sizes: bytes of each stored map, stage by stage (the last stage
            writes to the caller's output and is not listed).
        budget: bytes of memory for stored maps.
    """
    in_memory: list[bool] = []
    for index, size in enumerate(sizes):
        held = sizes[index - 1] if index and in_memory[index - 1] else 0
        in_memory.append(held + size <= budget)
    return in_memory
