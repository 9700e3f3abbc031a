"""Pictures of what a network computes: label maps, first-layer filters, feature maps (Caffe's ``vis_square``)."""

from __future__ import annotations

import math

import keras
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError, InputError, first_line
from keras_fcn_surgery.graph import describe, is_layer, model_layout
from keras_fcn_surgery.inference.heatmap import _display_pixels, class_color
from keras_fcn_surgery.saving.atomic import atomic_output
from keras_fcn_surgery.surgery.fcn import as_fcn

_GAP = 1  # pixels between tiles
_ROW = 16
_SWATCH = 12
LEGEND_WIDTH = 200


def label_colors(labels) -> np.ndarray:
    """An ``(H, W)`` integer label map as ``(H, W, 3)`` uint8 colours (`class_color` of each label)."""
    labels = np.asarray(labels)
    palette = np.array([class_color(k) for k in range(int(labels.max(initial=0)) + 1)], dtype=np.uint8)
    return palette[np.clip(labels, 0, None)]


def label_overlay(image, labels, *, class_names=None, alpha: float = 0.5) -> Image.Image:
    """``[image with the label colours over it | legend]``, the legend listing the classes present by area.

    Args:
        image: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``; uint8, or floats.
        labels: ``(H, W)`` integer labels of the same size.
        class_names: names by label index; default: the indices.
        alpha: weight of the label colours.
    """
    pixels = _display_pixels(image).astype(np.float64)
    labels = np.asarray(labels)
    if labels.shape != pixels.shape[:2]:
        raise ConversionError(f"Labels of shape {labels.shape} do not fit an image of {pixels.shape[:2]} pixels.")
    overlay = ((1 - alpha) * pixels + alpha * label_colors(labels)).round().astype(np.uint8)
    counts = np.bincount(labels.ravel(), minlength=1)
    present = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    font = ImageFont.load_default(size=12)
    height = max(pixels.shape[0], (len(present) + 2) * _ROW)
    canvas = Image.new("RGB", (pixels.shape[1] + LEGEND_WIDTH, height), "white")
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = pixels.shape[1] + 6, 4
    draw.text((x, y), "labels (share of pixels)", fill="black", font=font)
    for k in present:
        y += _ROW
        draw.rectangle([x, y + 2, x + _SWATCH, y + 2 + _SWATCH], fill=class_color(k), outline="black")
        name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
        draw.text((x + _SWATCH + 6, y), f"{k}: {name} ({100 * counts[k] / labels.size:.1f}%)", fill="black", font=font)
    return canvas


def tile_grid(tiles, *, scale: int = 1, columns: int | None = None) -> Image.Image:
    """Square-ish grid of equally sized tiles (``(n, h, w)`` grey or ``(n, h, w, 3)`` RGB, uint8), as ``vis_square``."""
    tiles = np.asarray(tiles)
    count, height, width = tiles.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell = (height * scale + _GAP, width * scale + _GAP)
    mode = "RGB" if tiles.ndim == 4 else "L"
    grid = Image.new(mode, (columns * cell[1] + _GAP, rows * cell[0] + _GAP), "white" if mode == "RGB" else 255)
    for index, tile in enumerate(tiles):
        shown = Image.fromarray(tile).resize((width * scale, height * scale), Image.Resampling.NEAREST)
        grid.paste(shown, (_GAP + (index % columns) * cell[1], _GAP + (index // columns) * cell[0]))
    return grid


def _normalised(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return ((values - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)


def _find_layer(model, layer, wanted: str):
    names = [candidate.name for candidate in model.layers]
    if layer is None:
        for candidate in model.layers:
            if isinstance(candidate, taxonomy.PLAIN_CONVOLUTIONS):
                return candidate
        raise ConversionError(f"Model '{model.name}' has no Conv2D layer; pass `layer=` ({wanted}).")
    if is_layer(layer):
        return layer
    try:
        return model.get_layer(name=layer) if isinstance(layer, str) else model.layers[int(layer)]
    except (ValueError, IndexError):
        raise ConversionError(
            f"Model '{model.name}' has no layer {layer!r} ({wanted}). Its layers: {', '.join(names)}."
        ) from None


def _save(picture: Image.Image, path, overwrite: bool) -> None:

    with atomic_output(path, suffix=".png", overwrite=overwrite) as temporary:
        picture.save(temporary, format="PNG")


def filters_picture(model, layer=None, path=None, *, scale: int = 8, max_tiles: int = 256, overwrite: bool = False):
    """A grid of a convolution's kernels: RGB tiles for a 3-channel first layer, else one grey tile per channel.

    Kernels are scaled together (one min-max over the layer), so their
    contrasts compare.

    Args:
        model: a Keras model.
        layer: a layer name, index or object; default: the first Conv2D.
        path: PNG file to write (atomically); None writes nothing.
        scale: display pixels per kernel tap.
        max_tiles: most tiles shown (the first whole filters).
        overwrite: replace an existing ``path``.

    Returns:
        The PIL image; ``picture.info["shown"]`` is ``(filters shown, filters, "filters")``.

    Raises:
        ConversionError: for a missing layer or one without a convolution kernel.
        ModelFileError: for an output path that cannot be written.
    """
    found = _find_layer(model, layer, "a convolution")
    kernel = getattr(found, "kernel", None)
    if kernel is None or len(kernel.shape) != 4:
        raise ConversionError(f"Layer {describe(found)} has no 2-D convolution kernel to draw; pick a Conv2D layer.")
    weights = np.asarray(keras.ops.convert_to_numpy(kernel))  # (kh, kw, in, out)
    if isinstance(found, taxonomy.TRANSPOSED_CONVOLUTIONS):
        weights = np.swapaxes(weights, 2, 3)
    if weights.shape[2] == 3:
        tiles = np.moveaxis(_normalised(weights), 3, 0)  # (out, kh, kw, 3)
    else:
        per_channel = np.transpose(weights, (3, 2, 0, 1))  # (out, in, kh, kw)
        tiles = _normalised(per_channel.reshape(-1, weights.shape[0], weights.shape[1]))
    per_filter = 1 if weights.shape[2] == 3 else weights.shape[2]
    shown = tiles[: max(per_filter, max_tiles - max_tiles % per_filter)]  # whole filters only
    picture = tile_grid(shown, scale=scale, columns=None if weights.shape[2] == 3 else weights.shape[2])
    picture.info["shown"] = (len(shown) // per_filter, weights.shape[3], "filters")
    if path is not None:
        _save(picture, path, overwrite)
    return picture


def activations_picture(model, image, layer=None, path=None, *, scale: int = 1, max_tiles: int = 256, overwrite=False):
    """A grid of one layer's feature maps for one image (grey, one min-max over all maps), as ``vis_square``.

    Args:
        model: a Keras model; a classifier with a fixed input size is
            converted (`as_fcn`) when ``image`` has another size, and the
            layer of the same name shows its maps over the whole image.
        image: one image in the model's layout, ``(H, W, C)`` or ``(C, H, W)``.
        layer: a layer name, index or object; default: the first Conv2D.
        path: PNG file to write (atomically); None writes nothing.
        scale: display pixels per map cell.
        max_tiles: most maps shown (the first channels).
        overwrite: replace an existing ``path``.

    Returns:
        The PIL image; ``picture.info["shown"]`` is ``(maps shown, maps, "feature maps")``.

    Raises:
        ConversionError: for a missing layer, one whose output is not a
            feature map, or an image the model does not take.
    """
    found = _find_layer(model, layer, "a layer with a feature map")
    layout = model_layout(model)
    output = found.output
    if len(output.shape) != 4:
        raise ConversionError(
            f"Layer {describe(found)} outputs shape {tuple(output.shape)}, not a feature map; pick a "
            "convolution or pooling layer."
        )
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ConversionError(f"Expected one image of rank 3 in the model's layout. Received shape {image.shape}.")
    fixed = layout.spatial_shape(tuple(model.inputs[0].shape))
    if None not in fixed and tuple(fixed) != layout.image_size(image.shape):
        # A classifier's layers take one size: its FCN's same-named layer takes this image (issue 28).

        fcn = as_fcn(model)
        model, output = fcn, fcn.get_layer(found.name).output
    probe = keras.Model(model.inputs[0], output)
    try:
        maps = np.asarray(probe(image[None]))[0]
    except Exception as error:  # Keras's ValueError or TensorFlow's InvalidArgumentError: the image does not fit
        raise InputError(
            f"Model '{model.name}' does not take an image of shape {image.shape} up to layer {describe(found)}: "
            f"{first_line(str(error))} Use a larger image."
        ) from error
    maps = layout.image_to_channels_last(maps)
    tiles = _normalised(np.moveaxis(maps, -1, 0)[:max_tiles])
    picture = tile_grid(tiles, scale=scale)
    picture.info["shown"] = (len(tiles), maps.shape[-1], "feature maps")
    if path is not None:
        _save(picture, path, overwrite)
    return picture
