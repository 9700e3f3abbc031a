"""Where height, width and channels sit in an image tensor: one `Layout` for the whole package.

Keras spells a layout as a ``data_format`` string; every question the package
asks of it (which axes are spatial, where the channels are, how to move to and
from channels-last) is answered here, for batched (rank-4) tensors and single
(rank-3) images alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNELS_LAST = "channels_last"
CHANNELS_FIRST = "channels_first"
DATA_FORMATS = (CHANNELS_LAST, CHANNELS_FIRST)


@dataclass(frozen=True)
class ImageSpec:
    """The image a model takes: its layout and channel count (a `FcnSpec` is one, with what the model returns)."""

    layout: Layout
    channels: int


@dataclass(frozen=True)
class Layout:
    """An image layout: ``Layout("channels_last")`` (NHWC) or ``Layout("channels_first")`` (NCHW)."""

    data_format: str = CHANNELS_LAST

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"Expected `data_format` to be one of {DATA_FORMATS}. Received: {self.data_format!r}")

    @classmethod
    def of(cls, layer) -> Layout:
        """The layout a layer with a ``data_format`` (a convolution, a pooling, a Flatten) works in."""
        return cls(layer.data_format)

    @property
    def channels_last(self) -> bool:
        return self.data_format == CHANNELS_LAST

    @property
    def channels_first(self) -> bool:
        return self.data_format == CHANNELS_FIRST

    # Batched tensors (N, H, W, C) / (N, C, H, W) -----------------------------------

    @property
    def channel_axis(self) -> int:
        """The channel axis of a rank-4 tensor: 3 or 1."""
        return 3 if self.channels_last else 1

    @property
    def spatial_axes(self) -> tuple[int, int]:
        """The height and width axes of a rank-4 tensor."""
        return (1, 2) if self.channels_last else (2, 3)

    def spatial_shape(self, shape) -> tuple:
        """``(H, W)`` of a rank-4 shape."""
        return tuple(shape[1:3]) if self.channels_last else tuple(shape[2:4])

    def channels(self, shape):
        """``C`` of a rank-4 shape."""
        return shape[3] if self.channels_last else shape[1]

    def batch_shape(self, batch, height, width, channels) -> tuple:
        """A rank-4 shape in this layout."""
        return (batch, height, width, channels) if self.channels_last else (batch, channels, height, width)

    def to_channels_last(self, batch):
        """A rank-4 NumPy array moved to NHWC (a view; unchanged when already NHWC)."""
        return batch if self.channels_last else np.transpose(batch, (0, 2, 3, 1))

    def from_channels_last(self, batch):
        """A rank-4 NHWC NumPy array moved to this layout."""
        return batch if self.channels_last else np.transpose(batch, (0, 3, 1, 2))

    # Single images (H, W, C) / (C, H, W) --------------------------------------------

    @property
    def image_spatial_axes(self) -> tuple[int, int]:
        """The height and width axes of one image (no batch axis)."""
        return (0, 1) if self.channels_last else (1, 2)

    @property
    def image_channel_axis(self) -> int:
        return 2 if self.channels_last else 0

    def image_shape(self, height, width, channels) -> tuple:
        """A rank-3 shape in this layout."""
        return (height, width, channels) if self.channels_last else (channels, height, width)

    def image_size(self, shape) -> tuple:
        """``(H, W)`` of a rank-3 shape."""
        return tuple(shape[0:2]) if self.channels_last else tuple(shape[1:3])

    def image_channels(self, shape):
        """``C`` of a rank-3 shape."""
        return shape[2] if self.channels_last else shape[0]

    def image_index(self, rows: slice, cols: slice) -> tuple:
        """An index that selects ``rows x cols`` of one image, every channel."""
        return (rows, cols, slice(None)) if self.channels_last else (slice(None), rows, cols)

    def image_to_channels_last(self, image):
        """One image (rank 3) moved to HWC."""
        return image if self.channels_last else np.moveaxis(image, 0, -1)

    def image_from_channels_last(self, image):
        """One HWC image moved to this layout."""
        return image if self.channels_last else np.moveaxis(image, -1, 0)


def common_layout(name: str, layers, *, default: str, describe) -> Layout:
    """The one layout of ``layers`` (those with a ``data_format``), or ``default`` when there is none.

    Args:
        name: the model's name, for the message.
        layers: layers with a ``data_format`` attribute.
        default: the layout when ``layers`` is empty (Keras's ``image_data_format()``).
        describe: how a message names a layer.

    Raises:
        ConversionError: when the layers mix both layouts, naming one of each.
    """
    from keras_fcn_surgery.errors import ConversionError

    first: dict[str, object] = {}
    for layer in layers:
        first.setdefault(layer.data_format, layer)
    if len(first) > 1:
        raise ConversionError(
            f"Model '{name}' mixes layouts: {describe(first[CHANNELS_LAST])} is channels_last while "
            f"{describe(first[CHANNELS_FIRST])} is channels_first. Use one `data_format` for all spatial layers."
        )
    return Layout(next(iter(first))) if first else Layout(default)
