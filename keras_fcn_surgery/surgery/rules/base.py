"""What a head rule sees and returns.

The engine walks the source graph once to plan. Every tensor carries a *mode*
that says what the converted graph holds in its place:

- `Spatial`: the same tensor as in the source (a feature map, or anything
  before the head).
- `FlattenedMap`: the source holds a Flatten's output ``(N, H*W*C)``; the
  converted graph keeps the 4-D map the Flatten read.
- `VectorMap`: the source holds one feature vector per image ``(N, C)`` (or a
  ``1 x 1`` map of it when ``unit_map``); the converted graph holds a map of such
  vectors, one per window, in the model's spatial layout.

A rule declares the layer classes (`Rule.layers`) and input modes
(`Rule.modes`) it takes; the engine offers it only such calls. It looks at one
call of one layer (`NodeView`) and, if it knows how to convert it, returns a
`Step`: the modes of the outputs, an optional typed `Rewrite` for the plan,
and a function that builds the replacement on the new tensors. The common
steps (`copy_layer`, `pass_through`, `remove`) are made by the helpers here,
never written out in a rule.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import keras
from keras import tree

from keras_fcn_surgery.layout import Layout


@dataclass(frozen=True)
class Spatial:
    """The converted graph holds the source tensor itself, at any size."""


@dataclass(frozen=True)
class FlattenedMap:
    """A Flatten's output in the source; the 4-D map it read in the converted graph."""

    height: int
    width: int
    channels: int
    axis_order: tuple[str, ...]
    flatten_name: str
    # A BatchNormalization on the flattened features, waiting to be folded into
    # the Dense that reads them: per feature, x -> x * scale + shift.
    affine: tuple[Any, Any] | None = field(default=None, compare=False)
    affine_from: str = ""


@dataclass(frozen=True)
class VectorMap:
    """Per-image vectors in the source; a map of per-window vectors in the converted graph."""

    origin: str
    unit_map: bool = False


@dataclass(frozen=True)
class PermutedMap:
    """A Permute's output that only Flatten layers read: the converted graph keeps the map unpermuted, and
    the Dense after the Flatten reads its features in the permuted order (its kernel is laid out for it)."""

    axes: tuple[str, ...]  # the source tensor's stored axes after the Permute, e.g. ("w", "h", "c")
    permute_name: str


SPATIAL = Spatial()
Mode = Spatial | FlattenedMap | VectorMap | PermutedMap


class RewriteKind(enum.Enum):
    """What a `Rewrite` does to its layer; code tests this, never the display strings."""

    CONV_FROM_DENSE = "conv_from_dense"  # a Dense becomes a Conv2D with the same weights
    POOL_WINDOW = "pool_window"  # a global pooling becomes a pooling of one original-size window
    POOLING_REMOVED = "pooling_removed"  # a global pooling is dropped (``head="dense"``)
    REMOVED = "removed"  # a layer that has nothing to do on a score map (Flatten, Reshape)
    FOLDED = "folded"  # an affine layer absorbed by the next layer's weights
    AXIS_MOVED = "axis_moved"  # the same operation, moved onto the map's channel axis
    REPLACED = "replaced"  # any other replacement


@dataclass(frozen=True)
class Rewrite:
    """One change the conversion makes, as shown by `keras_fcn_surgery.plan`.

    ``kind`` says what the change is; ``old_class``, ``new_class``, the shapes
    and ``detail`` are for people reading the plan table.
    """

    layer_name: str
    old_class: str
    old_shapes: tuple[tuple[int, ...], ...]
    new_class: str
    new_shapes: tuple[tuple[int, ...], ...]
    parameters: int
    detail: str = ""
    kind: RewriteKind = RewriteKind.REPLACED


@dataclass
class Step:
    """How one source call becomes part of the converted graph."""

    output_modes: list[Mode]
    build: Callable[[tuple, dict], list]
    rewrite: Rewrite | None = None
    # True when the step calls a plain copy of the layer, so that a layer called
    # at several places (a shared layer) can take this step at each of them.
    plain_copy: bool = False


@dataclass
class Context:
    """Facts about the whole conversion that rules need."""

    layout: Layout
    head: str
    # The engine's `LayerCloner`: each `Surgeon` sets its own on its own copy of the context.
    cloner: Any = None

    @property
    def data_format(self) -> str:
        """The layout as Keras spells it, for the ``data_format`` of new layers."""
        return self.layout.data_format

    @property
    def channel_axis(self) -> int:
        return self.layout.channel_axis

    def spatial_shape(self, shape) -> tuple:
        """(H, W) of a rank-4 shape in this layout."""
        return self.layout.spatial_shape(shape)

    def channels(self, shape):
        return self.layout.channels(shape)


@dataclass
class NodeView:
    """One call of one source layer, with what the plan knows about its tensors."""

    layer: keras.layers.Layer
    node: Any
    input_modes: list[Mode]
    input_shapes: list[tuple]
    output_shapes: list[tuple]
    context: Context
    # The nodes of the same graph that read each tensor, by ``id(tensor)``: what follows this call.
    consumers: dict = field(default_factory=dict)

    @property
    def only_mode(self) -> Mode | None:
        return self.input_modes[0] if len(self.input_modes) == 1 else None

    def downstream(self):
        """Every call that depends on this call's outputs (in this graph), each once, nearest first.

        Yields ``(node, outsiders)``: the call, and its input tensors that do
        not depend on this call.
        """
        reached = {id(t) for t in self.node.outputs}
        frontier = list(self.node.outputs)
        seen: set[int] = set()
        while frontier:
            tensor = frontier.pop(0)
            for consumer in self.consumers.get(id(tensor), []):
                if id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                yield consumer, [t for t in consumer.input_tensors if id(t) not in reached]
                for output in consumer.outputs:
                    if id(output) not in reached:
                        reached.add(id(output))
                        frontier.append(output)


class Rule:
    """A rewrite for one kind of layer call.

    Subclasses declare what they take and implement `claim`:

    - ``layers``: the layer classes whose calls the rule takes (empty: any).
    - ``modes``: the tensor modes (`Spatial`, `FlattenedMap`, `VectorMap`)
      every input of the call must have (empty: any).

    The engine calls `claim` only for calls that `accepts` lets through;
    `claim` returns a `Step`, or None to leave the call to the next rule.
    """

    layers: ClassVar[tuple[type, ...]] = ()
    modes: ClassVar[tuple[type, ...]] = ()

    def accepts(self, view: NodeView) -> bool:
        """Whether the call matches the rule's declared ``layers`` and ``modes``."""
        if self.layers and not isinstance(view.layer, self.layers):
            return False
        return not self.modes or all(isinstance(mode, self.modes) for mode in view.input_modes)

    def claim(self, view: NodeView) -> Step | None:  # pragma: no cover - interface
        raise NotImplementedError


# Steps every rule (and the engine) uses ------------------------------------------------


def _first_input(args, kwargs) -> list:
    return [args[0]]


def pass_through(mode: Mode, rewrite: Rewrite | None = None) -> Step:
    """A step whose output is its first input, unchanged; ``rewrite`` says why, if the plan should show it."""
    return Step([mode], _first_input, rewrite)


def remove(view: NodeView, mode: Mode, detail: str, kind: RewriteKind = RewriteKind.REMOVED) -> Step:
    """Drop the layer from the converted graph: its output becomes its input; the plan shows ``(removed)``."""
    layer = view.layer
    return pass_through(mode, Rewrite(layer.name, type(layer).__name__, (), "(removed)", (), 0, detail, kind))


def copy_layer(view: NodeView, mode: Mode | None = None) -> Step:
    """Call a fresh copy of the layer (weights copied) in the converted graph.

    Every output takes ``mode`` (default: the mode of the first input). Calls of
    one shared layer share one copy.
    """
    cloner = view.context.cloner
    layer = view.layer
    if mode is None:
        mode = view.input_modes[0]
    outputs = max(len(view.output_shapes), 1)
    return Step([mode] * outputs, lambda args, kwargs: tree.flatten(cloner.call(layer, args, kwargs)), plain_copy=True)
