"""Losses for per-pixel labels with a void label (255 in PASCAL VOC)."""

from __future__ import annotations

import keras

VOID_LABEL = 255


def segmentation_loss(
    ignore_label: int | None = VOID_LABEL, *, data_format: str = "channels_last"
) -> keras.losses.Loss:
    """Per-pixel cross-entropy on logits that ignores pixels labelled ``ignore_label``.

    Args:
        ignore_label: the void label (padding, object borders); ``None`` counts every pixel.
        data_format: where the class axis of the logits is: last
            (``"channels_last"``) or 1 (``"channels_first"``).

    Returns:
        A `keras.losses.SparseCategoricalCrossentropy` (built-in: models
        compiled with it save and load without custom objects). Labels are
        ``(N, H, W)`` integers; logits ``(N, H, W, K)`` (``(N, K, H, W)``).
    """
    from keras_fcn_surgery.layout import Layout

    layout = Layout(data_format)
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_label, axis=layout.channel_axis, name="segmentation_loss"
    )
