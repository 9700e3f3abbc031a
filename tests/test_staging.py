"""Staged tiling: each stage tiled on the stored map of the stage before equals the whole-image pass."""

import os

import keras
import numpy as np
import pytest
from conftest import STRIDES, random_images, strided_fcn, whole_map
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.graph import model_facts
from keras_fcn_surgery.inference.predict import plan_prediction
from keras_fcn_surgery.inference.store import DiskMap, file_backed
from keras_fcn_surgery.taxonomy import is_large_kernel_conv

ATOL = 2e-5


def _check_stages(plan):
    """Stages chain up: each reads the map the one before writes; the last writes the map."""
    assert plan.staged
    for before, after in zip(plan.stages, plan.stages[1:]):
        assert before.output_size == after.input_size and before.stop == after.start
    assert plan.stages[0].start == "input" and plan.stages[-1].store == "out"
    assert plan.stages[-1].output_size == plan.map_size


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
def test_staged_equals_whole_image(padding, stride):
    model = strided_fcn(padding, STRIDES[stride], head=3)
    image = random_images((9 * stride + 61, 7 * stride + 47, 2), seed=stride)  # odd sides, not stride multiples
    whole = whole_map(model, image)
    for tile in (2 * stride + 40, (stride + 45, 4 * stride + 43)):
        plan = plan_prediction(model, image.shape[:2], tile=tile, staged=True)
        _check_stages(plan)
        assert plan.stages[0].tiles > 1, "the first stage must be tiled"
        staged = kfs.predict_map(model, image, tile=tile, staged=True, batch_size=2)
        np.testing.assert_allclose(staged, whole, atol=ATOL, err_msg=f"tile={tile}")


def test_a_network_without_a_cut_cannot_be_staged_and_falls_back_to_plain_tiles():
    model = strided_fcn("same", STRIDES[1], head=3)
    image = random_images((61, 47, 2))
    with pytest.raises(kfs.ConversionError, match=r"cannot be staged.*`staged=None` or `staged=False`"):
        kfs.predict_map(model, image, tile=24, staged=True)
    plan = plan_prediction(model, image.shape[:2], tile=24)
    assert not plan.staged and plan.stages[0].tiles > 1
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=24), whole_map(model, image), atol=ATOL)


def test_a_network_with_global_context_cannot_be_staged():
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = layers.MaxPooling2D(2)(x)
    gate = layers.Conv2D(4, 1, activation="sigmoid")(layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x))
    model = keras.Model(inputs, layers.Conv2D(2, 1)(layers.Multiply()([x, gate])))
    image = random_images((80, 64, 3))
    with pytest.raises(kfs.ConversionError, match=r"cannot be staged: layer 'squeeze'.*`tile=None`"):
        kfs.predict_map(model, image, tile=32, staged=True)
    np.testing.assert_allclose(kfs.predict_map(model, image, staged=True), whole_map(model, image), atol=ATOL)


def test_staged_residual_network_with_concatenation():
    """Cuts only where no branch crosses: between blocks, never inside a residual or concatenated block."""
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(6, 7, strides=2, padding="same", activation="relu", name="stem")(inputs)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool")(x)
    y = layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = layers.Add(name="block1")([x, layers.Conv2D(6, 3, padding="same")(y)])
    y = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Add(name="block2")([layers.Conv2D(8, 1, strides=2)(x), layers.DepthwiseConv2D(3, padding="same")(y)])
    a = layers.Conv2D(4, 1, activation="relu")(x)
    b = layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    c = layers.MaxPooling2D(3, strides=1, padding="same")(x)
    x = layers.Concatenate(name="mixed")([a, b, c])
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="reduce")(x)
    model = keras.Model(inputs, layers.Conv2D(5, 3, activation="softmax")(x))
    image = random_images((283, 221, 3), seed=3)
    whole = whole_map(model, image)
    plan = plan_prediction(model, image.shape[:2], tile=96, staged=True)
    _check_stages(plan)
    inner = {"stem", "pool", "block2", "reduce"}
    assert {s.stop for s in plan.stages[:-1]} <= inner, plan
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=96, staged=True), whole, atol=ATOL)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=(64, 120), staged=True), whole, atol=ATOL)


def test_staged_channels_first():
    model = strided_fcn("same", [2, 2, 2], channels=3, data_format="channels_first", head=3)
    image = random_images((3, 131, 97), seed=5)
    whole = np.asarray(model(image[None]))[0]
    plan = plan_prediction(model, (131, 97), tile=48, staged=True)
    _check_stages(plan)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=48, staged=True), whole, atol=ATOL)
    # Stored maps on disk: a budget of 0 bytes spills every one.
    spilled = kfs.predict_map(model, image, tile=48, staged=True, memory_budget=0)
    np.testing.assert_allclose(spilled, whole, atol=ATOL)


def test_spilled_maps_are_removed_even_when_the_pass_fails(tmp_path):
    model = strided_fcn("valid", [2, 2, 2], head=3)
    image = random_images((150, 130, 2))
    plan = plan_prediction(model, image.shape[:2], tile=48, staged=True, memory_budget=0)
    assert any(s.store == "disk" for s in plan.stages)
    calls = []

    def failing(pixels):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return pixels

    with pytest.raises(KeyboardInterrupt):
        kfs.predict_map(
            model, image, tile=48, staged=True, memory_budget=0, spill_dir=str(tmp_path), preprocess=failing
        )
    assert os.listdir(tmp_path) == []
    result = kfs.predict_map(model, image, tile=48, staged=True, memory_budget=0, spill_dir=str(tmp_path))
    np.testing.assert_allclose(result, whole_map(model, image), atol=ATOL)
    assert os.listdir(tmp_path) == []


def test_the_plan_of_a_deep_network_computes_less_than_plain_tiles():
    """A VGG-like network: plain tiles overlap by the whole receptive field, stages by their own."""
    inputs = keras.Input((None, None, 3))
    x = inputs
    for block, filters in enumerate((8, 16, 32, 32)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block + 1}")(x)
    x = layers.Conv2D(64, 5, activation="relu", name="fc6")(x)
    model = keras.Model(inputs, layers.Conv2D(4, 1, name="fc8")(x))
    image = random_images((250, 310, 3), seed=9)
    plan = plan_prediction(model, image.shape[:2], tile=160)
    plain = plan_prediction(model, image.shape[:2], tile=160, staged=False)
    assert plan.staged and not plain.staged, plan
    _check_stages(plan)
    assert plan.macs < 0.8 * plain.macs and plan.plain_macs == plain.macs
    assert plan.work_ratio < plain.work_ratio and plain.work_ratio > 1.3
    for stage in plan.stages:
        rows, cols = stage.tile
        assert stage.computed_area >= 1.0 and stage.tiles >= 1 and stage.batch_size >= 1
        assert rows <= stage.input_size[0] and cols <= stage.input_size[1]
    text = str(plan)
    assert "stages" in text and "pool" in text and "GMAC" in text
    whole = whole_map(model, image)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=160), whole, atol=ATOL)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=160, prefetch=False), whole, atol=ATOL)
    # Tiles too small for the whole network: plain tiles are refused, stages (asked for) work.
    with pytest.raises(kfs.ConversionError, match=r"at least \d+"):
        kfs.predict_map(model, image, tile=96)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=96, staged=True), whole, atol=ATOL)


def test_a_deeper_stage_runs_whole_when_one_call_can_hold_it():
    """VGG16 at 2048 with tiles of 1024 (planned only): after blocks 1-2, the rest fits one call.

    One call may hold the activations of a batch of about 1024 x 1024 pixels of
    plain tiles; a single tile of a deeper stage may be as large, so the 512 x
    512 map after block2_pool runs whole rather than in overlapping tiles.
    """
    fcn = kfs.convert(keras.applications.VGG16(weights=None), verify=False)
    plan = plan_prediction(fcn, (2048, 2048), tile=1024)
    _check_stages(plan)
    assert [(s.stop, s.tiles) for s in plan.stages[1:]] == [("predictions", 1)], plan
    assert plan.stages[0].tiles > 1 and plan.work_ratio < 1.02, plan
    call_budget = 1024 * 1024 * (64 + 64) * 4  # block1's widest layer, input and output, for 1024 x 1024 pixels
    assert all(s.peak_bytes <= call_budget for s in plan.stages), plan
    # With tiles one at a time (batch_size=1), a deeper tile holds no more than one plain tile's activations.
    single = plan_prediction(fcn, (2048, 2048), tile=1024, batch_size=1)
    plain = plan_prediction(fcn, (2048, 2048), tile=1024, staged=False, batch_size=1)
    assert all(s.peak_bytes <= plain.stages[0].peak_bytes for s in single.stages), single


def test_a_nested_model_is_one_block():
    inner_inputs = keras.Input((None, None, 4))
    y = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inner_inputs)
    inner = keras.Model(inner_inputs, layers.MaxPooling2D(2)(y), name="inner")
    model = keras.Sequential(
        [
            keras.Input((None, None, 2)),
            layers.Conv2D(4, 3, strides=2, padding="same", name="stem"),
            inner,
            layers.Conv2D(3, 3, name="head"),
        ]
    )
    image = random_images((141, 117, 2), seed=4)
    plan = plan_prediction(model, image.shape[:2], tile=40, staged=True)
    _check_stages(plan)
    assert {s.stop for s in plan.stages} <= {"stem", "inner", "head"}
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=40, staged=True), whole_map(model, image), atol=ATOL)


def test_mixed_precision_matches_float32_to_half_precision():
    model = strided_fcn("same", [2, 2], head=3)
    image = random_images((70, 58, 2))
    whole = whole_map(model, image)
    half = kfs.predict_map(model, image, tile=32, mixed_precision=True)
    assert half.dtype == np.float32 and half.shape == whole.shape
    scale = np.abs(whole).max()
    np.testing.assert_allclose(half, whole, atol=2e-2 * scale)  # float16 keeps about 3 significant digits
    assert not np.array_equal(half, whole), "the float16 copy was not used"
    assert model.dtype_policy.name == "float32"


def test_xla_is_chosen_for_large_kernel_heads_only_and_stays_exact():
    inputs = keras.Input((None, None, 2))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    head = keras.Model(inputs, layers.Conv2D(3, 1)(layers.Conv2D(512, 5, activation="relu", name="fc6")(x)))
    assert any(is_large_kernel_conv(layer) for layer in head.layers)
    assert not any(is_large_kernel_conv(layer) for layer in strided_fcn("same", [2, 2], head=3).layers)
    image = random_images((61, 53, 2), seed=6)
    whole = whole_map(head, image)
    default = kfs.predict_map(head, image)
    scale = np.abs(whole).max()
    np.testing.assert_allclose(default, whole, atol=1e-5 * scale)  # float32 round-off: XLA sums in another order
    np.testing.assert_allclose(kfs.predict_map(head, image, tile=40), whole, atol=1e-5 * scale)


def test_disk_map_reads_back_what_it_wrote(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(7, 9, 3), (3, 7, 9)]:
        expected = rng.standard_normal(shape).astype("float32")
        stored = DiskMap(str(tmp_path / "map.bin"), shape)
        stored[:] = expected
        for index in [np.s_[1:5, 2:8, :], np.s_[:, 1:5, 2:8], np.s_[0:7, :, :], np.s_[2:3, 0:0, :]]:
            np.testing.assert_array_equal(stored[index], expected[index])
        stored[1:3, 2:4, :] = 5
        expected[1:3, 2:4, :] = 5
        np.testing.assert_array_equal(np.asarray(stored), expected)
        with pytest.raises(ValueError, match="step 1"):
            stored[::2]
        stored.close()


def _resident_kib(path) -> int:
    """KiB of ``path``'s pages mapped into this process (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = len(head) >= 6 and head[-1] == str(path)
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1])
    return total


def test_memory_mapped_images_are_read_through_their_file(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 1, (90, 77, 2)).astype("float32")
    np.save(tmp_path / "image.npy", pixels)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    reader = file_backed(mapped)
    assert isinstance(reader, DiskMap)
    np.testing.assert_array_equal(reader[5:50, 3:70, :], pixels[5:50, 3:70, :])
    reader.close()
    # What a writable map holds but has not flushed is what the file reads (the pages are shared).
    raw = np.memmap(tmp_path / "raw.bin", dtype="uint8", mode="w+", offset=16, shape=(40, 30))
    raw[:] = rng.integers(0, 256, raw.shape, dtype=np.uint8)
    reader = file_backed(raw)
    np.testing.assert_array_equal(reader[7:33, 2:29], raw[7:33, 2:29])
    reader.close()
    for kept in (mapped[1:], np.load(tmp_path / "image.npy", mmap_mode="c"), pixels):
        assert file_backed(kept) is kept, "slices, copy-on-write maps and arrays are read as they are"

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps on this system to see resident pages")
    model = strided_fcn("same", [2, 2], head=3)
    whole = whole_map(model, pixels)
    descriptors = len(os.listdir("/proc/self/fd"))
    assert _resident_kib(tmp_path / "image.npy") == 0
    for tile in (None, 40):
        np.testing.assert_allclose(kfs.predict_map(model, mapped, tile=tile), whole, atol=ATOL)
    assert _resident_kib(tmp_path / "image.npy") == 0, "the image was read through its memory map"
    assert len(os.listdir("/proc/self/fd")) == descriptors, "a file was left open"


def test_every_stage_compiles_as_the_whole_network_chooses():
    inputs = keras.Input((None, None, 2))
    x = layers.MaxPooling2D(2, name="pool1")(layers.Conv2D(8, 3, activation="relu")(inputs))
    x = layers.MaxPooling2D(2, name="pool2")(layers.Conv2D(8, 3, activation="relu")(x))
    head = keras.Model(inputs, layers.Conv2D(3, 1)(layers.Conv2D(512, 5, activation="relu", name="fc6")(x)))
    image = random_images((157, 149, 2), seed=8)
    plan = plan_prediction(head, image.shape[:2], tile=60, staged=True)
    _check_stages(plan)
    first = plan._runs[0].model
    assert not any(is_large_kernel_conv(layer) for layer in first.layers), "the first stage holds no large kernel"
    whole = whole_map(head, image)
    staged = kfs.predict_map(head, image, tile=60, staged=True, engine="xla")
    np.testing.assert_allclose(staged, whole, atol=1e-5 * np.abs(whole).max())
    assert {engine for engine, *_ in model_facts(first).forwards} == {"xla"}, "the first stage ran without XLA"
    kfs.predict_map(head, image, tile=60, staged=True, engine="tf")
    assert "tf" in {engine for engine, *_ in model_facts(first).forwards}


def test_predict_maps_batches_images_of_one_size_and_tiles_the_large_ones():
    model = strided_fcn("same", [2, 2], head=3)
    images = [random_images((40, 36, 2), seed=s) for s in range(3)]
    images.insert(1, random_images((52, 44, 2), seed=7))
    images.append(random_images((150, 130, 2), seed=8))
    maps = kfs.predict_maps(model, images, tile=64, batch_size=2)
    assert len(maps) == len(images)
    for image, result in zip(images, maps):
        np.testing.assert_allclose(result, whole_map(model, image), atol=ATOL)
    with pytest.raises(kfs.ConversionError, match="2 channels"):
        kfs.predict_maps(model, [random_images((40, 40, 3))])


def test_a_spill_folder_that_cannot_be_written_gets_a_clear_error(tmp_path):
    model = strided_fcn("valid", [2, 2, 2], head=3)
    missing = tmp_path / "missing" / "folder"
    with pytest.raises(kfs.ConversionError, match=r"spill_dir=.*memory_budget="):
        kfs.predict_map(
            model, random_images((150, 130, 2)), tile=48, staged=True, memory_budget=0, spill_dir=str(missing)
        )


def test_the_plan_table_shows_whole_layer_names():
    # Issue 23: stage names were cut to 14 characters ("ax_pooling2d_1").
    inputs = keras.Input((None, None, 2))
    x = layers.Conv2D(4, 3, padding="same", name="a_rather_long_convolution_name")(inputs)
    x = layers.MaxPooling2D(2, name="the_first_pooling_of_the_network")(x)
    x = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.MaxPooling2D(2, name="the_second_pooling_of_the_network")(x)
    model = keras.Model(inputs, layers.Conv2D(3, 5, name="a_head_with_a_long_name")(x))
    plan = plan_prediction(model, (200, 180), tile=48, staged=True)
    table = str(plan)
    assert plan.staged and "the_first_pooling_of_the_network" in table and "a_head_with_a_long_name" in table
