"""keras.applications models (weights=None) convert, match and map as predicted."""

import keras
import pytest
from conftest import random_images
from zoo_cases import APPLICATIONS, application, application_names, check_classifier, check_dense_head

import keras_fcn_surgery as kfs

A = keras.applications


# VGG19 is VGG16's style with more layers: heavy (the default suite's 5-minute budget, issue 22).
@pytest.mark.parametrize("factory", [A.VGG16, pytest.param(A.VGG19, marks=pytest.mark.heavy)], ids=["vgg16", "vgg19"])
def test_vgg_with_top(factory):
    source = factory(weights=None)
    fcn = kfs.convert(source)  # verifies at 224 x 224
    assert tuple(fcn.get_layer("fc1").kernel.shape) == (7, 7, 512, 4096)
    assert kfs.verify(source, fcn, batch_size=1).passed
    assert tuple(fcn(random_images((1, 320, 320, 3))).shape) == (1, 4, 4, 1000)
    assert kfs.geometry(fcn).output_size((320, 320)) == (4, 4)


# Small native sizes keep the default run quick; the heavy variants run at 224.
GLOBAL_POOLING_MODELS = {
    "resnet50": (A.ResNet50, 64),
    "mobilenet_v2": (A.MobileNetV2, 96),
    "mobilenet": (A.MobileNet, 128),
    "efficientnet_b0": (A.EfficientNetB0, 64),
    "densenet121": (A.DenseNet121, 64),
}


def _check_both_heads(factory, size):
    source = factory(weights=None, input_shape=(size, size, 3))
    larger = size + 2 * 32 + 7
    for head in kfs.HEADS:
        fcn = kfs.convert(source, head=head, verify=head == "window")
        grid = kfs.geometry(fcn)
        scores = fcn(random_images((1, larger, larger, 3)))
        assert tuple(scores.shape) == (1, *grid.output_size((larger, larger)), 1000), head
        assert grid.stride == (32, 32)
        if head == "dense":
            check_dense_head(source, fcn)  # the source's own head at every feature position
    window = kfs.convert(source, head="window", verify=False)
    result = kfs.verify(source, window)
    assert result.passed, result
    return source


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLING_MODELS))
def test_global_pooling_models_small(name):
    factory, size = GLOBAL_POOLING_MODELS[name]
    _check_both_heads(factory, size)


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(GLOBAL_POOLING_MODELS))
def test_global_pooling_models_at_224(name):
    factory, _ = GLOBAL_POOLING_MODELS[name]
    _check_both_heads(factory, 224)


def test_mobilenet_head_reshape_and_pointwise_conv_are_planned():
    source = A.MobileNet(weights=None, input_shape=(128, 128, 3))
    rows = {rewrite.layer_name: rewrite for rewrite in kfs.plan(source).rewrites}
    pooling = next(r for r in rows.values() if r.old_class == "GlobalAveragePooling2D")
    assert pooling.new_class == "AveragePooling2D" and "4x4" in pooling.detail
    assert any(r.old_class == "Reshape" and r.new_class == "(removed)" for r in rows.values())
    dense_plan = kfs.plan(source, head="dense")
    pooling = next(r for r in dense_plan.rewrites if r.old_class == "GlobalAveragePooling2D")
    assert pooling.new_class == "(removed)"


def test_squeeze_excitation_pooling_stays_in_the_body():
    source = A.EfficientNetB0(weights=None, input_shape=(64, 64, 3))
    rewritten = [r for r in kfs.plan(source).rewrites if r.old_class == "GlobalAveragePooling2D"]
    assert [r.layer_name for r in rewritten] == ["avg_pool"]
    assert kfs.geometry(kfs.convert(source, verify=False)).global_context


# Issue 9: the whole keras.applications zoo ------------------------------------
# `check_classifier` converts with both heads (window verified), checks the map size against
# `geometry(fcn).output_size` and `predict_map` against the FCN at a larger size.
# Default run: the smallest member of each family not already covered above (ConvNeXt and
# MobileNetV3 crashed on `keras.ops` nodes before), nor of a style the default run already has
# (the default suite's 5-minute budget, issue 22). Every constructor, these too: `-m heavy`.

_COVERED_ABOVE = {"ResNet", "MobileNetV2", "MobileNet", "EfficientNet", "DenseNet", "VGG"}
_STYLE_IN_THE_DEFAULT_RUN = {
    # Inverted residual blocks with squeeze-and-excitation (fused ones: plain convolutions): EfficientNetB0 above.
    "EfficientNetV2",
    # Inception branches (InceptionV3 below), residual adds (ResNet50 above, ResNet50V2 below) and a custom
    # scaling layer (the custom `Scale` layer of test_bad_inputs.py).
    "InceptionResNetV2",
    # Heavy only (the same check in test_every_application_converts_and_maps): NASNetMobile's 770 layers took
    # 30-40 s on 2 cores, the default suite's longest conversion. Its branches that line up only at some sizes
    # are test_geometry.py's (found by the fuzz test); separable convolutions: Xception below.
    "NASNet",
}
SMALLEST_OF_FAMILY = sorted(
    names[0]
    for family, names in APPLICATIONS.items()
    if family not in _COVERED_ABOVE and family not in _STYLE_IN_THE_DEFAULT_RUN
)


@pytest.mark.parametrize("name", SMALLEST_OF_FAMILY)
def test_smallest_of_each_family_converts_and_maps(name):
    outcome = check_classifier(application(name), name=name)
    assert outcome.heads == list(kfs.HEADS) and outcome.exact_geometry
    assert outcome.stride == (32, 32)


@pytest.mark.heavy
@pytest.mark.parametrize("name", application_names())
def test_every_application_converts_and_maps(name):
    outcome = check_classifier(application(name), name=name)
    assert outcome.heads == list(kfs.HEADS) and outcome.exact_geometry
    assert outcome.stride == (32, 32)


def test_every_installed_constructor_is_listed():
    installed = {n for n in dir(A) if n[0].isupper() and callable(getattr(A, n))}
    assert installed == set(application_names())
