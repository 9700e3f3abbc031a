"""`certify_map`: sampled cells of a score map against the classifier on the crops they stand for, and its
wiring into `predict_map(certify=N)`, `predict_images` (npz metadata) and the CLI's `predict` and `heatmap`."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers
from models import valid_gap_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.inference.certificate import sample_cells


def _net(padding, data_format="channels_last", size=16):
    """conv/pool/conv with ``padding``, then Flatten + Dense: a classifier of ``size`` x ``size`` images."""
    shape = (size, size, 3) if data_format == "channels_last" else (3, size, size)
    return keras.Sequential(
        [
            keras.Input(shape),
            layers.Conv2D(4, 3, padding=padding, activation="relu", data_format=data_format),
            layers.MaxPooling2D(2, data_format=data_format),
            layers.Conv2D(6, 3, padding=padding, activation="relu", data_format=data_format),
            layers.Flatten(data_format=data_format),
            layers.Dense(8, activation="relu"),
            layers.Dense(3, activation="softmax"),
        ]
    )


def _image(height, width, channels_first=False, seed=0):
    image = np.random.default_rng(seed).standard_normal((height, width, 3)).astype("float32")
    return np.moveaxis(image, -1, 0) if channels_first else image


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_a_valid_padding_map_equals_its_crops(data_format):
    classifier = _net("valid", data_format)
    fcn = kfs.convert(classifier)
    image = _image(41, 46, data_format == "channels_first")
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.InexactMapWarning)
        scores, certificate = kfs.predict_map(fcn, image, certify=8)
    assert scores.shape == fcn.predict(image[None], verbose=0)[0].shape
    assert certificate.exact and certificate.max_rel_diff <= 1e-5
    assert certificate.top_class_agreement == 1.0
    assert certificate.against == f"classifier '{classifier.name}'"  # converted here: the classifier runs
    # stride 2, crops of 16 at 2 * i: rows 0..(41 - 16) // 2, columns 0..(46 - 16) // 2, of a 13 x 16 map
    assert certificate.map_size == (13, 16) and certificate.crop_size == (16, 16)
    assert certificate.eligible == 13 * 16
    assert len(set(certificate.cells)) == 8
    assert {(0, 0), (0, 15), (12, 0), (12, 15)} <= set(certificate.cells)
    assert "8 of 208 eligible cells" in str(certificate) and str(certificate).endswith("exact")


def test_an_fcn_without_its_classifier_certifies_itself_at_the_classifier_size(tmp_path):
    """An FCN loaded from a file does not know its classifier: at the classifier's size it is the classifier."""
    classifier = _net("valid")
    kfs.convert(classifier).save(tmp_path / "fcn.keras")
    loaded = kfs.load_model(tmp_path / "fcn.keras")
    image = _image(30, 33)
    scores = kfs.predict_map(loaded, image)
    certificate = kfs.certify_map(loaded, image, scores, 5, input_size=(16, 16))
    assert certificate.exact and certificate.max_rel_diff <= 1e-5 and len(certificate.cells) == 5
    assert certificate.against.startswith("FCN") and "classifier's input size" in certificate.against
    assert kfs.certify_map(classifier, image, scores, 5).cells == certificate.cells
    guessed = kfs.certify_map(loaded, image, scores, 5)  # no size given: its smallest input, said so
    assert "smallest input size" in guessed.against and guessed.exact


def test_a_same_padding_map_reports_its_difference_and_warns():
    classifier = _net("same")
    fcn = kfs.convert(classifier)
    image = _image(40, 44)
    with pytest.warns(kfs.InexactMapWarning, match=r"max rel diff .*padding.*top 3, bottom 3") as caught:
        scores, certificate = kfs.predict_map(fcn, image, certify=8)
    assert not certificate.exact
    assert certificate.max_rel_diff > certificate.tolerance and certificate.max_abs_diff > 0
    assert 0.0 <= certificate.top_class_agreement <= 1.0
    assert "padding" in certificate.reason and "DIFFERENT" in str(certificate)
    assert f"{certificate.max_rel_diff:.3g}" in str(caught[0].message)
    # the same numbers from the public function, on the same cells (deterministic sampling)
    with pytest.warns(kfs.InexactMapWarning):
        again = kfs.certify_map(fcn, image, scores)
    assert again.cells == certificate.cells and again.max_rel_diff == certificate.max_rel_diff


def _edge_blind_same_net(size=8):
    """A stride-2 `same` convolution whose kernel ignores its last row and column, then Flatten + Dense.

    TensorFlow pads a stride-2, 3-tap `same` window by (0, 1) on an even side and by (1, 1) on an odd one,
    so on an odd image cell ``i``'s crop starts at ``2 i - 1``, on an even one at ``2 i``; the padded pixels
    fall on the zeroed taps, so each cell equals its crop exactly, and a crop one pixel off does not.
    """
    conv = layers.Conv2D(4, 3, strides=2, padding="same", activation="tanh")
    model = keras.Sequential([keras.Input((size, size, 3)), conv, layers.Flatten(), layers.Dense(3)])
    kernel, bias = conv.get_weights()
    kernel[2, :] = 0
    kernel[:, 2] = 0
    conv.set_weights([kernel, bias])
    return model


@pytest.mark.parametrize("height, width", [(15, 17), (16, 18), (15, 18)])
def test_each_cell_is_compared_with_the_crop_it_stands_for(height, width):
    classifier = _edge_blind_same_net()
    fcn = kfs.convert(classifier)
    image = _image(height, width, seed=3)
    scores = kfs.predict_map(fcn, image)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.InexactMapWarning)
        certificate = kfs.certify_map(fcn, image, scores, n=50)
    assert certificate.exact and certificate.max_rel_diff <= 1e-5
    # the crops of cells (i, j) start at 2i - 1 (odd side) or 2i (even side) and must lie inside the image
    starts = [-(side % 2) for side in (height, width)]
    rows = [i for i in range(scores.shape[0]) if 0 <= starts[0] + 2 * i and starts[0] + 2 * i + 8 <= height]
    cols = [j for j in range(scores.shape[1]) if 0 <= starts[1] + 2 * j and starts[1] + 2 * j + 8 <= width]
    assert certificate.eligible == len(rows) * len(cols) == len(certificate.cells)  # n above: every cell
    assert set(certificate.cells) == {(i, j) for i in rows for j in cols}
    for i, j in certificate.cells:  # independently: the classifier on that crop is the cell
        top, left = starts[0] + 2 * i, starts[1] + 2 * j
        crop = image[top : top + 8, left : left + 8]
        np.testing.assert_allclose(classifier(crop[None])[0], scores[i, j], rtol=0, atol=1e-5)


def test_sampling_is_deterministic_spread_and_keeps_to_the_eligible_cells():
    rows, cols = range(2, 12), range(3, 23)
    cells = sample_cells(rows, cols, 8, seed=0)
    assert cells == sample_cells(rows, cols, 8, seed=0) and len(set(cells)) == 8
    assert {(2, 3), (2, 22), (11, 3), (11, 22)} <= set(cells)
    assert all(i in rows and j in cols for i, j in cells)
    assert cells != sample_cells(rows, cols, 8, seed=1)
    inner = [cell for cell in cells if cell[0] not in (2, 11)]  # spread: not all on the corner rows
    assert len({i // 5 for i, _ in inner} | {j // 10 for _, j in inner}) > 1
    keep = np.zeros((15, 30), bool)
    keep[5:9, 4:10] = True
    masked = sample_cells(rows, cols, 8, seed=0, keep=keep)
    assert len(masked) == 8 and all(keep[cell] for cell in masked)
    assert {(5, 4), (5, 9), (8, 4), (8, 9)} <= set(masked)  # the kept cells nearest the corners
    assert sample_cells(range(0, 2), range(0, 3), 8) == [(i, j) for i in range(2) for j in range(3)]


def test_cells_that_are_not_classifier_windows_are_not_certified():
    gap = valid_gap_cnn(input_size=(24, 24), classes=3)
    dense = kfs.convert(gap, head="dense")  # a cell per feature position, not a classifier window
    image = _image(40, 40)
    with pytest.raises(kfs.UncertifiableMapError, match="not one cell"):
        kfs.predict_map(dense, image, certify=4)
    with pytest.raises(kfs.InputError, match="certify"):
        kfs.predict_map(kfs.convert(gap), image, certify=-1)


# Pixels / 255 (the crops go through it too): on raw 0..255 pixels these random nets saturate their softmax.
UNIT = ("--preprocess", "unit")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certify")
    keras.utils.set_random_seed(5)
    _net("valid").save(folder / "valid.keras")
    _net("same").save(folder / "same.keras")
    kfs.convert(_net("valid")).save(folder / "valid_fcn.keras")
    valid_gap_cnn(input_size=(16, 16), classes=3).save(folder / "gap.keras")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)).save(images / "b.png")
    return folder


def test_predict_writes_the_certificate_into_the_npz(model_files, tmp_path):
    summary = kfs.predict_images(
        model_files / "valid.keras", [model_files / "images"], tmp_path / "out", formats="npz,zarr", preprocess="unit"
    )
    assert summary.ok and summary.count("done") == 2
    for result in summary.results:
        assert result.certificate.startswith("certificate: 8 of") and result.certificate.endswith("exact")
    with np.load(tmp_path / "out" / "a.npz") as saved:
        assert bool(saved["certificate_exact"]) and float(saved["certificate_max_rel_diff"]) <= 1e-5
        assert bool(saved["certificate_informative"])  # the crops' scores vary: the equality means something
        assert float(saved["certificate_top_class_agreement"]) == 1.0
        assert saved["certificate_cells"].shape == (8, 2) and int(saved["certificate_eligible"]) == 11 * 13
        assert tuple(saved["certificate_crop_size"]) == (16, 16)
        assert str(saved["certificate_against"]).startswith("classifier")
        scores = saved["scores"]
        for i, j in saved["certificate_cells"]:  # the recorded cells are the map's, and their crops agree
            assert np.all(np.isfinite(scores[i, j]))
        cells = saved["certificate_cells"].tolist()
    zarr = pytest.importorskip("zarr")
    attributes = zarr.open_group(str(tmp_path / "out" / "a.zarr"), mode="r").attrs
    assert attributes["certificate_exact"] is True and attributes["certificate_cells"] == cells
    assert attributes["certificate_max_rel_diff"] <= 1e-5 and attributes["certificate_eligible"] == 11 * 13
    kfs.predict_images(
        model_files / "valid.keras", [model_files / "images"], tmp_path / "ome", formats="ome-zarr", preprocess="unit"
    )
    recorded = zarr.open_group(str(tmp_path / "ome" / "a.ome.zarr"), mode="r").attrs["keras_fcn_surgery"]["map"]
    assert recorded["certificate_exact"] is True and recorded["certificate_cells"] == cells
    bare = kfs.predict_images(model_files / "valid.keras", [model_files / "images"], tmp_path / "bare", certify=0)
    assert all(result.certificate == "" for result in bare.results)
    with np.load(tmp_path / "bare" / "a.npz") as saved:
        assert not [key for key in saved.files if key.startswith("certificate")]


def test_predict_command_prints_each_certificate(model_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(model_files / "same.keras"), str(model_files / "images"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if ": certificate: " in line]
    assert len(lines) == 2 and all("a.png" in line or "b.png" in line for line in lines)
    assert all("8 of" in line and "max rel diff" in line and "DIFFERENT" in line for line in lines)
    assert "warning: The map differs from the sliding window" in captured.err and "padding" in captured.err
    with np.load(out / "b.npz") as saved:
        assert not bool(saved["certificate_exact"]) and "padding" in str(saved["certificate_reason"])
    assert (
        main(["predict", str(model_files / "valid.keras"), str(model_files / "images"), "-o", str(out / "v"), *UNIT])
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if ": certificate: " in line]
    assert len(lines) == 2 and all(line.endswith(": exact") for line in lines)
    off = ["predict", str(model_files / "valid.keras"), str(model_files / "images"), "-o", str(out / "off")]
    assert main([*off, "--certify", "0"]) == 0
    assert "certificate" not in capsys.readouterr().out


def test_heatmap_command_prints_the_certificate(model_files, tmp_path, capsys):
    image = model_files / "images" / "a.png"
    argv = ["heatmap", str(model_files / "valid.keras"), str(image), "--class", "1", "-o", str(tmp_path / "a.png")]
    assert main([*argv, "--certify", "3", *UNIT]) == 0
    printed = capsys.readouterr().out
    assert "certificate: 3 of 143 eligible cells" in printed and printed.count("exact") == 1
    assert (
        main(["heatmap", str(model_files / "same.keras"), str(image), "--class", "1", "-o", str(tmp_path / "b.png")])
        == 0
    )
    captured = capsys.readouterr()
    assert "certificate: 8 of" in captured.out and "DIFFERENT" in captured.out
    assert "warning: The map differs" in captured.err


def test_predict_maps_certifies_every_map():
    fcn = kfs.convert(_net("valid"))
    images = [_image(30, 30), _image(30, 30, seed=1), _image(40, 36, seed=2)]
    certified = kfs.predict_maps(fcn, images, tile=32, certify=4)  # the first two batched, the third tiled
    for image, (scores, certificate) in zip(images, certified):
        np.testing.assert_allclose(scores, kfs.predict_map(fcn, image), rtol=0, atol=1e-6)
        assert certificate.exact and len(certificate.cells) == 4


def test_heatmap_command_on_an_fcn_file_and_on_a_dense_map(model_files, tmp_path, capsys):
    image = str(model_files / "images" / "a.png")
    argv = ["heatmap", str(model_files / "valid_fcn.keras"), image, "--class", "0", "-o", str(tmp_path / "f.png")]
    assert main([*argv, *UNIT]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("certificate:"))
    assert "at its smallest input size" in line and "--input-size HxW" in line and line.endswith("exact")
    assert main([*argv, "--input-size", "16x16", "--overwrite", *UNIT]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("certificate:"))
    assert "at the classifier's input size on their 16x16 crops" in line and line.endswith("exact")
    dense = ["heatmap", str(model_files / "gap.keras"), image, "--class", "0", "-o", str(tmp_path / "d.png")]
    assert main([*dense, "--head", "dense"]) == 0  # the map is fine; it is not a sliding window
    assert "no certificate: " in capsys.readouterr().out


def test_a_certificate_on_scores_that_ignore_the_image_says_it_proves_little():
    classifier = _net("valid")
    last = classifier.layers[-1]
    kernel, bias = last.get_weights()
    last.set_weights([np.zeros_like(kernel), bias + np.arange(3)])  # the same scores on every crop
    fcn = kfs.convert(classifier, verify=False)
    image = _image(30, 30)
    scores, certificate = kfs.predict_map(fcn, image, certify=6)
    assert certificate.exact and not certificate.informative
    assert str(certificate).endswith("uninformative: the classifier's scores hardly vary across these crops")
    trained_like = kfs.convert(_net("valid"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.InexactMapWarning)
        informative = kfs.certify_map(trained_like, image, kfs.predict_map(trained_like, image))
    assert informative.exact and informative.informative
