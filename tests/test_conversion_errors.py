"""Every model that cannot be converted faithfully gets a ConversionError naming the layer."""

import keras
import pytest
from keras import layers

import keras_fcn_surgery as kfs


def _conv_body(size=16):
    inputs = keras.Input((size, size, 3), name="image")
    return inputs, layers.Conv2D(4, 3, strides=2, name="conv")(inputs)


def _raises(model, *fragments, **kwargs):
    with pytest.raises(kfs.ConversionError) as info:
        kfs.convert(model, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_conversion_error_is_a_value_error():
    assert issubclass(kfs.ConversionError, ValueError)


def test_subclassed_model_with_an_unsupported_head_is_refused_naming_its_layer():
    # Subclassed models are traced into functional graphs (tests/test_subclassed.py); what cannot become a score
    # map in them is refused like in any other model: here a Dense on `keras.ops.std` over the map.
    class Classifier(keras.Model):
        def __init__(self):
            super().__init__(name="my_classifier")
            self.conv = layers.Conv2D(4, 3)
            self.head = layers.Dense(2, name="scores")

        def call(self, x):
            return self.head(keras.ops.std(self.conv(x), axis=(1, 2)))

    model = Classifier()
    model(keras.ops.zeros((1, 8, 8, 3)))
    _raises(model, "'scores' (Dense)", "does not come from a Flatten + Dense or global-pooling head")


def test_dense_after_rnn():
    inputs, x = _conv_body()
    sequence = layers.Reshape((49, 4), name="to_sequence")(x)
    outputs = layers.Dense(2, name="head")(layers.LSTM(5, return_sequences=True, name="lstm")(sequence))
    _raises(keras.Model(inputs, outputs), "'to_sequence' (Reshape)", "one input size")


def test_dense_on_rank3_sequence_input():
    inputs = keras.Input((10, 4), name="tokens")
    model = keras.Model(inputs, layers.Dense(2, name="dense_3")(layers.LSTM(3, return_sequences=True)(inputs)))
    _raises(model, "Input 'tokens'", "rank-4 image inputs")


def test_dense_on_rank3_tensor_inside_an_image_model():
    inputs, x = _conv_body()
    squeezed = layers.Lambda(lambda t: t[:, 0], output_shape=(7, 4), name="take_row")(x)
    model = keras.Model(inputs, layers.Dense(2, name="dense_3")(squeezed))
    _raises(model, "'dense_3' (Dense)", "rank-3", "Flatten or global pooling")


def test_flatten_of_unknown_spatial_size():
    inputs, x = _conv_body()
    unknown = layers.Lambda(lambda t: t, output_shape=(None, None, 4), name="opaque")(x)
    model = keras.Model(inputs, layers.Flatten(name="flat")(unknown))
    _raises(model, "'flat' (Flatten)", "unknown size", "input_size")


def test_reshape_in_the_head():
    inputs, x = _conv_body()
    hidden = layers.Dense(8, name="fc")(layers.Flatten()(x))
    model = keras.Model(inputs, layers.Dense(2)(layers.Reshape((2, 4), name="split")(hidden)))
    _raises(model, "'split' (Reshape)", "would be wrong", "remove or replace")


def test_lambda_in_the_head():
    inputs, x = _conv_body()
    hidden = layers.Dense(8, name="fc")(layers.Flatten()(x))
    model = keras.Model(inputs, layers.Lambda(lambda t: t * 2, name="double")(hidden))
    _raises(model, "'double' (Lambda)", "classifier head")


def test_layernorm_on_flattened_features():
    inputs, x = _conv_body()
    normalized = layers.LayerNormalization(name="flat_ln")(layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, layers.Dense(2)(normalized))
    _raises(model, "'flat_ln' (LayerNormalization)", "Flatten 'flat'")


def test_activation_between_a_folded_batchnorm_and_its_dense():
    inputs, x = _conv_body()
    normalized = layers.BatchNormalization(name="flat_bn")(layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, layers.Dense(2)(layers.ReLU(name="relu_after_bn")(normalized)))
    _raises(model, "'relu_after_bn' (ReLU)", "Flatten 'flat'")


def test_layer_shared_between_head_and_elsewhere():
    inputs, x = _conv_body()
    shared = layers.Dense(4, name="shared_dense")
    pointwise = shared(x)  # a Dense on a 4-D map: part of the body
    model = keras.Model(inputs, shared(layers.GlobalAveragePooling2D()(pointwise)))
    _raises(model, "'shared_dense' (Dense)", "shared")


def test_head_mixed_with_a_spatial_map():
    inputs, x = _conv_body()
    head = layers.Dense(4, name="fc")(layers.Flatten()(x))
    model = keras.Model(inputs, layers.Add(name="mix")([head, layers.Conv2D(4, 1)(x)]))
    _raises(model, "'mix' (Add)", "spatial")


def test_input_with_unknown_channels():
    inputs = keras.Input((8, 8, None), name="any_channels")
    model = keras.Model(inputs, layers.Lambda(lambda t: t, name="identity")(inputs))
    _raises(model, "Input 'any_channels'", "channels")


def test_resizing_layer_ties_the_model_to_one_size():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(2, 3, name="conv")(layers.Resizing(8, 8, name="resize")(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    _raises(model, "'resize' (Resizing)", "Remove it")


def test_wide_convolution_on_the_head_map():
    inputs, x = _conv_body()
    pooled = layers.GlobalAveragePooling2D(keepdims=True)(x)
    model = keras.Model(inputs, layers.Conv2D(2, 3, padding="same", name="wide")(pooled))
    _raises(model, "'wide' (Conv2D)", "1x1 kernel")


def test_unknown_head_option():
    inputs, x = _conv_body()
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    _raises(model, "head='global'", head="global")


def test_not_a_model():
    with pytest.raises(kfs.ConversionError, match="Received: int"):
        kfs.convert(3)


def test_output_that_is_not_a_head():
    inputs, x = _conv_body()
    reduced = layers.Lambda(lambda t: keras.ops.mean(t, axis=(1, 2)), output_shape=(4,), name="reduce")(x)
    _raises(keras.Model(inputs, reduced), "'reduce' (Lambda)", "Supported heads")


def test_batchnorm_over_a_spatial_axis_in_the_body():
    # Found by the fuzz tests: the copy could not be built on a map of any size (bare ValueError).
    inputs, x = _conv_body()
    x = layers.BatchNormalization(axis=1, name="bn_rows")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    _raises(model, "'bn_rows' (BatchNormalization)", "axis 1", "spatial axis", "axis=3")


def test_dense_on_a_channels_first_map_reads_the_width():
    inputs = keras.Input((3, 16, 16))
    x = layers.Conv2D(4, 3, strides=2, data_format="channels_first")(inputs)
    x = layers.Dense(5, name="per_row")(x)
    pooled = layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    _raises(keras.Model(inputs, layers.Dense(2)(pooled)), "'per_row' (Dense)", "axis 3", "1x1 Conv2D")


def test_layer_normalization_over_the_whole_map():
    inputs, x = _conv_body()
    x = layers.LayerNormalization(axis=[1, 2, 3], name="ln_all")(x)
    _raises(keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x))), "'ln_all' (LayerNormalization)", "spatial")


def test_input_size_with_channels():
    inputs, x = _conv_body()
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    _raises(model, "(height, width)", "channels", input_size=(16, 16, 3))
