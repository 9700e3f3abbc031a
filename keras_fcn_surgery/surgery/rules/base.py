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

A rule looks at one call of one layer (`NodeView`) and, if it knows how to
convert it, returns a `Step`: the modes of the outputs, an optional `Rewrite`
for the plan, and a function that builds the replacement on the new tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras

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


SPATIAL = Spatial()
Mode = Spatial | FlattenedMap | VectorMap


@dataclass(frozen=True)
class Rewrite:
    """One change the conversion makes, as shown by `keras_fcn_surgery.plan`."""

    layer_name: str
    old_class: str
    old_shapes: tuple[tuple[int, ...], ...]
    new_class: str
    new_shapes: tuple[tuple[int, ...], ...]
    parameters: int
    detail: str = ""


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
    # For global poolings: whether the pooled vector is multiplied or added back
    # into a feature map (squeeze-and-excitation), which makes it part of the body.
    feeds_back_into_map: bool = False

    @property
    def only_mode(self) -> Mode | None:
        return self.input_modes[0] if len(self.input_modes) == 1 else None


class Rule:
    """A rewrite for one kind of layer call. Subclasses implement `claim`."""

    def claim(self, view: NodeView) -> Step | None:  # pragma: no cover - interface
        raise NotImplementedError
