"""Windowed maps (issue 24) through `predict_images`, the `predict` and `heatmap` commands, masks and certificates.

A transformer (keras-hub ViT, small config) and a squeeze-and-excitation net
have no exact FCN; every map here is compared with the classifier on every
crop at the stride asked for, cut with plain numpy indexing (`crops.crop_scores`,
which shares nothing with the package), relative to the output scale, and
every output's geometry with the windows'.
"""

import json
import re

import keras
import numpy as np
import pytest
from crops import crop_scores
from models import small_flatten_cnn
from PIL import Image
from test_windowed import se_classifier, stride_id
from zoo_cases import hub_classifier

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.batch.cells import cell_edges
from keras_fcn_surgery.batch.run import predict_images
from keras_fcn_surgery.inference import windowed

TOLERANCE = 1e-5


def assert_crops(got, model, image, stride):
    """``got`` (channels last, NaN where masked) equals the classifier on every crop at ``stride``."""
    want = crop_scores(model, image, stride)
    assert got.shape == want.shape
    kept = ~np.isnan(got).any(axis=-1)
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got[kept] - want[kept]))) <= TOLERANCE * scale
    assert float(np.max(np.abs(want - want[:1, :1]))) > 1e-2 * scale  # informative: the crops differ


def write_image(path, size, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.float32)


@pytest.fixture(scope="module")
def vit():
    return hub_classifier("ViT")  # 32 x 32 windows, patches of 8: no FCN


@pytest.fixture(scope="module")
def vit_file(vit, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "vit.keras")
    vit.save(path)
    return path


@pytest.mark.parametrize("which, stride", [("vit", 8), ("se", (4, 8))], ids=["vit-8", "se-4x8"])
def test_predict_images_writes_the_windowed_maps_of_classifiers_without_an_exact_fcn(which, stride, vit, tmp_path):
    model = vit if which == "vit" else se_classifier()
    image = write_image(tmp_path / "scene.png", (61, 70))
    out = tmp_path / "maps"
    summary = predict_images(
        model, [str(tmp_path / "scene.png")], out, formats="npz,geojson,csv,ome-zarr", geojson="cells", stride=stride
    )
    assert summary.ok, summary.failed
    saved = np.load(out / "scene.npz")
    assert_crops(saved["scores"], model, image, stride)
    window = windowed.analysis(model).window
    steps = (stride, stride) if np.isscalar(stride) else stride
    assert tuple(saved["stride"]) == steps and tuple(saved["receptive_field"]) == window
    assert tuple(saved["offset"]) == (0, 0)
    # A windowed map is exact: its certificate says so.
    assert summary.results[0].certificate.endswith("exact") and bool(saved["certificate_exact"])
    # GeoJSON boxes: each cell's stride-sized box centred on its window.
    cells = saved["scores"].shape[:2]
    with open(out / "scene.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    assert len(features) == cells[0] * cells[1]
    for feature in features:
        i, j = feature["properties"]["row"], feature["properties"]["col"]
        (top,), (bottom,) = cell_edges([i], steps[0], window[0], 0)
        (left,), (right,) = cell_edges([j], steps[1], window[1], 0)
        xs, ys = zip(*feature["geometry"]["coordinates"][0])
        assert (min(xs), max(xs), min(ys), max(ys)) == (left, right, top, bottom)
        assert top + steps[0] / 2 == i * steps[0] + window[0] / 2  # centred on the crop at (i * s_h, j * s_w)
    assert (out / "scene.csv").read_text().count("\n") == cells[0] * cells[1] + 1
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(out / "scene.ome.zarr"), mode="r")
    ngff = group.attrs.asdict()  # NGFF 0.4 (the default) at the top, 0.5 under "ome"
    transforms = ngff.get("ome", ngff)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale, translation = (next(t[kind] for t in transforms if t["type"] == kind) for kind in ("scale", "translation"))
    assert scale[1:] == list(steps) and translation[1:] == [w / 2 - 0.5 for w in window]  # each window's centre


@pytest.mark.parametrize("stride", [4, (8, 4)], ids=stride_id)
def test_a_mask_skips_the_windows_it_masks_out_in_the_windowed_grid(tmp_path, monkeypatch, stride):
    model = se_classifier()
    image = write_image(tmp_path / "scene.png", (81, 97))
    mask = np.zeros((81, 97), np.uint8)
    mask[:, :40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    computed = []
    run_windows = windowed._run_windows

    def counting(plan, *args):
        computed.append(plan.windows)
        return run_windows(plan, *args)

    monkeypatch.setattr(windowed, "_run_windows", counting)
    summary = predict_images(
        model, [str(tmp_path / "scene.png")], tmp_path / "maps", mask=str(tmp_path / "mask.png"), stride=stride
    )
    assert summary.ok, summary.failed
    scores = np.load(tmp_path / "maps" / "scene.npz")["scores"]
    kept = ~np.isnan(scores).any(axis=-1)
    assert np.isnan(scores[~kept]).all()
    assert_crops(scores, model, image, stride)
    # The mask in the windowed map's grid: a window is kept when its centre's 4-pixel box (the column stride)
    # meets the mask's left 40.
    centres = np.arange(scores.shape[1]) * 4 + 29 / 2
    np.testing.assert_array_equal(kept, np.broadcast_to(centres - 2 < 40, kept.shape))
    assert computed == [int(kept.sum())] and 0 < kept.sum() < kept.size  # only the kept windows ran
    assert 0 < summary.results[0].computed_fraction < 1


@pytest.mark.parametrize("stride", [8, (8, 12)], ids=stride_id)
def test_a_channels_first_classifier_gets_its_windowed_map(tmp_path, stride):
    keras.utils.set_random_seed(11)
    model = small_flatten_cnn(input_size=(32, 32), classes=3, data_format="channels_first", softmax=False)
    image = write_image(tmp_path / "cf.png", (60, 75))
    summary = predict_images(model, [str(tmp_path / "cf.png")], tmp_path / "maps", stride=stride)  # FCN's is 4
    assert summary.ok, summary.failed
    scores = np.load(tmp_path / "maps" / "cf.npz")["scores"]
    want = crop_scores(model, np.moveaxis(image, -1, 0), stride, channels_first=True)
    scale = float(np.max(np.abs(want)))
    assert scores.shape == want.shape and float(np.max(np.abs(scores - want))) <= TOLERANCE * scale
    assert float(np.max(np.abs(want - want[:1, :1]))) > 1e-2 * scale


def test_predict_images_refuses_a_stride_the_shared_prefix_cannot_give_before_any_work(vit, tmp_path):
    write_image(tmp_path / "scene.png", (40, 40))
    with pytest.raises(kfs.InputError, match="not a multiple of 8x8.*'patch_embedding'"):
        predict_images(vit, [str(tmp_path / "scene.png")], tmp_path / "maps", stride=12)
    with pytest.raises(kfs.InputError, match="needs a `stride=`"):
        predict_images(vit, [str(tmp_path / "scene.png")], tmp_path / "maps")
    with pytest.raises(kfs.ConversionError):
        predict_images(vit, [str(tmp_path / "scene.png")], tmp_path / "maps", method="fcn")
    assert not (tmp_path / "maps").exists()


def test_certify_map_certifies_a_windowed_map_given_its_stride(vit):
    image = np.random.default_rng(3).standard_normal((45, 50, 3)).astype("float32")
    scores = kfs.predict_map(vit, image, stride=8)
    certificate = kfs.certify_map(vit, image, scores, 5, stride=8)
    assert certificate.exact and len(certificate.cells) == 5 and certificate.eligible == scores.shape[0] * 3
    scores[certificate.cells[0]] += 1.0  # a wrong cell is caught
    with pytest.warns(kfs.InexactMapWarning):
        assert not kfs.certify_map(vit, image, scores, 5, stride=8).exact
    with pytest.raises(kfs.InputError, match="needs a `stride=`"):  # a transformer's map is windowed: at what stride?
        kfs.certify_map(vit, image, scores)


def test_the_commands_run_a_transformer_windowed_and_refuse_a_bad_stride_in_one_line(vit, vit_file, tmp_path, capsys):
    image = write_image(tmp_path / "scene.png", (45, 58))
    out = tmp_path / "maps"
    assert cli.main(["predict", vit_file, str(tmp_path / "scene.png"), "-o", str(out), "--stride", "8"]) == 0
    assert_crops(np.load(out / "scene.npz")["scores"], vit, image, 8)
    assert "exact" in capsys.readouterr().out
    png = tmp_path / "heat.png"
    args = ["heatmap", vit_file, str(tmp_path / "scene.png"), "--class", "1", "-o", str(png)]
    assert cli.main([*args, "--method", "windowed", "--stride", "8x16"]) == 0
    printed = capsys.readouterr().out
    assert "map of 2x2 cells" in printed and "exact" in printed and png.is_file()
    boxes = re.findall(r"at cell \((\d+), (\d+)\), window \((\d+), (\d+), (\d+), (\d+)\)", printed)
    assert boxes  # each top class's cell, and the crop it stands for
    for i, j, top, left, bottom, right in (tuple(map(int, box)) for box in boxes):
        assert (top, left, bottom, right) == (8 * i, 16 * j, 8 * i + 32, 16 * j + 32)
    bad = ["predict", vit_file, str(tmp_path / "scene.png"), "-o", str(tmp_path / "x"), "--stride", "12"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "not a multiple of 8x8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main([*args, "--overwrite", "--stride", "6"]) == 2
    err = capsys.readouterr().err
    assert "not a multiple of 8x8" in err and "Traceback" not in err


@pytest.mark.heavy
def test_the_ray_engine_ships_the_classifier_and_writes_the_local_windowed_maps(tmp_path):
    pytest.importorskip("ray")
    model = se_classifier()
    for n, size in enumerate([(61, 70), (45, 52)]):
        write_image(tmp_path / f"image{n}.png", size, seed=n)
    inputs = [str(tmp_path / "image0.png"), str(tmp_path / "image1.png")]
    options = {"formats": "npz,geojson", "stride": 8}
    local = predict_images(model, inputs, tmp_path / "local", **options)
    distributed = predict_images(model, inputs, tmp_path / "ray", engine="ray", workers=1, **options)
    assert local.ok and distributed.ok, distributed.failed
    assert all(r.certificate.endswith("exact") for r in distributed.results)
    for name in ("image0", "image1"):
        expected = np.load(tmp_path / "local" / f"{name}.npz")
        got = np.load(tmp_path / "ray" / f"{name}.npz")
        np.testing.assert_array_equal(got["scores"], expected["scores"])
        assert tuple(got["stride"]) == (8, 8) and tuple(got["receptive_field"]) == (33, 29)
