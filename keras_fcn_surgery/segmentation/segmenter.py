"""`segmenter`: a classifier's FCN with learnable bilinear upsampling and skip connections (FCN-32s/16s/8s).

The model is built from built-in Keras layers and `keras.ops` calls only, so
it saves to ``.keras`` and loads without custom objects. Each upsampling step
is a `Conv2DTranspose` with the bilinear kernel on the class diagonal, followed
by a gather (`keras.ops.take`) that picks, for every cell of the finer grid,
the transposed convolution's output at that cell's centre: the shift comes
from the network's geometry (a frozen `Embedding` holds it per input size
modulo the stride when ``same`` padding makes it depend on that), and the
indices are clamped to the outermost cell centres, so pixels beyond them take
the nearest interpolated value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe, model_layout, output_names, producer_of
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.names import runtime_name
from keras_fcn_surgery.segmentation.alignment import AxisAlignment, align_axis, cell_centre
from keras_fcn_surgery.segmentation.bilinear import diagonal_kernel
from keras_fcn_surgery.surgery.fcn import as_fcn
from keras_fcn_surgery.taxonomy import ACTIVATION_LAYERS

# Most weights of a class-to-class upsampling kernel (16 MiB of float32); beyond it one kernel is shared.
FULL_KERNEL_LIMIT = 1 << 22


def segmenter(
    model,
    num_classes: int | None = None,
    *,
    skips="auto",
    head: str = "window",
    trainable_upsampling: bool = False,
    keep_classes=None,
    trainable: bool = True,
    custom_objects=None,
) -> keras.Model:
    """A segmentation model (FCN-32s, 16s or 8s) built on a classifier's fully convolutional network.

    The classifier is converted (`convert`), its score layer kept (its own
    classes) or replaced by a zero-initialised one, score layers are added on
    earlier feature maps (skips), and every map is upsampled to the input's
    resolution by bilinear `Conv2DTranspose` layers. Alignment comes from the
    geometry, not from padding: a coarse cell's score sits at the centre of
    its input window, ``offset + i * stride + (receptive_field - 1) / 2``, and
    each output pixel is the bilinear interpolation of the cells around it.
    With ``skips=()`` and the classifier's own classes, the output at a
    window's centre equals that cell of the FCN's map. A half-integer centre
    (even receptive field) is interpolated at the exact half position: the
    kernel side is then ``2 * stride`` (FCN's choice), else ``2 * stride - 1``.
    Pixels beyond the outermost cell centres take the value at the nearest one.

    Skip maps are fused as in FCN-8s: the coarser (fused) map is upsampled onto
    the skip's own grid (aligned by both maps' geometry), added to the skip's
    score, and so on down to the finest, which is upsampled to the pixels.

    Args:
        model: a classifier (converted with ``convert(model, head=head)``), a
            path to one, or an FCN from `convert` (it is copied, not shared).
        num_classes: ``None`` keeps the classifier's classes and score
            weights (a softmax on the score layer is dropped: the output is
            logits); an int replaces the score layer by a zero-initialised one
            with that many classes (FCN's ``score_fr``).
        skips: ``"auto"`` adds score layers on the feature maps at 1/2 and 1/4
            of the network's stride (FCN-16s/8s: pool4 and pool3 on VGG16: the
            output of the last layer that brings the stride down to that value,
            or the last map at that stride; a stride that does not exist is
            left out); ``()`` is FCN-32s; a list of layer names chooses them.
        head: passed to `convert` for global-pooling classifiers.
        trainable_upsampling: let training change the bilinear kernels. Each
            is a class-to-class `Conv2DTranspose` kernel (bilinear on the
            diagonal, as FCN); when that would hold more than
            ``FULL_KERNEL_LIMIT`` weights (1000 classes), one bilinear kernel
            is shared by all classes (a `Conv3DTranspose` over the classes).
        keep_classes: with ``num_classes``, the old classes whose score
            weights to carry across (as FCN's ``expand_score``): a sequence
            (new class ``i`` gets old class ``keep_classes[i]``) or a mapping
            ``{new: old}``.
        trainable: whether the converted network's own layers train.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        A functional `keras.Model` mapping ``(N, H, W, C)`` to logits
        ``(N, H, W, K)`` (``(N, C, H, W)`` to ``(N, K, H, W)`` for
        channels-first networks) for every size the FCN accepts.

    Raises:
        ConversionError: for a model or skip that cannot be used; the message
            names the layer and the way out.

    Example:

    ```python
    model = keras_fcn_surgery.segmenter(classifier, num_classes=21)
    model.compile("adam", keras_fcn_surgery.segmentation_loss(ignore_label=255))
    ```
    """
    fcn = _as_fcn(model, head, custom_objects)
    layout = model_layout(fcn)
    score_layer = _score_layer(fcn)
    features = score_layer.input
    for layer in fcn.layers:
        layer.trainable = trainable
    image = fcn.inputs[0]
    score = _new_score_layer(score_layer, num_classes, keep_classes)(features)
    classes = int(layout.channels(score.shape))
    coarse = geometry(keras.Model(image, score))
    # Offsets repeat with the input size modulo the coarsest stride; tabulate them from the smallest size on.
    period, first = coarse.stride, coarse.min_input_size
    maps = [_ScoreMap.of(score, keras.Model(image, score), first, period)]
    for layer, tensor in _skip_tensors(fcn, skips, coarse.stride, score_layer):
        skip_score = keras.layers.Conv2D(
            classes, 1, data_format=layout.data_format, kernel_initializer="zeros", name=f"score_{layer.name}"
        )(tensor)
        maps.append(_ScoreMap.of(skip_score, keras.Model(image, tensor), first, period))
    fused = maps[0]
    upsample = functools.partial(_upsample, classes=classes, layout=layout, trainable=trainable_upsampling)
    for skip in maps[1:]:
        name = producer_of(skip.tensor).name
        alignments = _alignments(fused, skip.stride, skip.centres, period, first)
        upsampled = upsample(fused.tensor, alignments, name=f"up{name}")
        aligned = _gather(upsampled, skip.tensor, image, alignments, layout, f"up{name}")
        total = keras.layers.Add(name=f"fuse_{name[len('score_') :]}")([aligned, skip.tensor])
        fused = _ScoreMap(total, skip.centres, skip.stride)
    pixels = [[0.0] * (2 * p) for p in period]
    alignments = _alignments(fused, (1, 1), pixels, period, first)
    upsampled = upsample(fused.tensor, alignments, name="upscore")
    logits = _gather(upsampled, image, image, alignments, layout, "upscore")
    return keras.Model(image, logits, name=runtime_name(fcn.name, "segmenter"))


@dataclass(frozen=True)
class _ScoreMap:
    """A score map on the way to the pixels: its tensor, cell 0's centre per axis and input length, its stride."""

    tensor: object
    centres: list
    stride: tuple

    @classmethod
    def of(cls, tensor, sub_model, first, period) -> _ScoreMap:
        return cls(tensor, _centres(sub_model, first, period), geometry(sub_model).stride)


def _as_fcn(model, head: str, custom_objects) -> keras.Model:
    """A copy of the FCN to build on: the segmenter retrains its layers, which ``model`` (or the conversion
    `as_fcn` keeps for later calls) must not share."""
    fcn = as_fcn(model, head=head, custom_objects=custom_objects)
    copy = keras.models.clone_model(fcn)
    copy.set_weights(fcn.get_weights())
    return copy


def _score_layer(fcn):
    """The layer that computes the class scores: the output's producer, activation layers stepped over."""
    if len(fcn.outputs) != 1:
        names = ", ".join(map(repr, output_names(fcn)))
        raise ConversionError(
            f"Model '{fcn.name}' has {len(fcn.outputs)} outputs ({names}); a segmenter upsamples one map of "
            "class scores. Build it on a model of that output alone: "
            "`keras.Model(model.input, model.get_layer(NAME).output)`."
        )
    layer = producer_of(fcn.outputs[0])
    while isinstance(layer, ACTIVATION_LAYERS):
        layer = producer_of(layer.input)
    if type(layer) not in taxonomy.PLAIN_CONVOLUTIONS:
        found = describe(layer) if layer is not None else "an input"
        raise ConversionError(
            f"The scores of '{fcn.name}' come from {found}; a segmenter needs a Conv2D score layer "
            "(what `convert` makes of a Dense head). Convert a classifier with a Dense head."
        )
    return layer


def _new_score_layer(old, num_classes, keep_classes):
    config = old.get_config()
    config["activation"] = "linear"
    config["trainable"] = True
    kernel = keras.ops.convert_to_numpy(old.kernel)
    bias = keras.ops.convert_to_numpy(old.bias) if old.use_bias else None
    if num_classes is None:
        if keep_classes is not None:
            raise ConversionError("`keep_classes` needs `num_classes`: the new number of classes.")
        layer = keras.layers.Conv2D.from_config({**config, "name": f"{old.name}_logits"})
        new_kernel, new_bias = kernel, bias
    else:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ConversionError(f"Expected `num_classes` to be a positive integer. Received: {num_classes!r}")
        layer = keras.layers.Conv2D.from_config({**config, "filters": int(num_classes), "name": "score_fr"})
        new_kernel = np.zeros(kernel.shape[:-1] + (int(num_classes),), kernel.dtype)
        new_bias = np.zeros((int(num_classes),), kernel.dtype) if bias is not None else None
        for new, old_class in _class_map(keep_classes, int(num_classes), kernel.shape[-1], old).items():
            new_kernel[..., new] = kernel[..., old_class]
            if bias is not None:
                new_bias[new] = bias[old_class]
    layer.build(old.input.shape)
    layer.set_weights([new_kernel] if new_bias is None else [new_kernel, new_bias])
    return layer


def _class_map(keep_classes, num_classes: int, old_classes: int, old) -> dict[int, int]:
    if keep_classes is None:
        return {}
    pairs = dict(keep_classes) if isinstance(keep_classes, Mapping) else dict(enumerate(keep_classes))
    for new, old_class in pairs.items():
        if not 0 <= int(new) < num_classes:
            raise ConversionError(f"`keep_classes` maps to class {new}, but num_classes={num_classes}.")
        if not 0 <= int(old_class) < old_classes:
            raise ConversionError(
                f"`keep_classes` names old class {old_class}, but {describe(old)} has {old_classes} classes."
            )
    return {int(k): int(v) for k, v in pairs.items()}


def _skip_tensors(fcn, skips, stride, score_layer) -> list:
    """``[(layer, tensor)]`` of the skip maps, coarsest first."""
    candidates = []
    for layer in fcn.layers:
        if layer is score_layer:
            break
        if isinstance(layer, taxonomy.INPUTS):
            continue
        candidates.append(layer)
    if isinstance(skips, str):
        if skips != "auto":
            raise ConversionError(f"Expected `skips` to be 'auto', () or a list of layer names. Received: {skips!r}")
        return _auto_skips(fcn, candidates, stride)
    if skips is None:
        return []
    if not isinstance(skips, Sequence):
        raise ConversionError(f"Expected `skips` to be 'auto', () or a list of layer names. Received: {skips!r}")
    by_name = {layer.name: layer for layer in candidates}
    chosen = []
    for name in skips:
        if name not in by_name:
            raise ConversionError(
                f"Skip layer '{name}' is not a layer of '{fcn.name}' before its score layer. "
                f"Choose among: {', '.join(by_name)}."
            )
        layer = by_name[name]
        if len(layer.output.shape) != 4:
            raise ConversionError(f"Skip layer {describe(layer)} does not output a feature map.")
        chosen.append((layer, layer.output))
    strides = {id(layer): _stride(fcn, layer.output) for layer, _ in chosen}
    chosen.sort(key=lambda pair: -max(strides[id(pair[0])]))
    return chosen


def _auto_skips(fcn, candidates, stride) -> list:
    strides: dict[int, tuple[int, int]] = {}

    def stride_of(tensor):
        if id(tensor) not in strides:
            strides[id(tensor)] = _stride(fcn, tensor)
        return strides[id(tensor)]

    chosen = []
    for divisor in (2, 4):
        if any(s % divisor for s in stride):
            break
        wanted = tuple(s // divisor for s in stride)
        at_stride, downsampling = [], []
        for layer in candidates:
            try:  # a layer called more than once has no single output: it is not a candidate
                output, inputs = layer.output, layer.input
                if len(output.shape) != 4 or stride_of(output) != wanted:
                    continue
            except (ConversionError, ValueError, AttributeError):
                continue
            at_stride.append(layer)
            inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
            if all(stride_of(t) != wanted for t in inputs):
                downsampling.append(layer)
        pick = (downsampling or at_stride or [None])[-1]
        if pick is None:
            break
        chosen.append((pick, pick.output))
    return chosen


def _stride(fcn, tensor) -> tuple[int, int]:
    if tensor is fcn.inputs[0]:
        return (1, 1)
    return geometry(keras.Model(fcn.inputs[0], tensor)).stride


def _centres(sub_model, first, period) -> list[list[float]]:
    """Per axis, cell 0's centre at input lengths ``first .. first + 2 * period - 1``."""
    base = geometry(sub_model)
    if not base.exact:
        raise ConversionError(
            f"A segmenter places each cell at the centre of its window, but the window of '{sub_model.name}' "
            f"is unknown: {base.unknown[0]}. Use built-in layers (or layers made of them) in the network."
        )
    axes: list[list[float]] = [[], []]
    for k in range(2 * max(period)):
        size = (first[0] + k, first[1] + k)
        grid = base.at(size)
        for axis, info in enumerate((grid.height, grid.width)):
            if k < 2 * period[axis] and info.offset is not None and info.receptive_field is not None:
                axes[axis].append(cell_centre(info.offset, info.receptive_field))
    return axes


def _alignments(coarse: _ScoreMap, fine_stride, fine_centres, period, first) -> list[AxisAlignment]:
    try:
        return [
            align_axis(coarse.stride[a], fine_stride[a], coarse.centres[a], fine_centres[a], period[a], first[a])
            for a in (0, 1)
        ]
    except ValueError as error:
        raise ConversionError(
            f"Cannot align a map of stride {coarse.stride} with one of stride {tuple(fine_stride)}: {error} "
            "Choose other skip layers (or `skips=()`)."
        ) from error


def _upsample(scores, alignments, *, classes: int, layout: Layout, trainable: bool, name: str):
    """The bilinear transposed convolution of ``scores`` with one replicated cell around it.

    The replicated border makes the transposed convolution's output constant
    between the outermost cell's peak and its copy's, so the clamped gather in
    `_gather` gives the outermost value whether the peaks fall on whole or on
    half positions.
    """
    size = (alignments[0].kernel_size, alignments[1].kernel_size)
    strides = (alignments[0].ratio, alignments[1].ratio)
    pad = [[0, 0], [0, 0], [0, 0], [0, 0]]
    for axis in layout.spatial_axes:
        pad[axis] = [1, 1]
    padded = ops.pad(scores, pad, mode="symmetric")
    if size[0] * size[1] * classes * classes <= FULL_KERNEL_LIMIT:
        layer = keras.layers.Conv2DTranspose(
            classes,
            size,
            strides=strides,
            padding="valid",
            use_bias=False,
            data_format=layout.data_format,
            trainable=trainable,
            name=name,
        )
        output = layer(padded)
        layer.set_weights([diagonal_kernel(size, classes)])
        return output
    # Many classes: a K x K kernel would not fit, so every class goes through one shared bilinear
    # kernel: the classes become the depth axis of a Conv3DTranspose whose kernel spans one of them.
    by_class = padded if layout.channels_first else ops.transpose(padded, (0, 3, 1, 2))
    layer = keras.layers.Conv3DTranspose(
        1,
        (1, *size),
        strides=(1, *strides),
        padding="valid",
        use_bias=False,
        data_format="channels_last",
        trainable=trainable,
        name=name,
    )
    output = ops.squeeze(layer(ops.expand_dims(by_class, -1)), -1)
    layer.set_weights([diagonal_kernel(size, 1)[None]])
    return output if layout.channels_first else ops.transpose(output, (0, 2, 3, 1))


def _gather(upsampled, target, image, alignments, layout: Layout, name: str):
    """Pick, for each cell of ``target``'s grid, the upsampled value at its centre (clamped to the outer centres)."""
    result = upsampled
    for axis, alignment in zip(layout.spatial_axes, alignments):
        positions = ops.cumsum(_ones_along(target, axis)) - 1.0
        # The replicated border cell comes first: cell 0's peak is one ratio further on.
        shift = _shift(alignment, image, axis, f"{name}_shift{axis}")
        length = ops.sum(_ones_along(upsampled, axis))
        low = math.floor(alignment.ratio + alignment.margin)
        high = ops.ceil(length - 1.0 - alignment.margin - alignment.ratio)
        index = ops.minimum(ops.maximum(positions + shift + float(alignment.ratio), float(low)), high)
        result = ops.take(result, ops.cast(index, "int32"), axis=axis)
    return result


def _ones_along(tensor, axis: int):
    others = tuple(a for a in range(4) if a != axis)
    return ops.max(ops.ones_like(tensor), axis=others)


def _shift(alignment: AxisAlignment, image, axis: int, name: str):
    if alignment.constant:
        return float(alignment.shifts[0])
    length = ops.sum(_ones_along(image, axis))
    residue = ops.reshape(ops.cast(ops.mod(length, float(alignment.period)), "int32"), (1,))
    table = keras.layers.Embedding(alignment.period, 1, trainable=False, name=name)
    shift = ops.reshape(table(residue), ())
    table.set_weights([np.asarray(alignment.shifts, dtype="float32")[:, None]])
    return shift
