"""Small model factories used across the tests (random weights, built offline)."""

import keras
from keras import layers


def small_flatten_cnn(
    input_size=(32, 32), channels=3, classes=5, data_format="channels_last", flatten_format=None, softmax=True
):
    """conv/pool body, then Flatten + Dense + Dropout + Dense(softmax, or linear with ``softmax=False``)."""
    shape = (*input_size, channels) if data_format == "channels_last" else (channels, *input_size)
    return keras.Sequential(
        [
            keras.Input(shape, name="image"),
            layers.Conv2D(8, 3, activation="relu", data_format=data_format, name="conv1"),
            layers.MaxPooling2D(2, data_format=data_format, name="pool1"),
            layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", data_format=data_format, name="conv2"),
            layers.Flatten(data_format=flatten_format or data_format, name="flatten"),
            layers.Dense(16, activation="relu", name="fc1"),
            layers.Dropout(0.5, name="drop1"),
            layers.Dense(classes, activation="softmax" if softmax else None, name="fc2"),
        ],
        name="small_flatten_cnn",
    )


def valid_gap_cnn(input_size=(24, 24), classes=4, pooling="avg", softmax=True):
    """A valid-padding network with a global-pooling head (sliding-window equivalence holds exactly)."""
    pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
    return keras.Sequential(
        [
            keras.Input((*input_size, 3)),
            layers.Conv2D(8, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(16, 3, activation="relu", name="conv2"),
            layers.AveragePooling2D(2, name="pool2"),
            pool(name="gap"),
            layers.Dense(classes, activation="softmax" if softmax else None, name="logits"),
        ],
        name="valid_gap_cnn",
    )
