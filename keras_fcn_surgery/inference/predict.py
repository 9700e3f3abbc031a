"""Score maps of whole images: exact tiled FCN inference and the sliding-window baseline."""

from __future__ import annotations

import itertools
import sys
import weakref
from dataclasses import dataclass

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import Geometry, geometry
from keras_fcn_surgery.layout import Layout

# Input pixels per forward pass when `batch_size` is not given: tiles of 1024 x 1024
# or more go one at a time (batching them would defeat the memory bound of tiling).
_PIXELS_PER_BATCH = 1 << 20
# tf.function wrappers of each model's forward pass, by jit_compile.
_FORWARD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _ImageSpec:
    """The image a model takes: its layout and channel count."""

    layout: Layout
    channels: int


def predict_map(
    fcn,
    image,
    *,
    tile=None,
    batch_size: int | None = None,
    out=None,
    progress: bool | None = None,
    preprocess=None,
    jit_compile: bool = False,
):
    """The score map of one image, computed whole or in exact tiles.

    With ``tile``, the image is cut into overlapping tiles whose origins lie on
    multiples of the network's total stride and whose sides are congruent to
    the image's sides modulo that stride, so every ``same`` padding pads a tile
    as it pads the whole image; of each tile only the cells whose windows stay
    inside it (or reach past the image's own edge) are kept, and every map
    cell is written exactly once. The stitched map equals the whole-image map
    within float32 round-off. Only one batch of tiles is read from ``image`` at
    a time, so ``image`` and ``out`` may be memory-mapped or zarr arrays far
    larger than memory.

    Args:
        fcn: a fully convolutional model from `convert` (input ``(None, None,
            None, C)``, or ``(None, C, None, None)`` for channels-first).
        image: one image, ``(H, W, C)`` (``(C, H, W)`` for channels-first
            models; ``(H, W)`` when ``C == 1``): a numpy array or any array
            that supports slicing (``np.memmap``, zarr). Values are fed as they
            are, cast to the model's input dtype, after ``preprocess``.
        tile: ``None`` for one pass over the whole image, or the largest
            tile side ``T`` or ``(T_h, T_w)`` in input pixels. Each side is
            rounded up to a multiple of the network's stride, and the image
            side's remainder modulo the stride is added (so tiles pad like the
            image); a side at least the image's is not cut. The tiles are then
            shortened evenly as far as that needs no more of them.
        batch_size: tiles per forward pass; default: as many as make about 1
            million input pixels (one tile of 1024 x 1024 or more).
        out: an array of the map's shape to write into (numpy, memmap or
            zarr) instead of allocating one.
        progress: show a tqdm bar over the tiles; default: when there is more
            than one tile and stderr is a terminal.
        preprocess: a function applied to each tile's pixels (a float32
            array in the image's layout in, same shape out) before the model,
            such as
            ``keras.applications.vgg16.preprocess_input``. It must treat each
            pixel on its own, or tiles would differ from the whole image.
        jit_compile: compile the forward pass with XLA (once per tile batch
            shape); faster for large-kernel heads on CPU, slower to start.

    Returns:
        The map, ``(H', W', K)`` (``(K, H', W')`` for channels-first), as a
        float array, or ``out`` when given. ``geometry(fcn).output_size((H, W))``
        is ``(H', W')``.

    Raises:
        ConversionError: for a model that is not fully convolutional, an
            image of the wrong rank or channels or smaller than the network's
            minimum input, tiles too small to keep any cell, tiling a network
            with global context, or an ``out`` of the wrong shape.

    Example:

    ```python
    fcn = kfs.convert(classifier)
    image = np.load("slide.npy", mmap_mode="r")  # 30000 x 30000 x 3, never read whole
    cells = kfs.geometry(fcn).output_size(image.shape[:2])
    scores = zarr.open_array("scores.zarr", mode="w", shape=(*cells, 1000), dtype="float32")
    kfs.predict_map(fcn, image, tile=2048, out=scores)
    ```
    """
    spec, classes = _check_fcn(fcn)
    image = _with_channel_axis(image, spec)
    size = _image_size(image, spec)
    grid = geometry(fcn)
    _check_image_size(size, grid)
    map_size = grid.output_size(size)
    shape = spec.layout.image_shape(map_size[0], map_size[1], classes)
    out = _output_array(out, shape, fcn)
    plans = _plan(size, grid, tile)
    tiles = list(itertools.product(*plans))
    tile_size = (plans[0][0].stop - plans[0][0].start, plans[1][0].stop - plans[1][0].start)
    if batch_size is None:
        batch_size = max(1, _PIXELS_PER_BATCH // (tile_size[0] * tile_size[1]))
    if batch_size < 1:
        raise ConversionError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    forward = _forward_fn(fcn, jit_compile)
    dtype = _input_dtype(fcn)
    with _progress_bar(len(tiles), progress, "tiles") as bar:
        for first in range(0, len(tiles), batch_size):
            batch = tiles[first : first + batch_size]
            pixels = np.stack([_read(image, spec, rows, cols, preprocess, dtype) for rows, cols in batch])
            maps = forward(pixels)
            for (rows, cols), cell_map in zip(batch, maps):
                keep = spec.layout.image_index(
                    slice(rows.keep_start, rows.keep_stop), slice(cols.keep_start, cols.keep_stop)
                )
                target = spec.layout.image_index(
                    slice(rows.out_start, rows.out_stop), slice(cols.out_start, cols.out_stop)
                )
                out[target] = cell_map[keep]
            bar.update(len(batch))
    return out


def sliding_window_predict(
    model, image, stride, *, batch_size: int = 32, preprocess=None, progress: bool | None = False
):
    """The naive baseline: the classifier on every window of its input size.

    Windows start at ``(i * stride_h, j * stride_w)`` for every position that
    fits inside the image, are cut from ``image`` batch by batch and run
    through the source classifier. For a network without padding this is what
    the converted FCN computes at ``stride`` equal to the network's stride.

    Args:
        model: the source classifier, with a fixed input size.
        image: one image, laid out as for `predict_map`.
        stride: pixels between windows, ``s`` or ``(s_h, s_w)``.
        batch_size: windows per forward pass.
        preprocess: a function applied to each window's pixels first.
        progress: show a tqdm bar over the batches.

    Returns:
        ``(H', W', K)`` scores (``(K, H', W')`` for channels-first models),
        one cell per window.

    Raises:
        ConversionError: for a model without a fixed input size or a vector
            output, or an image smaller than one window.
    """
    model_format = model_layout(model)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in model_format.spatial_shape(shape)):
        raise ConversionError(
            f"Model '{model.name}' takes inputs of shape {shape}; the sliding window needs a classifier with a "
            "fixed input size (the window)."
        )
    spec = _ImageSpec(model_format, int(model_format.channels(shape)))
    window = tuple(int(d) for d in model_format.spatial_shape(shape))
    if len(model.outputs[0].shape) != 2:
        raise ConversionError(
            f"Model '{model.name}' outputs shape {tuple(model.outputs[0].shape)}; the sliding window needs a "
            "classifier that returns one vector of scores per image."
        )
    if batch_size < 1:
        raise ConversionError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    image = _with_channel_axis(image, spec)
    size = _image_size(image, spec)
    strides = _pair(stride, "stride")
    counts = []
    for name, length, side, step in zip(("height", "width"), size, window, strides):
        if length < side:
            raise ConversionError(
                f"Image {name} {length} is smaller than the window of {window[0]}x{window[1]} pixels of "
                f"'{model.name}'. Use a larger image."
            )
        counts.append((length - side) // step + 1)
    classes = int(model.outputs[0].shape[-1])
    positions = list(itertools.product(range(counts[0]), range(counts[1])))
    scores = np.empty((len(positions), classes), dtype=np.float32)
    forward = _forward_fn(model, False)
    dtype = _input_dtype(model)
    batches = range(0, len(positions), batch_size)
    with _progress_bar(len(batches), progress, "batches") as bar:
        for first in batches:
            crops = [
                _read(
                    image,
                    spec,
                    tiling.AxisTile(i * strides[0], i * strides[0] + window[0], 0, 0, 0),
                    tiling.AxisTile(j * strides[1], j * strides[1] + window[1], 0, 0, 0),
                    preprocess,
                    dtype,
                )
                for i, j in positions[first : first + batch_size]
            ]
            scores[first : first + len(crops)] = forward(np.stack(crops))
            bar.update(1)
    grid = scores.reshape(counts[0], counts[1], classes)
    return model_format.image_from_channels_last(grid)


def _check_fcn(fcn) -> tuple[_ImageSpec, int]:
    if not isinstance(fcn, keras.Model):
        raise ConversionError(f"Expected a `keras.Model` from `convert`. Received: {type(fcn).__name__}")
    if len(fcn.inputs) != 1 or len(fcn.outputs) != 1:
        raise ConversionError(
            f"Model '{fcn.name}' has {len(fcn.inputs)} inputs and {len(fcn.outputs)} outputs; score maps need "
            "one image input and one output."
        )
    model_format = model_layout(fcn)
    in_shape, out_shape = tuple(fcn.inputs[0].shape), tuple(fcn.outputs[0].shape)
    if len(in_shape) != 4 or any(d is not None for d in model_format.spatial_shape(in_shape)) or len(out_shape) != 4:
        raise ConversionError(
            f"Model '{fcn.name}' takes {in_shape} and returns {out_shape}: not a fully convolutional model. "
            "Convert the classifier first: `fcn = keras_fcn_surgery.convert(model)`."
        )
    channels, classes = model_format.channels(in_shape), model_format.channels(out_shape)
    return _ImageSpec(model_format, int(channels)), int(classes)


def _with_channel_axis(image, spec: _ImageSpec):
    if len(image.shape) == 2 and spec.channels == 1:
        return _ChannelView(image, spec.layout)
    return image


class _ChannelView:
    """A 2-D array seen as one-channel 3-D, sliced lazily."""

    def __init__(self, array, layout: Layout):
        self._array, self._layout = array, layout
        height, width = array.shape
        self.shape = layout.image_shape(height, width, 1)

    def __getitem__(self, index):
        rows, cols = (index[i] for i in self._layout.image_spatial_axes)
        region = np.asarray(self._array[rows, cols])
        return np.expand_dims(region, self._layout.image_channel_axis)


def _image_size(image, spec: _ImageSpec) -> tuple[int, int]:
    shape = tuple(getattr(image, "shape", ()))
    expected = "(H, W, C)" if spec.layout.channels_last else "(C, H, W)"
    if len(shape) != 3:
        raise ConversionError(
            f"Expected one image shaped {expected} with C = {spec.channels} (an array or an array-like with "
            f"`shape` and slicing). Received shape {shape}; for a batch, call once per image."
        )
    channels = spec.layout.image_channels(shape)
    if channels != spec.channels:
        raise ConversionError(
            f"The model takes {spec.channels} channels ({spec.layout.data_format}, {expected}); the image of shape "
            f"{shape} has {channels}."
        )
    rows, cols = spec.layout.image_spatial_axes
    return (int(shape[rows]), int(shape[cols]))


def _check_image_size(size, grid: Geometry) -> None:
    minimum = grid.min_input_size
    if size[0] < minimum[0] or size[1] < minimum[1]:
        field = grid.receptive_field
        raise ConversionError(
            f"An image of {size[0]}x{size[1]} pixels is smaller than the network's minimum input of "
            f"{minimum[0]}x{minimum[1]} (receptive field {field[0]}x{field[1]}): its score map would be empty. "
            "Pad or enlarge the image."
        )


def _output_array(out, shape, fcn):
    if out is None:
        return np.empty(shape, dtype=_output_dtype(fcn))
    given = tuple(getattr(out, "shape", ()))
    if given != shape:
        raise ConversionError(
            f"`out` has shape {given}, but the map of this image has shape {shape}. Allocate it with that shape "
            "(`geometry(fcn).output_size((H, W))` gives the map's height and width)."
        )
    return out


def _plan(size, grid: Geometry, tile) -> list[list[tiling.AxisTile]]:
    if tile is None:
        sides = size
    else:
        requested = _pair(tile, "tile")
        sides = tuple(tiling.tile_length(t, n, s) for t, n, s in zip(requested, size, grid.stride))
    if tuple(sides) == tuple(size):
        cells = grid.output_size(size)
        return [[tiling.AxisTile(0, n, 0, c, 0)] for n, c in zip(size, cells)]
    if grid.global_context:
        raise ConversionError(
            "The network pools over the whole image (a global pooling inside, such as squeeze-and-excitation), "
            "so every cell depends on every pixel and no tiling is exact. Use `tile=None`."
        )
    minimum = grid.min_input_size
    for name, side, low in zip(("height", "width"), sides, minimum):
        if side < low:
            raise ConversionError(
                f"A tile {name} of {side} pixels is smaller than the network's minimum input of {low}. "
                f"Use tiles of at least {low}."
            )
    inner = {"at_image_start": (False, False), "at_image_end": (False, False)}
    cells, exact = grid.output_size(sides), grid.exact_cells(sides, **inner)
    shortest = [low + (n - low) % s for low, n, s in zip(minimum, size, grid.stride)]
    sides = [
        tiling.balanced_tile_length(n, t, s, c, start, c - stop, low)
        for n, t, s, c, (start, stop), low in zip(size, sides, grid.stride, cells, exact, shortest)
    ]
    cells, exact = grid.output_size(sides), grid.exact_cells(sides, **inner)
    return [
        tiling.plan_axis(n, t, s, c, start, c - stop)
        for n, t, s, c, (start, stop) in zip(size, sides, grid.stride, cells, exact)
    ]


def _pair(value, name: str) -> tuple[int, int]:
    values = (value, value) if np.isscalar(value) else tuple(value)
    if len(values) != 2 or any(int(v) != v or v < 1 for v in values):
        raise ConversionError(f"Expected `{name}` to be a positive integer or a pair of them. Received: {value!r}")
    return (int(values[0]), int(values[1]))


def _read(image, spec: _ImageSpec, rows: tiling.AxisTile, cols: tiling.AxisTile, preprocess, dtype) -> np.ndarray:
    pixels = np.asarray(image[spec.layout.image_index(slice(rows.start, rows.stop), slice(cols.start, cols.stop))])
    if preprocess is not None:
        pixels = np.asarray(preprocess(pixels.astype(np.float32)))
    return pixels.astype(dtype, copy=False)


def _input_dtype(model) -> str:
    dtype = str(model.inputs[0].dtype)
    return dtype if dtype.startswith("float") else "float32"


def _output_dtype(model) -> str:
    dtype = str(model.outputs[0].dtype)
    return dtype if dtype.startswith("float") else "float32"


def _forward_fn(model, jit_compile: bool):
    """``numpy batch -> numpy outputs``, traced once per input shape and cached per model."""
    import tensorflow as tf

    per_model = _FORWARD_CACHE.setdefault(model, {})
    if jit_compile not in per_model:
        reference = weakref.ref(model)  # the cache must not keep the model alive

        def call(x):
            live = reference()
            assert live is not None, "the model is alive while its cached function runs"
            return live(x, training=False)

        compiled = tf.function(call, jit_compile=jit_compile)
        per_model[jit_compile] = lambda batch: np.asarray(compiled(tf.constant(batch)))
    return per_model[jit_compile]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _progress_bar(total: int, progress: bool | None, unit: str):
    if progress is None:
        progress = total > 1 and sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, leave=False)
