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
        data_format: the layout of the logits; only ``"channels_last"``:
            Keras's sparse cross-entropy reads classes on the last axis.

    Returns:
        A `keras.losses.SparseCategoricalCrossentropy` (built-in: models
        compiled with it save and load without custom objects). Labels are
        ``(N, H, W)`` integers; logits ``(N, H, W, K)``.

    Raises:
        ConversionError: for ``"channels_first"`` logits.
    """
    from keras_fcn_surgery.errors import ConversionError
    from keras_fcn_surgery.layout import Layout

    if Layout(data_format).channels_first:
        raise ConversionError(
            "Keras's sparse cross-entropy reads the classes on the last axis only, and a channels-first "
            "segmenter puts them on axis 1. Train on `keras.Model(model.input, "
            "keras.layers.Permute((2, 3, 1))(model.output))` instead."
        )
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_label, name="segmentation_loss"
    )
