"""keras-hub image classifiers (issue 9): convert from the `*ImageClassifier` task itself, or are refused by name.

Built from small configs with random weights (presets would be downloaded).
keras-hub is in the ``test`` extra.
"""

import keras
import numpy as np
import pytest
from zoo_cases import HUB_CNN_FAMILIES, check_classifier, check_windowed, hub_classifier

import keras_fcn_surgery as kfs

keras_hub = pytest.importorskip("keras_hub")


@pytest.mark.parametrize("family", HUB_CNN_FAMILIES + ["MobileNetV5"])
def test_cnn_classifier_tasks_convert_verify_and_map(family):
    task = hub_classifier(family)
    assert isinstance(task, keras.Model) and type(task).__name__.endswith("ImageClassifier")
    outcome = check_classifier(task, name=family)
    assert outcome.heads == list(kfs.HEADS)
    assert outcome.exact_geometry, family


# The families whose FCN pools over the whole image (squeeze-and-excitation): exact maps run windowed.
HUB_GLOBAL_CONTEXT = ["MobileNet", "EfficientNet", "MobileNetV5"]


@pytest.mark.parametrize("family", HUB_GLOBAL_CONTEXT)
def test_families_with_global_context_get_exact_windowed_maps_by_default(family):
    task = hub_classifier(family)
    assert check_windowed(task)[0] == "windowed"


def test_the_other_cnn_families_run_as_their_fcn_by_default():
    for family in sorted(set(HUB_CNN_FAMILIES + ["MobileNetV5"]) - set(HUB_GLOBAL_CONTEXT)):
        task = hub_classifier(family)
        size = tuple(int(d) for d in task.inputs[0].shape[1:3])
        assert kfs.plan_prediction(task, (size[0] + 8, size[1] + 8)).method == "fcn", family


@pytest.mark.parametrize(
    "family, blocking",
    [
        ("ViT", "'vit_patching_and_embedding' (ViTPatchingAndEmbedding)"),
        ("DeiT", "'deit_patching_and_embedding' (DeiTEmbeddings)"),
        ("Swin", "'patch_embedding' (PatchEmbedding)"),
        ("MiT", "'patch_and_embed_0' (OverlappingPatchingAndEmbedding)"),
    ],
)
def test_transformers_are_refused_naming_the_size_bound_layer(family, blocking):
    with pytest.raises(kfs.ConversionError) as info:
        kfs.convert(hub_classifier(family))
    message = str(info.value)
    assert blocking in message and "tokens" in message, message


@pytest.mark.parametrize("family", ["MobileNet", "EfficientNet"])
def test_geometry_of_blocks_holding_strided_convolutions_is_exact(family):
    """Their blocks are custom layers; geometry traces them instead of treating them as size-preserving."""
    fcn = kfs.convert(hub_classifier(family), head="dense", verify=False)
    grid = kfs.geometry(fcn)
    assert grid.exact, grid.unknown
    for size in [(150, 97), (64, 64), (77, 129)]:
        image = np.random.default_rng(1).standard_normal((1, *size, 3)).astype("float32")
        assert tuple(fcn(image).shape[1:3]) == grid.output_size(size)
    image = np.random.default_rng(2).standard_normal((150, 97, 3)).astype("float32")
    np.testing.assert_allclose(kfs.predict_map(fcn, image), np.asarray(fcn(image[None]))[0], atol=1e-4)


def test_the_tasks_preprocessor_applies_to_whole_images():
    """What the README shows: the image converter's scale and offset as `preprocess=`, no resizing."""
    task = hub_classifier("CSPNet")
    converter = keras_hub.layers.CSPNetImageConverter(
        image_size=(32, 32), scale=[1 / 255.0, 2 / 255.0, 0.5 / 255.0], offset=[-0.5, -1.0, 0.25]
    )
    fcn = kfs.convert(task)
    scale, offset = np.asarray(converter.scale, "float32"), np.asarray(converter.offset, "float32")
    image = np.random.default_rng(3).uniform(0, 255, (80, 70, 3)).astype("float32")
    scores = kfs.predict_map(fcn, image, preprocess=lambda pixels: pixels * scale + offset)
    expected = np.asarray(fcn((image * scale + offset)[None]))[0]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # At the classifier's own size the task (converter applied, no resize needed) gives the same scores.
    crop = image[:32, :32]
    window = kfs.predict_map(fcn, crop, preprocess=lambda pixels: pixels * scale + offset)
    np.testing.assert_allclose(window[0, 0], np.asarray(task(converter(crop[None])))[0], atol=1e-4)
