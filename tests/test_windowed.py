"""Windowed maps (issue 24): a classifier's output on every crop at a stride, exactly, with a shared prefix.

Every map is compared with the classifier itself run on every crop, cut with
plain numpy indexing (`crops.crop_scores`: nothing shared with the package,
not even `sliding_window_predict`'s stride and tile helpers), relative to the
output scale, on non-square images of odd sizes, whole and tiled, at square
and non-square strides.
"""

import keras
import numpy as np
import pytest
from crops import crop_scores
from zoo_cases import hub_classifier

import keras_fcn_surgery as kfs
from keras_fcn_surgery.graph import cut_positions, flat_trace, graph_part
from keras_fcn_surgery.inference import windowed
from keras_fcn_surgery.inference.certificate import CertificateOptions, windowed_certificate

L = keras.layers
TOLERANCE = 1e-5


def stride_id(stride) -> str:
    """A parameter id: ``4`` or ``8x12``."""
    return str(stride) if np.isscalar(stride) else "x".join(map(str, stride))


def assert_crops(model, image, stride, **options):
    """The windowed map equals the classifier on every crop at ``stride`` (cut by numpy indexing); returns the map."""
    got = kfs.predict_map(model, image, stride=stride, method="windowed", **options)
    want = crop_scores(model, image, stride)
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) <= TOLERANCE * scale, (stride, options)
    # Informative: the crops' scores differ by far more than the tolerance (a map of one constant proves little).
    assert float(np.max(np.abs(want - want[:1, :1]))) > 1e-2 * scale
    return got


def se_classifier(window=(33, 29), classes=4, seed=0):
    """``same``-padded strided stem, asymmetric padding, then squeeze-and-excitation: strips on all four sides."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((*window, 3))
    y = L.Conv2D(6, 3, strides=2, padding="same", activation="relu")(x)
    y = L.DepthwiseConv2D(3, padding="same")(y)
    y = L.BatchNormalization(beta_initializer="random_normal", moving_mean_initializer="random_normal")(y)
    y = L.ZeroPadding2D(((1, 0), (0, 1)))(y)
    y = L.Conv2D(8, 3, strides=2, padding="valid", activation="relu")(y)
    squeeze = L.GlobalAveragePooling2D(keepdims=True)(y)
    squeeze = L.Conv2D(2, 1, activation="relu")(squeeze)
    squeeze = L.Conv2D(8, 1, activation="sigmoid")(squeeze)
    y = L.Multiply()([y, squeeze])
    y = L.Conv2D(8, 3, padding="same", activation="relu")(y)
    y = L.GlobalAveragePooling2D()(y)
    return keras.Model(x, L.Dense(classes)(y), name="se_net")


def image_for(window, stride, extra=(3, 5), seed=1, pixels=False):
    """An image of odd size holding 3 x 4 windows and some; ``pixels``: values in [0, 255]."""
    stride = (stride, stride) if np.isscalar(stride) else stride
    size = (window[0] + 2 * stride[0] + extra[0], window[1] + 3 * stride[1] + extra[1])
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (*size, 3)) if pixels else rng.standard_normal((*size, 3))
    return image.astype("float32")


# Splits -----------------------------------------------------------------------------------------------


def test_cut_positions_are_the_places_no_edge_crosses():
    x = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(x)
    b = L.ReLU(name="b")(a)
    c = L.Conv2D(4, 1, name="c")(b)
    d = L.Add(name="d")([b, c])  # b is read again after c: c is not a cut
    e = L.GlobalAveragePooling2D(name="e")(d)
    model = keras.Model(x, L.Dense(2, name="f")(e))
    trace = flat_trace(model, 1)
    names = [trace.operation_name(i) for i in trace.cut_indices()]
    assert names == ["input", "a", "b", "d", "e"]
    assert cut_positions(trace.nodes, [trace.input]) == [-1, 0, 1, 3, 4, 5]


def test_a_flat_trace_runs_the_classifiers_own_layers_inside_its_blocks():
    task = hub_classifier("ViT")
    trace = flat_trace(task, 2)
    kinds = {type(node.operation).__name__ for node in trace.nodes}
    assert "Conv2D" in kinds and "EinsumDense" in kinds  # the patch embedding's and the attention's insides
    assert not any(type(node.operation).__name__.startswith("ViT") for node in trace.nodes)
    twin = graph_part(trace.nodes, trace.input, trace.outputs, "twin")
    batch = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(twin(batch)), np.asarray(task(batch)))
    conv = next(node.operation for node in trace.nodes if type(node.operation).__name__ == "Conv2D")
    assert conv is task.backbone.get_layer("vit_patching_and_embedding").patch_embedding  # shared, not copied


def test_the_split_stops_before_squeeze_and_excitation_and_names_it():
    model = se_classifier()
    found = windowed.analysis(model)
    deepest = found.splits[-1]
    assert deepest.name == found.model.layers[5].name  # the valid strided convolution before the SE block
    assert deepest.stride == (4, 4)
    assert "pools over the whole window" in found.blocked_by
    # `same` padding and the asymmetric zero padding leave border cells to strips on every side.
    assert all(band.before and band.after for band in deepest.bands)


# Exact maps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [4, (8, 12)], ids=stride_id)
@pytest.mark.parametrize("tile", [None, 44])
def test_squeeze_and_excitation_net_equals_its_crops(stride, tile):
    model = se_classifier()
    image = image_for((33, 29), stride)
    assert_crops(model, image, stride, tile=tile)
    plan = kfs.plan_prediction(model, image.shape[:2], stride=stride, tile=tile, method="windowed")
    assert plan.method == "windowed" and plan.split != "input" and plan.strips


def test_without_strips_the_border_cells_of_a_same_padded_prefix_differ(monkeypatch):
    """The strips are needed: the shared map alone is not the crops' prefix map near a window's edge."""
    model = se_classifier()
    image = image_for((33, 29), (4, 8))
    want = crop_scores(model, image, (4, 8))
    monkeypatch.setattr(windowed._Split, "strips", lambda self: [])
    got = kfs.predict_map(model, image, stride=(4, 8), method="windowed")
    assert float(np.max(np.abs(got - want))) > 1e-3 * float(np.max(np.abs(want)))


def test_the_fcn_of_a_squeeze_and_excitation_net_is_not_its_crops_but_the_windowed_map_is():
    model = se_classifier(window=(32, 32))
    image = image_for((32, 32), 4, extra=(0, 0))
    fcn_map = kfs.predict_map(model, image, method="fcn")  # stride 4: the FCN's own
    assert kfs.plan_prediction(model, image.shape[:2]).method == "windowed"  # auto: global context
    want = crop_scores(model, image, 4)
    exact = kfs.predict_map(model, image)  # auto, windowed at the FCN's stride
    assert exact.shape == fcn_map.shape == want.shape
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(exact - want))) <= TOLERANCE * scale
    assert float(np.max(np.abs(fcn_map - want))) > 1e-3 * scale


@pytest.mark.parametrize("stride", [8, (4, 12)], ids=stride_id)
def test_a_prefix_map_larger_than_the_memory_budget_goes_to_disk(tmp_path, stride):
    model = se_classifier()
    image = image_for((33, 29), stride)
    assert_crops(model, image, stride, memory_budget=0, spill_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "tile, masked, stride", [(None, False, 4), (24, True, 4), (24, True, (4, 8))], ids=["whole", "masked", "masked-4x8"]
)
def test_bands_of_window_rows_give_the_unbanded_map(monkeypatch, tmp_path, tile, masked, stride):
    """Bands start on multiples of the stride: each band's shared map gives its windows' exact prefix maps."""
    model = se_classifier()
    image = image_for((33, 29), stride, extra=(23, 6))  # 8 window rows
    keep = None
    if masked:
        keep = np.zeros(kfs.plan_prediction(model, image.shape[:2], stride=stride).map_size, dtype=bool)
        keep[1:3, 1:4] = keep[6:, -2:] = True
    whole = kfs.predict_map(model, image, stride=stride, tile=tile, keep=keep, memory_budget=1 << 30)
    assert kfs.plan_prediction(model, image.shape[:2], stride=stride, memory_budget=1 << 30).bands == 1
    monkeypatch.setattr(windowed, "_OVERLAP_SHARE", 0)  # bands as small as the budget says
    one_row = kfs.plan_prediction(model, image.shape[:2], stride=stride, memory_budget=0)
    assert one_row.band_rows == 1 and one_row.band_store == "disk"
    budget = int(1.2 * one_row.band_bytes)  # bands of 2 window rows, in memory
    plan = kfs.plan_prediction(model, image.shape[:2], stride=stride, memory_budget=budget, keep=keep)
    assert plan.bands >= 3 and plan.band_store == "memory" and plan.band_bytes <= budget
    assert f"{plan.bands} bands" in str(plan)
    for bytes_kept in (budget, 0):  # in memory; one window row a band, on disk
        banded = kfs.predict_map(
            model, image, stride=stride, tile=tile, keep=keep, memory_budget=bytes_kept, spill_dir=str(tmp_path)
        )
        np.testing.assert_allclose(banded, whole, rtol=0, atol=1e-6 * float(np.nanmax(np.abs(whole))))
        assert np.array_equal(np.isnan(banded), np.isnan(whole))
    assert list(tmp_path.iterdir()) == []
    want = crop_scores(model, image, stride)
    kept = ~np.isnan(whole).any(axis=-1)
    assert float(np.max(np.abs(whole[kept] - want[kept]))) <= TOLERANCE * float(np.max(np.abs(want)))


def test_bands_are_tall_enough_that_their_overlaps_cost_at_most_a_quarter_of_the_prefix():
    model = se_classifier()
    image = image_for((33, 29), 4, extra=(200, 6))
    plan = kfs.plan_prediction(model, image.shape[:2], stride=4, memory_budget=0)
    assert plan.band_rows == 29 and plan.bands == 2  # ceil(4 * (33 - 4) / 4) of 53 window rows a band
    whole = kfs.plan_prediction(model, image.shape[:2], stride=4, memory_budget=1 << 30)
    assert whole.bands == 1 and whole.prefix_macs < plan.prefix_macs <= 1.25 * whole.prefix_macs


@pytest.mark.parametrize("stride", [4, (8, 4)], ids=stride_id)
def test_batches_of_windows_of_any_size_give_the_same_map(stride):
    model = se_classifier()
    image = image_for((33, 29), stride)
    whole = assert_crops(model, image, stride)
    for batch_size in (1, 5):
        np.testing.assert_allclose(
            kfs.predict_map(model, image, stride=stride, method="windowed", batch_size=batch_size), whole, atol=1e-6
        )


def test_masks_skip_windows_and_the_shared_cells_they_do_not_read():
    model = se_classifier()
    image = image_for((33, 29), 4, extra=(20, 16))
    whole = assert_crops(model, image, 4)
    keep = np.zeros(whole.shape[:2], dtype=bool)
    keep[1:5, 2:7] = True
    keep[-1, -1] = True
    masked = kfs.predict_map(model, image, stride=4, method="windowed", keep=keep, tile=24)
    np.testing.assert_allclose(masked[keep], whole[keep], atol=1e-6)
    assert np.isnan(masked[~keep]).all()
    plan = kfs.plan_prediction(model, image.shape[:2], stride=4, keep=keep, method="windowed", tile=24)
    full = kfs.plan_prediction(model, image.shape[:2], stride=4, method="windowed", tile=24)
    assert plan.windows == 21 and plan.split == full.split != "input"
    assert plan.tail_macs * full.windows == full.tail_macs * 21 and plan.prefix_macs < full.prefix_macs
    wide = assert_crops(model, image, (8, 4))  # a non-square stride: rows and columns told apart
    keep = np.zeros(wide.shape[:2], dtype=bool)
    keep[1:3, 3:9] = keep[-1, 0] = True
    masked = kfs.predict_map(model, image, stride=(8, 4), method="windowed", keep=keep, tile=24)
    np.testing.assert_allclose(masked[keep], wide[keep], atol=1e-6 * float(np.max(np.abs(wide))))
    assert np.isnan(masked[~keep]).all()


def test_a_plain_cnn_runs_as_its_fcn_unless_windows_are_asked_for():
    keras.utils.set_random_seed(3)
    x = keras.Input((15, 15, 3))
    y = L.Conv2D(4, 3, strides=2, activation="relu")(x)
    y = L.Conv2D(4, 3, strides=2, activation="relu")(y)
    model = keras.Model(x, L.Dense(3)(L.Flatten()(y)))
    image = image_for((15, 15), 8)
    assert kfs.plan_prediction(model, image.shape[:2]).method == "fcn"
    fcn_map = kfs.predict_map(model, image)
    np.testing.assert_allclose(fcn_map, crop_scores(model, image, 4), atol=1e-5)
    assert kfs.plan_prediction(model, image.shape[:2], stride=8).method == "windowed"
    assert_crops(model, image, 8)
    assert_crops(model, image, (8, 12))
    plan = kfs.plan_prediction(model, image.shape[:2], stride=8)
    assert plan.strips == () and plan.saved > 0.3 and plan.fcn_macs is not None
    assert "saved" in str(plan) and "FCN" in str(plan)


# keras-hub transformers and keras.applications' squeeze-and-excitation nets ------------------------------


@pytest.mark.parametrize(
    "family, strides, split",
    [
        ("ViT", (8, 16), "patch_embedding"),
        ("DeiT", (8, 24), "patch_embedding"),
        ("Swin", (4, 12), "conv_projection"),
        ("MiT", (4, 8), None),
    ],
)
def test_keras_hub_transformers_equal_their_crops(family, strides, split):
    task = hub_classifier(family)
    with pytest.raises(kfs.ConversionError):
        kfs.predict_map(task, image_for((32, 32), 8), method="fcn")
    for stride in strides:
        image = image_for((32, 32), stride)
        for tile in (None, 40):
            assert_crops(task, image, stride, tile=tile)
        plan = kfs.plan_prediction(task, image.shape[:2], stride=stride)
        assert plan.method == "windowed" and plan.saved > 0
        if split is not None:
            assert plan.split == split and plan.strips == ()  # valid patch embeddings need no strips
        else:  # MiT's overlapping patch embedding pads: its border cells come from strips
            assert plan.prefix_stride == (4, 4) and plan.strips


@pytest.mark.parametrize("name, stride", [("EfficientNetB0", (16, 32)), ("MobileNetV3Small", (8, 32))])
def test_applications_with_squeeze_and_excitation_equal_their_crops(name, stride):
    # Logits: with random weights the softmax is 1/1000 everywhere to 1e-5, which would prove nothing.
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    for step, tile in zip(stride, (None, 80)):
        image = image_for((64, 64), step, extra=(1, 3), pixels=True)
        assert_crops(model, image, step, tile=tile)
    plan = kfs.plan_prediction(model, image.shape[:2], stride=stride[1], method="windowed")
    assert plan.split != "input" and 0 < plan.saved < 0.5, str(plan)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["EfficientNetB0", "MobileNetV3Small"])
def test_applications_at_their_own_size_equal_their_crops(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
    image = np.random.default_rng(4).uniform(0, 255, (291, 263, 3)).astype("float32")
    assert_crops(model, image, 32, tile=256)


# Errors -----------------------------------------------------------------------------------------------


def test_a_stride_that_is_not_a_multiple_of_the_shared_stride_is_refused_naming_the_split():
    task = hub_classifier("ViT")
    with pytest.raises(kfs.InputError, match="not a multiple of 8x8.*'patch_embedding'.*sliding_window_predict"):
        kfs.predict_map(task, image_for((32, 32), 8), stride=12)


def test_a_classifier_without_an_fcn_needs_a_stride():
    with pytest.raises(kfs.InputError, match="needs a `stride=`.*multiple of 8x8"):
        kfs.predict_map(hub_classifier("ViT"), image_for((32, 32), 8))


def test_bad_arguments_are_refused():
    model = se_classifier()
    image = image_for((33, 29), 4)
    with pytest.raises(kfs.InputError, match="`method`"):
        kfs.predict_map(model, image, stride=4, method="sliding")
    with pytest.raises(kfs.InputError, match="`keep` has shape"):
        kfs.predict_map(model, image, stride=4, method="windowed", keep=np.ones((2, 2), bool))
    with pytest.raises(kfs.InputError, match="smaller than the window"):
        kfs.predict_map(model, image[:20], stride=4, method="windowed")
    fcn = kfs.as_fcn(model)
    with pytest.raises(kfs.InputError, match="already fully convolutional"):
        kfs.predict_map(fcn, image, method="windowed")
    with pytest.raises(kfs.InputError, match="stride 4x4"):
        kfs.predict_map(fcn, image, stride=8)
    with pytest.raises(kfs.InputError, match="`precision`.*'float32', 'bfloat16', 'float16'"):
        kfs.predict_map(model, image, stride=4, method="windowed", precision="float8")
    free = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(2, 3), L.GlobalAveragePooling2D()])
    with pytest.raises(kfs.ConversionError, match="fixed input size.*input_shape"):
        kfs.predict_map(free, image, stride=4, method="windowed")


@pytest.mark.parametrize("stride", [4, (4, 8)], ids=stride_id)
def test_a_windowed_map_is_certified_against_the_classifier_on_its_crops(stride):
    model = se_classifier()
    image = image_for((33, 29), stride)
    scores, certificate = kfs.predict_map(model, image, stride=stride, method="windowed", certify=6)
    assert certificate.exact and certificate.informative and len(certificate.cells) == 6
    assert certificate.eligible == scores.shape[0] * scores.shape[1] and "classifier 'se_net'" in str(certificate)
    scores[certificate.cells[0]] += 1.0  # a wrong cell is caught
    assert not windowed_certificate(model, image, scores, CertificateOptions(6), stride=stride).exact
