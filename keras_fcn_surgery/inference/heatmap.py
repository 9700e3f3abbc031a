"""Pictures of score maps: one class's probability over the image, and the argmax class map.

Cells are placed by the network's geometry: cell ``(i, j)`` is centred on the
centre of its window, ``offset + i * stride + (receptive_field - 1) / 2``
(pixel indices), and the map is interpolated between those centres (held
constant beyond the outermost ones).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.grid.geometry import MapGrid
from keras_fcn_surgery.saving.arguments import public_arguments
from keras_fcn_surgery.surgery.fcn import pick_map

# Layout of the picture: [overlay | class map | legend], the legend LEGEND_WIDTH wide.
LEGEND_WIDTH = 240
_ROW = 16
_FONT_SIZE = 12
_SWATCH = 12


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in class-index order (shipped in the package, nothing downloaded)."""
    text = resources.files("keras_fcn_surgery").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = [line for line in text.splitlines() if line and not line.startswith("#")]
    if len(names) != 1000:
        raise ConversionError(f"The packaged ImageNet class list has {len(names)} names instead of 1000; reinstall.")
    return names


def class_names_for(class_names, classes: int):
    """The one rule for the class names of a map, in `heatmap` and `predict` alike.

    Args:
        class_names: names given (returned as a list), ``"imagenet"`` (the
            packaged ImageNet names; the map must have 1000 classes), or None.
        classes: the map's class count.

    Returns:
        The names, or None (classes named by their index): without names
        given, ImageNet's for a 1000-class map (a `keras.applications`
        ImageNet classifier), else None.

    Raises:
        InputError: for ``"imagenet"`` on a map of another class count.
    """
    if isinstance(class_names, str):
        if class_names != "imagenet":
            raise InputError(f"Expected class names, None or 'imagenet'. Received: {class_names!r}")
        if classes != 1000:
            raise InputError(f"ImageNet's class names are 1000; the model has {classes} classes.")
        return imagenet_class_names()
    if class_names is None:
        return imagenet_class_names() if classes == 1000 else None
    return list(class_names)


def class_probabilities(scores, probabilities: bool | None = None) -> np.ndarray:
    """``(H', W', K)`` scores as probabilities over the K classes.

    Args:
        scores: the map, channels last.
        probabilities: whether ``scores`` already are probabilities (a softmax
            output); default: when every value lies in [0, 1] and each cell
            sums to 1. Otherwise a softmax is applied.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if probabilities is None:
        sums = scores.sum(axis=-1)
        probabilities = bool(scores.min() >= 0 and scores.max() <= 1 and np.allclose(sums, 1, atol=1e-3))
    if probabilities:
        return scores
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def cell_coordinates(grid: MapGrid, image_size, cells, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per displayed row and column, its position in map cells (fractional).

    Args:
        grid: the network's geometry.
        image_size: ``(H, W)`` of the image the map was computed on.
        cells: ``(H', W')`` of the map.
        scale: display pixels per image pixel.

    Returns:
        Two arrays of lengths ``H * scale`` and ``W * scale``.
    """
    grid = grid.at(image_size)
    coordinates = []
    for size, count, stride, field, offset in zip(image_size, cells, grid.stride, grid.receptive_field, grid.offset):
        pixels = (np.arange(size * scale) + 0.5) / scale - 0.5
        centre0 = offset + (field - 1) / 2
        coordinates.append(np.clip((pixels - centre0) / stride, 0, count - 1))
    return coordinates[0], coordinates[1]


def upsample(values, rows, cols) -> np.ndarray:
    """Bilinear samples of a 2-D map at fractional cell coordinates (from `cell_coordinates`)."""
    values = np.asarray(values, dtype=np.float64)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1 = np.minimum(r0 + 1, values.shape[0] - 1)
    c1 = np.minimum(c0 + 1, values.shape[1] - 1)
    wr = (rows - r0)[:, None]
    wc = (cols - c0)[None, :]
    top = values[r0][:, c0] * (1 - wc) + values[r0][:, c1] * wc
    bottom = values[r1][:, c0] * (1 - wc) + values[r1][:, c1] * wc
    return top * (1 - wr) + bottom * wr


def hot_colors(values) -> np.ndarray:
    """Black -> red -> yellow -> white for values in [0, 1]; uint8 RGB."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)[..., None] * 3
    rgb = np.clip(np.concatenate([v, v - 1, v - 2], axis=-1), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def class_color(index: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class index (hues spaced by the golden ratio)."""
    hue = (index * 0.6180339887) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.7, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))


@dataclass(frozen=True)
class HeatmapStyle:
    """How `heatmap` draws a map: the overlay's weight, the magnification, the legend and the heat scale.

    Attributes:
        alpha: weight of the heat colours over the image.
        scale: integer display magnification (nearest pixels, smooth map).
        legend_entries: most classes listed in the legend (by area).
        value_range: the probabilities shown as black and white: default
            ``(0.0, 1.0)``, the absolute probability scale; ``(low, high)``; or
            ``"relative"``: the class's lowest and highest probability on this
            map (see `heat_range`), labelled "relative" in the legend, which
            shows an uncertain model's contrasts but makes p = 0.15 look white.

    Example:

    ```python
    picture = kfs.heatmap(image, scores, grid, 2, style=kfs.HeatmapStyle(scale=2, value_range="relative"))
    ```
    """

    alpha: float = 0.6
    scale: int = 1
    legend_entries: int = 12
    value_range: tuple[float, float] | str | None = None


def heatmap(
    image,
    scores,
    grid: MapGrid,
    class_index: int,
    *,
    output: str | None = None,
    class_names=None,
    probabilities: bool | None = None,
    style: HeatmapStyle | None = None,
) -> Image.Image:
    """A picture of a score map: ``[class probability over the image | argmax class map | legend]``.

    Args:
        image: the image the map was computed on, ``(H, W, 3)``, ``(H, W, 1)``
            or ``(H, W)``; uint8, or floats in [0, 1] or [0, 255]; or a PIL image,
            or the path of an image file.
        scores: its map, ``(H', W', K)`` (channels last), e.g. from `predict_map`;
            or the maps of a model with several outputs (`OutputMaps`, or a
            dict of maps by output name), of which ``output`` is shown.
        grid: the network's geometry, ``geometry(fcn)`` (for outputs on
            different grids, ``geometry(fcn, output=name)``; for a windowed
            map, its plan's ``grid``); it places the cells.
        class_index: the class whose probability is overlaid.
        output: the name of the map to show among several; default: the
            first output that ends in a softmax or sigmoid (see
            `choose_output`; a plain dict of several maps needs the name).
        class_names: ``K`` names for the legend; default: the indices.
        probabilities: whether ``scores`` are probabilities already (see
            `class_probabilities`); default: guessed.
        style: how it is drawn (`HeatmapStyle`: overlay weight, magnification,
            legend entries, heat scale); default: `HeatmapStyle()`.

    Returns:
        A PIL RGB image ``(2 * W * scale + LEGEND_WIDTH)`` wide and
        ``max(H * scale, legend height)`` high.

    Raises:
        ConversionError: for a map or class index that does not fit.
        InputError: for an ``output`` the maps do not hold (the message lists
            their names), or none among several maps of a plain dict.
    """
    if style is None:
        style = HeatmapStyle()
    elif not isinstance(style, HeatmapStyle):
        raise InputError(f"Expected `style` to be a HeatmapStyle. Received: style={style!r}")
    alpha, scale, value_range = style.alpha, style.scale, style.value_range
    pixels = _display_pixels(public_arguments(None, image)[1])  # an image file's path too
    _, scores = pick_map(scores, output)
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ConversionError(f"Expected a score map shaped (H', W', K). Received shape {scores.shape}.")
    classes = scores.shape[-1]
    if not 0 <= class_index < classes:
        raise ConversionError(f"Class {class_index} does not exist: the map has {classes} classes (0..{classes - 1}).")
    if class_names is not None and len(class_names) != classes:
        raise ConversionError(f"Got {len(class_names)} class names for a map of {classes} classes.")
    if scale < 1 or int(scale) != scale:
        raise ConversionError(f"Expected an integer `scale` >= 1. Received: scale={scale!r}")
    height, width = pixels.shape[:2]
    expected = grid.output_size((height, width))
    if tuple(scores.shape[:2]) != tuple(expected):
        raise ConversionError(
            f"The map is {scores.shape[0]}x{scores.shape[1]} cells but the network gives {expected[0]}x{expected[1]} "
            f"on a {height}x{width} image: they do not belong together."
        )
    probs = class_probabilities(scores, probabilities)
    relative = isinstance(value_range, str) and value_range == "relative"
    if relative:
        low, high = heat_range(probs[..., class_index])
    else:
        low, high = _checked_range((0.0, 1.0) if value_range is None else value_range)
    rows, cols = cell_coordinates(grid, (height, width), scores.shape[:2], scale)
    shown = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1).astype(np.float64)
    heat = (upsample(probs[..., class_index], rows, cols) - low) / (high - low)
    overlay = (1 - alpha) * shown + alpha * hot_colors(heat)
    winners = probs.argmax(axis=-1)
    nearest = winners[np.rint(rows).astype(int)][:, np.rint(cols).astype(int)]
    palette = np.array([class_color(k) for k in range(classes)], dtype=np.uint8)
    class_map = 0.35 * shown + 0.65 * palette[nearest]
    names = list(class_names) if class_names is not None else [str(k) for k in range(classes)]
    legend = _legend(winners, probs, class_index, names, style.legend_entries, height * scale, (low, high), relative)
    canvas = Image.new("RGB", (2 * width * scale + LEGEND_WIDTH, max(height * scale, legend.height)), "white")
    canvas.paste(Image.fromarray(overlay.round().astype(np.uint8)), (0, 0))
    canvas.paste(Image.fromarray(class_map.round().astype(np.uint8)), (width * scale, 0))
    canvas.paste(legend, (2 * width * scale, 0))
    return canvas


def heat_range(values) -> tuple[float, float]:
    """``(low, high)`` of a probability map for display: its own range, never empty.

    A map whose values are all equal (an untrained network) gets a range of
    width 1e-6 above its value, so it shows as uniform black rather than failing.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    return (low, max(high, low + 1e-6))


def _checked_range(value_range) -> tuple[float, float]:
    if isinstance(value_range, str):
        raise ConversionError(f"Expected `value_range` (low, high) or 'relative'. Received: {value_range!r}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ConversionError(f"Expected `value_range` (low, high) with high > low. Received: {value_range!r}")
    return (low, high)


def _display_pixels(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ConversionError(
            f"Expected an image shaped (H, W), (H, W, 1) or (H, W, 3). Received shape {pixels.shape}."
        )
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        values = values * 255
    elif low < 0 or high > 255:
        values = (values - low) / max(high - low, 1e-12) * 255
    return values.round().astype(np.uint8)


def scale_labels(value_range) -> tuple[str, str]:
    """The two ends of a heat scale as text, with as many digits as it takes to tell them apart."""
    low, high = value_range
    for digits in range(3, 10):
        texts = (f"{low:.{digits}g}", f"{high:.{digits}g}")
        if texts[0] != texts[1]:
            return texts
    return texts


def _legend(winners, probs, class_index, names, entries, height, value_range, relative=False) -> Image.Image:
    font = ImageFont.load_default(size=_FONT_SIZE)
    counts = np.bincount(winners.ravel(), minlength=probs.shape[-1])
    ranked = [k for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    shown, hidden = ranked[:entries], ranked[entries:]
    best = np.unravel_index(np.argmax(probs[..., class_index]), probs.shape[:2])
    lines = 4 + len(shown) + (1 if hidden else 0)
    legend = Image.new("RGB", (LEGEND_WIDTH, max(height, (lines + 2) * _ROW)), "white")
    draw = ImageDraw.Draw(legend)
    x, y = 6, 4
    draw.text((x, y), _fit(f"left: p({names[class_index]})", font), fill="black", font=font)
    y += _ROW
    peak = probs[best + (class_index,)]
    draw.text((x, y), _fit(f"max {peak:.3f} at cell {tuple(int(b) for b in best)}", font), fill="black", font=font)
    y += _ROW
    ramp = hot_colors(np.linspace(0, 1, LEGEND_WIDTH - 2 * x))[None].repeat(_SWATCH, axis=0)
    legend.paste(Image.fromarray(ramp), (x, y))
    low_text, high_text = scale_labels(value_range)
    if relative:  # not probabilities 0..1: say so where the numbers are
        low_text, high_text = f"{low_text} (relative)", high_text
    draw.text((x, y + _SWATCH), low_text, fill="black", font=font)
    draw.text((LEGEND_WIDTH - x - font.getlength(high_text), y + _SWATCH), high_text, fill="black", font=font)
    y += _ROW + _SWATCH
    draw.text((x, y), "middle: most likely class", fill="black", font=font)
    y += _ROW
    total = max(int(counts.sum()), 1)
    for k in shown:
        draw.rectangle([x, y + 2, x + _SWATCH, y + 2 + _SWATCH], fill=class_color(int(k)), outline="black")
        text = f"{k}: {names[k]} ({100 * counts[k] / total:.0f}%)"
        draw.text((x + _SWATCH + 6, y), _fit(text, font, LEGEND_WIDTH - 3 * x - _SWATCH), fill="black", font=font)
        y += _ROW
    if hidden:
        draw.text((x, y), f"+ {len(hidden)} more classes", fill="black", font=font)
    return legend


def _fit(text: str, font, width: int = LEGEND_WIDTH - 12) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
