"""Image classifiers written as the TensorFlow and keras.io tutorials and the model zoos write them (issue 36).

Tiny (16 x 16 inputs, a few filters, random weights): what matters is their
shape, the layers people put inside them (augmentation, preprocessing,
Resizing, custom layers, subclassed models), not their size. Each `Case`
says what `predict_map` must do with it: the method it chooses and an exact
certificate, or a one-line refusal naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

SIZE = 16


def data_augmentation():
    """The tutorials' augmentation block: a nested `Sequential` built outside the model."""
    return keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.1)],
        name="data_augmentation",
    )


def images(count=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype("float32")


def augmented_rescaling_cnn():
    """tensorflow.org "Image classification": augmentation, Rescaling(1/255), conv/pool, Dropout, Flatten, Dense."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = data_augmentation()(inputs)
    x = layers.Rescaling(1.0 / 255)(x)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(6, 3, activation="relu")(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(8, activation="relu")(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="augmented_cnn")


def augmented_preprocess_input():
    """Transfer learning: augmentation, `mobilenet_v2.preprocess_input`, a small base, GAP, Dropout, Dense."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = data_augmentation()(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="transfer")


def adapted_normalization():
    """keras.io "Image classification from scratch" style: `Normalization` adapted to the data first."""
    norm = layers.Normalization()
    norm.adapt(images())
    inputs = keras.Input((SIZE, SIZE, 3))
    x = norm(inputs)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="adapted_normalization")


def given_mean_variance():
    """`Normalization(mean=..., variance=...)` (ImageNet's), GaussianNoise, a GAP head."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Normalization(mean=[123.7, 116.3, 103.5], variance=[3409.0, 3262.7, 3291.0])(inputs)
    x = layers.GaussianNoise(0.1)(x)
    x = layers.Conv2D(6, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="given_mean_variance")


def dropout_family():
    """Every layer of the Dropout family, GaussianDropout and ActivityRegularization inside a conv body."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1.0 / 127.5, offset=-1)(inputs)
    x = layers.Conv2D(6, 3, activation="selu")(x)
    x = layers.SpatialDropout2D(0.2)(x)
    x = layers.AlphaDropout(0.1)(x)
    x = layers.GaussianDropout(0.1)(x)
    x = layers.ActivityRegularization(l1=0.01)(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="dropout_family")


def separable_residual():
    """keras.io's Xception-like "mini" net: Rescaling, SeparableConv2D blocks with 1x1 strided residuals."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    previous = x
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(8, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    residual = layers.Conv2D(8, 1, strides=2, padding="same")(previous)
    x = layers.add([x, residual])
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.25)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="separable_residual")


def same_padding_flatten():
    """The TensorFlow tutorial's CNN: `same` convolutions, max pooling, Flatten, Dense."""
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(6, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(8, activation="relu"),
            layers.Dense(3),
        ],
        name="same_padding_flatten",
    )
    return model


def multi_label():
    """A multi-label head: GlobalMaxPooling2D and one sigmoid per label."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(6, 3, activation="relu")(x)
    x = layers.Conv2D(6, 3, activation="relu")(x)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(5, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="multi_label")


def center_crop_first():
    """keras.io style: `CenterCrop` of the classifier's own 20 x 20 input to 15 x 16 (uneven margins), then a CNN."""
    inputs = keras.Input((SIZE + 4, SIZE + 4, 3))
    x = layers.CenterCrop(SIZE - 1, SIZE, name="center_crop")(inputs)
    x = layers.Rescaling(1.0 / 255)(x)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="center_crop_first")


def resizing_first():
    """Transfer-learning code's `Resizing` first: nothing convolves at the caller's size, nothing is shared."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Resizing(24, 24)(inputs)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="resizing_first")


@keras.saving.register_keras_serializable(package="tutorial")
class Patches(layers.Layer):
    """keras.io "Image classification with Vision Transformer": patches from `keras.ops.image.extract_patches`."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        shape = ops.shape(images)
        patches = keras.ops.image.extract_patches(images, size=self.patch_size)
        count = (shape[1] // self.patch_size) * (shape[2] // self.patch_size)
        return ops.reshape(patches, (shape[0], count, self.patch_size * self.patch_size * shape[-1]))

    def get_config(self):
        config = super().get_config()
        config.update({"patch_size": self.patch_size})
        return config


@keras.saving.register_keras_serializable(package="tutorial")
class PatchEncoder(layers.Layer):
    """keras.io's ViT: a projection of each patch plus a learned position embedding."""

    def __init__(self, num_patches, projection_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection_dim = projection_dim
        self.projection = layers.Dense(projection_dim)
        self.position_embedding = layers.Embedding(num_patches, projection_dim)

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.position_embedding.build((1, self.num_patches))

    def call(self, patch):
        positions = ops.expand_dims(ops.arange(0, self.num_patches, 1), axis=0)
        return self.projection(patch) + self.position_embedding(positions)

    def get_config(self):
        config = super().get_config()
        config.update({"num_patches": self.num_patches, "projection_dim": self.projection_dim})
        return config


def keras_io_vit():
    """keras.io's ViT, tiny: augmentation with Resizing inside, Patches, PatchEncoder, one transformer block."""
    inputs = keras.Input((SIZE, SIZE, 3))
    augmented = keras.Sequential(
        [layers.Normalization(mean=0.0, variance=255.0**2), layers.Resizing(24, 24), layers.RandomFlip()],
        name="data_augmentation",
    )(inputs)
    patches = Patches(6)(augmented)
    encoded = PatchEncoder(16, 8)(patches)
    x = layers.LayerNormalization(epsilon=1e-6)(encoded)
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.1)(x, x)
    x = layers.Add()([attention, encoded])
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="keras_io_vit")


@keras.saving.register_keras_serializable(package="tutorial")
class _Net(keras.Model):
    """A subclassed model whose class name starts with an underscore (Keras names it ``__net``), flipping first."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flip = layers.RandomFlip("horizontal")
        self.scale = layers.Rescaling(1.0 / 255)
        self.conv = layers.Conv2D(6, 3, activation="relu")
        self.drop = layers.Dropout(0.3)
        self.pool = layers.MaxPooling2D()
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(3)

    def call(self, x, training=False):
        x = self.pool(self.conv(self.scale(self.flip(x))))
        return self.dense(self.flatten(self.drop(x, training=training)))


def subclassed_underscore():
    model = _Net()
    model(np.zeros((1, SIZE, SIZE, 3), "float32"))
    return model


def image_and_metadata():
    """An image and a vector of metadata (two inputs): no map, refused in one line."""
    image = keras.Input((SIZE, SIZE, 3), name="image")
    metadata = keras.Input((4,), name="metadata")
    x = layers.Conv2D(4, 3, activation="relu")(image)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Concatenate()([x, metadata])
    outputs = layers.Dense(3)(x)
    return keras.Model([image, metadata], outputs, name="image_and_metadata")


def random_crop_inside():
    """`RandomCrop` is not the identity at inference (it crops to its size): refused by name."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.RandomCrop(12, 12, name="random_crop")(inputs)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="random_crop_inside")


@dataclass(frozen=True)
class Case:
    """A classifier and what `predict_map` must do with it.

    ``method``: the method ``auto`` chooses (``"fcn"`` or ``"windowed"``), or
    None when it is refused: ``refusal`` is then a pattern the one-line error
    must match (it names the layer). ``stride``: the windowed map's stride,
    which a classifier without an FCN needs.
    """

    name: str
    build: Callable[[], keras.Model]
    method: str | None
    stride: int | None = None
    refusal: str = ""

    @property
    def exportable(self) -> bool:
        """Whether it has an FCN to export (a windowed map is the classifier's own, with no file of its own)."""
        return self.method == "fcn"


CASES = (
    Case("augmented_rescaling_cnn", augmented_rescaling_cnn, "fcn"),
    Case("augmented_preprocess_input", augmented_preprocess_input, "fcn"),
    Case("adapted_normalization", adapted_normalization, "fcn"),
    Case("given_mean_variance", given_mean_variance, "fcn"),
    Case("dropout_family", dropout_family, "fcn"),
    Case("separable_residual", separable_residual, "fcn"),
    Case("same_padding_flatten", same_padding_flatten, "fcn"),
    Case("multi_label", multi_label, "fcn"),
    Case("center_crop_first", center_crop_first, "fcn"),
    Case("resizing_first", resizing_first, "windowed", stride=4),
    Case("keras_io_vit", keras_io_vit, "windowed", stride=4),
    Case("subclassed_underscore", subclassed_underscore, "fcn"),
    Case("image_and_metadata", image_and_metadata, None, refusal=r"2 inputs"),
    Case("random_crop_inside", random_crop_inside, None, stride=2, refusal=r"'random_crop'"),
)
