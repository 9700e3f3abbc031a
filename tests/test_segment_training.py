"""Training a segmenter: the void-label loss, fit on same-size and varying-size batches, skips that help."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_images
from test_segment import pooled_net

import keras_fcn_surgery as kfs

VOID = 255


def test_loss_ignores_the_void_label():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7, 4)).astype("float32")
    labels = rng.integers(0, 4, (2, 5, 7))
    labels[0, :2] = VOID
    labels[1, :, 5:] = VOID
    loss = float(kfs.segmentation_loss()(labels, logits))
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != VOID
    picked = np.take_along_axis(log_probabilities, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -picked[valid].mean(), rtol=1e-5)


def test_loss_refuses_channels_first_logits_with_the_way_out():
    with pytest.raises(kfs.ConversionError, match="Permute"):
        kfs.segmentation_loss(data_format="channels_first")


def squares(count, size=32, seed=0):
    """Scenes of small red and green squares on grey noise; labels 0 background, 1 red, 2 green."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3, 0.5, (count, size, size, 3)).astype("float32")
    labels = np.zeros((count, size, size), "int32")
    for image, label in zip(images, labels):
        for _ in range(3):
            side = int(rng.integers(3, 7))
            top, left = rng.integers(0, size - side, 2)
            kind = int(rng.integers(1, 3))
            image[top : top + side, left : left + side] = (1.0, 0.0, 0.0) if kind == 1 else (0.0, 1.0, 0.0)
            label[top : top + side, left : left + side] = kind
    return images, labels


def _train(skips, x, y, epochs):
    keras.utils.set_random_seed(0)
    model = kfs.segmenter(pooled_net(classes=3), num_classes=3, skips=skips)
    model.compile(keras.optimizers.Adam(1e-2), kfs.segmentation_loss(), jit_compile=False)
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    return model, history.history["loss"]


@pytest.mark.heavy
def test_fit_lowers_the_loss_and_skips_help_on_small_squares():
    x, y = squares(64)
    x_test, y_test = squares(32, seed=1)
    fcn32, losses32 = _train((), x, y, epochs=12)
    fcn8, losses8 = _train("auto", x, y, epochs=12)
    assert losses32[-1] < 0.8 * losses32[0]
    assert losses8[-1] < 0.8 * losses8[0]
    test32 = float(kfs.segmentation_loss()(y_test, fcn32.predict(x_test, verbose=0)))
    test8 = float(kfs.segmentation_loss()(y_test, fcn8.predict(x_test, verbose=0)))
    assert test8 < 0.9 * test32, (test8, test32)


def test_fit_on_varying_sizes_with_padded_batches_void_label_and_a_frozen_backbone():
    sizes = [(21, 33), (32, 24), (17, 17), (28, 40)]

    def examples():
        for index, (h, w) in enumerate(sizes * 2):
            x, y = squares(1, size=max(h, w), seed=index)
            yield x[0, :h, :w], y[0, :h, :w]

    dataset = tf.data.Dataset.from_generator(
        examples,
        output_signature=(
            tf.TensorSpec((None, None, 3), tf.float32),
            tf.TensorSpec((None, None), tf.int32),
        ),
    ).padded_batch(2, padding_values=(0.0, VOID))
    model = kfs.segmenter(pooled_net(classes=3), num_classes=3, trainable=False)
    backbone = model.get_layer("conv1").get_weights()[0].copy()
    upscore = model.get_layer("upscore").get_weights()[0].copy()
    iou = keras.metrics.MeanIoU(3, ignore_class=VOID, sparse_y_pred=False)
    model.compile(keras.optimizers.Adam(1e-2), kfs.segmentation_loss(), metrics=[iou], jit_compile=False)
    history = model.fit(dataset, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_array_equal(backbone, model.get_layer("conv1").get_weights()[0])
    np.testing.assert_array_equal(upscore, model.get_layer("upscore").get_weights()[0])


@pytest.mark.heavy
def test_fine_tuning_changes_the_backbone_on_batches_of_one_of_any_size():
    model = kfs.segmenter(pooled_net(classes=3), num_classes=3, trainable_upsampling=True)
    before = [model.get_layer(n).get_weights()[0].copy() for n in ("conv1", "upscore")]
    model.compile(keras.optimizers.Adam(1e-2), kfs.segmentation_loss(), jit_compile=False)
    rng = np.random.default_rng(3)
    for size in [(19, 27), (24, 17), (19, 27)]:
        model.fit(random_images((1, *size, 3)), rng.integers(0, 3, (1, *size)), epochs=2, verbose=0)
    for name, weights in zip(("conv1", "upscore"), before):
        assert not np.array_equal(weights, model.get_layer(name).get_weights()[0]), name
