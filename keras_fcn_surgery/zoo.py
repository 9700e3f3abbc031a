"""Small reference architectures built in code (random weights, nothing downloaded)."""

from __future__ import annotations

import keras
from keras import layers


def caffenet(num_classes: int = 1000, input_size: int = 227, seed: int | None = 0) -> keras.Sequential:
    """The CaffeNet (AlexNet) architecture of Caffe's net-surgery example.

    conv1..conv5 with Caffe's kernel sizes, strides, paddings and groups, three
    3x3/2 max poolings, then fc6 (4096) - fc7 (4096) - fc8 (``num_classes``)
    with dropout and a softmax. At 227 x 227 pool5 is 6 x 6 x 256, so fc6 holds
    9216 x 4096 weights. Local response normalization is left out (Keras has no
    such layer; it does not change any shape). Weights are random (``seed``).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((input_size, input_size, 3), name="data"),
            layers.Conv2D(96, 11, strides=4, activation="relu", name="conv1"),
            layers.MaxPooling2D(3, strides=2, name="pool1"),
            layers.ZeroPadding2D(2, name="pad2"),
            layers.Conv2D(256, 5, groups=2, activation="relu", name="conv2"),
            layers.MaxPooling2D(3, strides=2, name="pool2"),
            layers.ZeroPadding2D(1, name="pad3"),
            layers.Conv2D(384, 3, activation="relu", name="conv3"),
            layers.ZeroPadding2D(1, name="pad4"),
            layers.Conv2D(384, 3, groups=2, activation="relu", name="conv4"),
            layers.ZeroPadding2D(1, name="pad5"),
            layers.Conv2D(256, 3, groups=2, activation="relu", name="conv5"),
            layers.MaxPooling2D(3, strides=2, name="pool5"),
            layers.Flatten(name="flatten"),
            layers.Dense(4096, activation="relu", name="fc6"),
            layers.Dropout(0.5, name="drop6"),
            layers.Dense(4096, activation="relu", name="fc7"),
            layers.Dropout(0.5, name="drop7"),
            layers.Dense(num_classes, name="fc8"),
            layers.Softmax(name="prob"),
        ],
        name="caffenet",
    )
