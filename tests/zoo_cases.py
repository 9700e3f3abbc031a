"""Every image classifier of keras.applications and keras-hub, built offline, and the check each must pass.

Used by ``tests/test_zoo.py``, ``tests/test_keras_hub.py`` and
``tools/coverage.py`` (which writes docs/coverage.md's table). Random
weights throughout: nothing is downloaded.

`check_classifier` is the contract: ``convert`` with both heads (``window``
verified against the source at the original size; ``dense`` compared with the
source's own head run on every position of its pooled features, see
`check_dense_head`), the FCN's map size equal to
``geometry(fcn).output_size`` at a larger size, and ``predict_map`` equal to
the FCN's ``predict`` there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np

import keras_fcn_surgery as kfs
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.surgery.verify import logits_of

A = keras.applications

# keras.applications: family -> constructors, smallest first. Sizes: the smallest
# size each family builds at (Inception and Xception need 75 and 71 pixels).
APPLICATIONS = {
    "ConvNeXt": ["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge"],
    "DenseNet": ["DenseNet121", "DenseNet169", "DenseNet201"],
    "EfficientNet": [f"EfficientNetB{i}" for i in range(8)],
    "EfficientNetV2": [f"EfficientNetV2{v}" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")],
    "InceptionResNetV2": ["InceptionResNetV2"],
    "InceptionV3": ["InceptionV3"],
    "MobileNet": ["MobileNet"],
    "MobileNetV2": ["MobileNetV2"],
    "MobileNetV3": ["MobileNetV3Small", "MobileNetV3Large"],
    "NASNet": ["NASNetMobile", "NASNetLarge"],
    "ResNet": ["ResNet50", "ResNet101", "ResNet152"],
    "ResNetV2": ["ResNet50V2", "ResNet101V2", "ResNet152V2"],
    "VGG": ["VGG16", "VGG19"],
    "Xception": ["Xception"],
}
SMALL_SIZE = {"InceptionResNetV2": 75, "InceptionV3": 75, "Xception": 71, "NASNet": 64}
DEFAULT_SMALL_SIZE = 64


def application_names() -> list[str]:
    return [name for names in APPLICATIONS.values() for name in names]


def family_of(name: str) -> str:
    return next(family for family, names in APPLICATIONS.items() if name in names)


def application(name: str, size: int | None = None, *, logits: bool = False):
    """``keras.applications.<name>(weights=None)`` at ``size`` x ``size`` (default: its family's small size).

    ``logits``: without the final softmax (``classifier_activation=None``):
    with random weights, 1000 softmax probabilities are all near 1/1000, so a
    comparison of them cannot tell a right map from a wrong one.
    """
    size = size or SMALL_SIZE.get(family_of(name), DEFAULT_SMALL_SIZE)
    extra = {"classifier_activation": None} if logits else {}
    return getattr(A, name)(weights=None, input_shape=(size, size, 3), **extra)


@dataclass
class Outcome:
    """What `check_classifier` found for one model."""

    name: str
    input_size: tuple[int, int]
    converted: bool
    detail: str = ""
    stride: tuple[int, int] | None = None
    exact_geometry: bool | None = None
    seconds: float = 0.0
    heads: list[str] = field(default_factory=list)


def _fitting_size(grid, original, wanted) -> tuple[int, int]:
    """The first size from ``wanted`` on, axis by axis, at which every merge of the network lines up.

    Networks whose branches shrink differently without padding (NASNet) work
    only at some sizes; `geometry` knows which, and the check uses one of them.
    """
    height, width = wanted
    for candidate in range(height, height + 64):
        try:
            grid.output_size((candidate, original[1]))
        except kfs.ConversionError:
            continue
        height = candidate
        break
    for candidate in range(width, width + 64):
        try:
            grid.output_size((height, candidate))
        except kfs.ConversionError:
            continue
        return (height, candidate)
    return (height, width)


def check_classifier(model, *, name: str | None = None, larger_by: int = 71, preprocess=None) -> Outcome:
    """Convert with both heads and check verification, geometry and `predict_map` (raises AssertionError).

    Returns:
        An `Outcome` (``converted=True``). A `ConversionError` propagates.
    """
    started = time.perf_counter()
    layout = model_layout(model)
    shape = tuple(model.inputs[0].shape)
    height, width = (int(d) for d in layout.spatial_shape(shape))
    channels = int(layout.channels(shape))
    larger = (height + larger_by, width + larger_by + 9)
    outcome = Outcome(name or model.name, (height, width), converted=True)
    for head in kfs.HEADS:
        fcn = kfs.convert(model, head=head, verify=head == "window")  # raises VerificationError if wrong
        grid = kfs.geometry(fcn)
        larger = _fitting_size(grid, (height, width), larger)
        image = np.random.default_rng(0).standard_normal(layout.image_shape(*larger, channels)).astype("float32")
        # `predict` (a compiled graph, as `predict_map` runs): eager calls round differently, and random-weight
        # EfficientNetV2s have logits large enough for that to show in their softmax.
        expected = np.asarray(fcn.predict(image[None], verbose=0))[0]
        expected_cells = tuple(layout.image_size(expected.shape))
        assert expected_cells == grid.output_size(larger), (head, expected_cells, grid.output_size(larger))
        scores = kfs.predict_map(fcn, image, preprocess=preprocess)
        scale = max(float(np.max(np.abs(expected))), 1e-30)
        assert float(np.max(np.abs(scores - expected))) <= 1e-4 * scale, head
        if head == "window":
            outcome.stride, outcome.exact_geometry = grid.stride, grid.exact
        else:
            check_dense_head(model, fcn)
        outcome.heads.append(head)
    outcome.seconds = time.perf_counter() - started
    return outcome


def check_dense_head(source, dense, tolerance: float = 1e-4) -> None:
    """The ``head="dense"`` FCN at the source's own size equals the source's head (its layers after the global
    pooling the dense head removes) run on the feature vector at every position of that pooling's input.

    Logits are compared where the source ends in a softmax or sigmoid (with random weights a 1000-class
    softmax is 1/1000 everywhere). Without a global pooling to remove, the dense FCN is the window one: their
    maps must be equal. Raises AssertionError.
    """
    layout = model_layout(source)
    shape = tuple(source.inputs[0].shape)
    height, width = (int(d) for d in layout.spatial_shape(shape))
    image = np.random.default_rng(2).standard_normal((1, *shape[1:])).astype("float32")
    removed = [
        r.layer_name
        for r in kfs.plan(source, head="dense").rewrites
        if r.new_class == "(removed)" and r.old_class.startswith("Global")
    ]
    if not removed:
        window = kfs.convert(source, head="window", verify=False)
        np.testing.assert_array_equal(
            np.asarray(dense(image, training=False)), np.asarray(window(image, training=False))
        )
        return
    assert len(removed) == 1, removed
    pool = source.get_layer(removed[0])
    body = keras.Model(source.inputs, pool.input)
    head = keras.Model(pool.output, source.outputs[0])
    features = layout.image_to_channels_last(np.asarray(body(image, training=False))[0])  # (h, w, C)
    rows, cols, channels = features.shape
    vectors = features.reshape(rows * cols, channels)
    if len(pool.output.shape) == 4:  # keepdims: each position as a 1 x 1 map
        vectors = np.stack([layout.image_from_channels_last(v.reshape(1, 1, channels)) for v in vectors])
    with logits_of(head) as (head_logits, _):
        want = np.asarray(head_logits(vectors, training=False)).reshape(rows, cols, -1)
    with logits_of(dense) as (dense_logits, _):
        got = layout.image_to_channels_last(np.asarray(dense_logits(image, training=False))[0])
    assert got.shape == want.shape, (got.shape, want.shape, (height, width))
    scale = max(float(np.max(np.abs(want))), 1e-30)
    assert float(np.max(np.abs(got - want))) <= tolerance * scale, float(np.max(np.abs(got - want))) / scale


def check_windowed(model, *, stride=None, larger_by: int = 3) -> tuple[str, tuple[int, int]]:
    """``predict_map``'s default for the classifier, or its windowed map, equals the classifier on every crop.

    The map at ``stride`` (default: the FCN's where the classifier converts, else
    the stride its windows share) of an image of odd size holding 3 x 4
    windows, whole and in tiles, against `sliding_window_predict` (1e-5 of the
    output scale), on pixels in [0, 255]; the crops' scores must differ (an
    informative check). Raises AssertionError.

    Returns:
        ``(method, stride)``: what ``predict_map(model, image)`` runs by
        default (``"fcn"`` or ``"windowed"``) and the stride checked.
    """
    from keras_fcn_surgery.inference import windowed

    layout = model_layout(model)
    height, width = (int(d) for d in layout.spatial_shape(tuple(model.inputs[0].shape)))
    method = windowed.choose_method(model, None, "auto")[0]
    if stride is None:
        try:
            stride = tuple(kfs.geometry(kfs.as_fcn(model)).stride)
        except kfs.ConversionError:
            stride = windowed.shared_stride(model)
    steps = kfs.plan_prediction(model, (height, width), stride=stride, method="windowed").stride
    size = (height + 2 * steps[0] + larger_by, width + 3 * steps[1] + larger_by + 2)
    channels = int(layout.channels(tuple(model.inputs[0].shape)))
    image = np.random.default_rng(0).uniform(0, 255, layout.image_shape(*size, channels)).astype("float32")
    want = kfs.sliding_window_predict(model, image, steps)
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(want - want[:1, :1]))) > 1e-2 * scale, "the crops' scores hardly differ"
    for tile in (None, max(height, width) + max(steps)):
        got = kfs.predict_map(model, image, stride=steps, method="windowed", tile=tile)
        assert float(np.max(np.abs(got - want))) <= 1e-5 * scale, (tile, float(np.max(np.abs(got - want))) / scale)
    return method, steps


# keras-hub ---------------------------------------------------------------------
# Small explicit configs (presets would be downloaded). Each builder returns the
# `*ImageClassifier` task itself: a functional subclass of `keras.Model`.

HUB_CNN_FAMILIES = [
    "ResNet v1",
    "ResNet v2",
    "VGG",
    "MobileNet",
    "EfficientNet",
    "DenseNet",
    "CSPNet",
    "Xception",
    "HGNetV2",
]
HUB_TRANSFORMER_FAMILIES = ["ViT", "DeiT", "Swin", "MiT", "MobileNetV5"]


def _resnet(hub, pre_activation: bool):
    backbone = hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=pre_activation,
        image_shape=(64, 64, 3),
    )
    return hub.models.ResNetImageClassifier(backbone=backbone, num_classes=3, activation="softmax")


def _vgg(hub):
    backbone = hub.models.VGGBackbone(
        stackwise_num_repeats=[1, 1, 1], stackwise_num_filters=[8, 16, 16], image_shape=(32, 32, 3)
    )
    return hub.models.VGGImageClassifier(backbone=backbone, num_classes=3, pooling="flatten", pooling_hidden_dim=16)


def _mobilenet(hub):
    backbone = hub.models.MobileNetBackbone(
        stackwise_expansion=[[40, 56], [64, 144, 144]],
        stackwise_num_blocks=[2, 3],
        stackwise_num_filters=[[16, 16], [24, 24, 24]],
        stackwise_kernel_size=[[3, 3], [5, 5, 5], [1]],
        stackwise_num_strides=[[2, 1], [2, 1, 1], [1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2, 2], [1]],
        output_num_filters=64,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=72,
        squeeze_and_excite=0.5,
        image_shape=(64, 64, 3),
    )
    return hub.models.MobileNetImageClassifier(backbone=backbone, num_classes=3, num_features=32)


def _efficientnet(hub):
    backbone = hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 5],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[32, 16, 24],
        stackwise_output_filters=[16, 24, 40],
        stackwise_expansion_ratios=[1, 6, 6],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["v1"] * 3,
        stackwise_squeeze_and_excite_ratios=[0.25] * 3,
        stackwise_force_input_filters=[0, 0, 0],
        stackwise_nores_option=[False, False, False],
        min_depth=None,
        use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True,
        dropout=0,
        num_features=64,
        input_shape=(48, 48, 3),
    )
    return hub.models.EfficientNetImageClassifier(backbone=backbone, num_classes=3)


def _densenet(hub):
    backbone = hub.models.DenseNetBackbone(stackwise_num_repeats=[2, 2], growth_rate=8, image_shape=(64, 64, 3))
    return hub.models.DenseNetImageClassifier(backbone=backbone, num_classes=3)


def _cspnet(hub):
    backbone = hub.models.CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 2],
        stackwise_num_filters=[16, 24],
        down_growth=True,
        bottle_ratio=(0.5,) + (1.0,),
        block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block",
        stage_type="csp",
        image_shape=(32, 32, 3),
    )
    return hub.models.CSPNetImageClassifier(backbone=backbone, num_classes=3)


def _xception(hub):
    backbone = hub.models.XceptionBackbone(
        stackwise_conv_filters=[[8, 16], [32, 32], [32, 32], [48, 64]],
        stackwise_pooling=[False, True, False, False],
        image_shape=(71, 71, 3),
    )
    return hub.models.XceptionImageClassifier(backbone=backbone, num_classes=3)


def _hgnetv2(hub):
    backbone = hub.models.HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=32,
        hidden_sizes=[64, 128],
        stem_channels=[3, 16, 32],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[32, 16, 64, 1, 1, 3], [64, 32, 128, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, False],
        image_shape=(64, 64, 3),
    )
    return hub.models.HGNetV2ImageClassifier(backbone=backbone, preprocessor=None, num_classes=3)


def _vit(hub):
    backbone = hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    return hub.models.ViTImageClassifier(backbone=backbone, num_classes=3)


def _deit(hub):
    backbone = hub.models.DeiTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16
    )
    return hub.models.DeiTImageClassifier(backbone=backbone, num_classes=3)


def _swin(hub):
    backbone = hub.models.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, patch_size=4
    )
    return hub.models.SwinTransformerImageClassifier(backbone=backbone, num_classes=3)


def _mit(hub):
    backbone = hub.models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[4, 2],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[8, 16],
        image_shape=(32, 32, 3),
    )
    return hub.models.MiTImageClassifier(backbone=backbone, num_classes=3)


def _mobilenetv5(hub):
    backbone = hub.models.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[24], [48, 48]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[4.0], [6.0, 6.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [5, 5]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        image_shape=(32, 32, 3),
        stem_size=16,
        use_msfa=False,
    )
    return hub.models.MobileNetV5ImageClassifier(backbone=backbone, num_classes=3, head_hidden_size=32)


HUB_BUILDERS = {
    "ResNet v1": lambda hub: _resnet(hub, False),
    "ResNet v2": lambda hub: _resnet(hub, True),
    "VGG": _vgg,
    "MobileNet": _mobilenet,
    "EfficientNet": _efficientnet,
    "DenseNet": _densenet,
    "CSPNet": _cspnet,
    "Xception": _xception,
    "HGNetV2": _hgnetv2,
    "ViT": _vit,
    "DeiT": _deit,
    "Swin": _swin,
    "MiT": _mit,
    "MobileNetV5": _mobilenetv5,
}


def hub_classifier(family: str):
    """The keras-hub ``*ImageClassifier`` of this family, built from a small config with random weights."""
    import keras_hub

    keras.utils.set_random_seed(0)
    return HUB_BUILDERS[family](keras_hub)
