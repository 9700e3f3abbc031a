"""Preprocessing inside a classifier: layers that are the identity at inference (random augmentations, the
Dropout family) leave the graph; a `CenterCrop` of the classifier's input becomes the `Cropping2D` it is."""

from __future__ import annotations

import keras

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.surgery.rules.base import NodeView, Rewrite, Rule, Spatial, Step, pass_through


class InferenceIdentityRule(Rule):
    """A layer that returns its input at inference is dropped, in any mode, nested models included.

    Its output is its input: the converted model and the files exported from
    it hold no augmentation or noise layer, so no random operation reaches a
    runtime, and a recorded ``training=True`` (a `Sequential` of augmentations
    built outside a model records it) cannot turn one on. The plan does not
    list it: it changes nothing.
    """

    layers = taxonomy.INFERENCE_IDENTITY

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        return None if mode is None else pass_through(mode)


class CenterCropRule(Rule):
    """A `CenterCrop` of a map of known size is a `Cropping2D` of fixed margins, which any larger map takes.

    Keras crops ``(H - h) // 2`` rows from the top and the rest from the
    bottom (columns alike); the FCN crops the same margins from a larger map,
    so each window of the image is cropped as the classifier crops its input.
    A map smaller than the crop (which Keras resizes up) is left to the body
    rules, which refuse it by name.
    """

    layers = taxonomy.CENTER_CROPS
    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        layer = view.layer
        shape = view.input_shapes[0] if view.input_shapes else ()
        if mode is None or len(shape) != 4:
            return None
        size = view.context.spatial_shape(shape)
        target = (int(layer.height), int(layer.width))
        if any(d is None for d in size) or any(n < t for n, t in zip(size, target)):
            return None
        margins = tuple(((n - t) // 2, n - t - (n - t) // 2) for n, t in zip(size, target))
        data_format = view.context.data_format

        def build(args, kwargs):
            return [keras.layers.Cropping2D(margins, data_format=data_format, name=layer.name)(args[0])]

        detail = f"crops {margins[0][0]},{margins[0][1]} rows and {margins[1][0]},{margins[1][1]} columns"
        rewrite = Rewrite(layer.name, type(layer).__name__, (tuple(shape),), "Cropping2D", (), 0, detail)
        return Step([mode], build, rewrite)
