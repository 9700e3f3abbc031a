"""The Ray Data engine gives the local engine's outputs (heavy: starting a local Ray takes 20-60 s)."""

import os

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs

ray = pytest.importorskip("ray")
pytest.importorskip("tifffile")

from test_batch_inputs import slide_picture, write_pyramid  # noqa: E402


@pytest.mark.heavy
def test_ray_engine_matches_the_local_engine(tmp_path):
    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for n, size in enumerate([(64, 80), (96, 64), (120, 120)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"image{n}.png")
    write_pyramid(str(folder / "slide.tif"), slide_picture(size=(512, 640)), levels=2, tile=64)
    (folder / "corrupt.png").write_bytes(b"broken")
    options = {"formats": "npz,geojson", "mask": "auto", "tile": 128}
    local = kfs.predict_images(fcn, [str(folder)], tmp_path / "local", **options)
    distributed = kfs.predict_images(fcn, [str(folder)], tmp_path / "ray", engine="ray", workers=2, **options)
    assert not ray.is_initialized()  # the local Ray started for the job is shut down
    assert [(os.path.basename(r.source), r.status) for r in distributed.results] == [
        (os.path.basename(r.source), r.status) for r in local.results
    ]
    assert "corrupt.png" in distributed.failed[0].message
    done = [r for r in distributed.results if r.status == "done"]  # certificates come back from the workers
    assert done and all(r.certificate.startswith("certificate: 8 of") for r in done)
    for name in ("image0", "image1", "image2", "slide"):
        expected = np.load(tmp_path / "local" / f"{name}.npz")["scores"]
        np.testing.assert_array_equal(np.load(tmp_path / "ray" / f"{name}.npz")["scores"], expected)
        assert (tmp_path / "ray" / f"{name}.geojson").read_text() == (
            tmp_path / "local" / f"{name}.geojson"
        ).read_text()
    rerun = kfs.predict_images(fcn, [str(folder)], tmp_path / "ray", engine="ray", workers=2, **options)
    assert rerun.count("skipped") == 4 and rerun.count("failed") == 1


@pytest.mark.heavy
def test_a_ray_run_prints_nothing_of_rays_own(tmp_path, capfd):
    # Issue 28: every run printed Ray's token-authentication warning, Ray Data's execution lines and an
    # error-level core-worker line about actor constructor arguments.
    import logging

    import ray.data  # noqa: F401  (configures the `ray.data` logger)

    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    levels = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    capfd.readouterr()
    summary = kfs.predict_images(fcn, [str(tmp_path / "a.png")], tmp_path / "maps", engine="ray", workers=1)
    captured = capfd.readouterr()
    assert summary.ok and (tmp_path / "maps" / "a.npz").is_file()
    assert captured.out == "" and captured.err == "", captured
    assert {name: logging.getLogger(name).level for name in levels} == levels  # Ray's own settings restored


@pytest.mark.heavy
def test_ray_regions_of_one_slide_give_the_local_bytes_and_resume(tmp_path, monkeypatch):
    from test_shards import _assert_same_outputs

    from keras_fcn_surgery.batch import shards
    from keras_fcn_surgery.batch.sources import Source

    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    write_pyramid(str(tmp_path / "img.tif"), slide_picture(size=(200, 300), patch=(slice(40, 150), slice(60, 250))))
    options = {"formats": "npz,geojson,csv,zarr,ome-zarr", "mask": "auto", "execution": "tf", "certify": 0}
    kfs.predict_images(fcn, [str(tmp_path / "img.tif")], tmp_path / "local", **options)
    real = shards.run_region

    def lost(fcn, source, out_dir, batch_options, region):  # an interrupted first run: region 0 only
        if region.index > 0:
            raise KeyboardInterrupt
        return real(fcn, source, out_dir, batch_options, region)

    monkeypatch.setattr(shards, "run_region", lost)
    with pytest.raises(KeyboardInterrupt):
        kfs.predict_images(fcn, [str(tmp_path / "img.tif")], tmp_path / "ray", shards=3, shard_rows=4, **options)
    monkeypatch.setattr(shards, "run_region", real)
    finish = shards.finish_input
    done = os.path.join(shards.work_folder(str(tmp_path / "ray"), Source(str(tmp_path / "img.tif"), "img")), "done")
    records = {}
    monkeypatch.setattr(
        shards, "finish_input", lambda *a, **k: (records.update(shards.region_records(a[1].work)), finish(*a, **k))[1]
    )
    summary = kfs.predict_images(
        fcn, [str(tmp_path / "img.tif")], tmp_path / "ray", engine="ray", workers=2, shards=3, shard_rows=4, **options
    )
    assert summary.ok and not ray.is_initialized()
    _assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert not os.path.exists(done)  # the work folder goes once the outputs are published
    assert sorted(records) == [0, 1, 2] and records[0]["pid"] == os.getpid()  # region 0: the first run's
    assert {records[1]["pid"], records[2]["pid"]}.isdisjoint({os.getpid()})  # the others: Ray's workers


@pytest.mark.heavy
def test_more_regions_than_workers_finishing_in_any_order_give_the_local_bytes(tmp_path, monkeypatch):
    """Seven regions on two workers: they finish in whatever order Ray runs them (a region writing past its rows
    would show here by chance only: test_shards.py runs them reversed and shuffled to see it every time)."""
    from test_shards import _assert_same_outputs

    from keras_fcn_surgery.batch import shards

    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    write_pyramid(str(tmp_path / "img.tif"), slide_picture(size=(200, 300), patch=(slice(40, 150), slice(60, 250))))
    options = {"formats": "npz,geojson,csv,zarr,ome-zarr", "mask": "auto", "execution": "tf", "certify": 0}
    kfs.predict_images(fcn, [str(tmp_path / "img.tif")], tmp_path / "local", **options)
    finish, records = shards.finish_input, {}
    monkeypatch.setattr(
        shards, "finish_input", lambda *a, **k: (records.update(shards.region_records(a[1].work)), finish(*a, **k))[1]
    )
    summary = kfs.predict_images(
        fcn, [str(tmp_path / "img.tif")], tmp_path / "ray", engine="ray", workers=2, shards=7, shard_rows=4, **options
    )
    assert summary.ok and not ray.is_initialized()
    _assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert sorted(records) == list(range(7))  # seven regions, each computed once by the two workers
    assert os.getpid() not in {record["pid"] for record in records.values()}


class _StopAfter:
    """A progress bar that interrupts the driver (Ctrl-C) once ``count`` rows came back."""

    def __init__(self, count: int):
        self.count, self.seen = count, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.count:
            raise KeyboardInterrupt


@pytest.mark.heavy
def test_one_slide_on_ray_without_shards_uses_regions_and_resumes_them(tmp_path, monkeypatch):
    """Issue 39: without `shards`, a slide ran as one region on one worker and an interrupted run started over.
    Now its regions follow from its size and the workers; a run interrupted after all but one region resumes
    that one only, and the outputs are the local bytes, under the default execution ("auto", fixed once for the
    slide)."""
    import json
    from dataclasses import replace

    from test_shards import _assert_same_outputs

    from keras_fcn_surgery.batch import ray_engine, shards
    from keras_fcn_surgery.batch.sources import Source

    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    slide = str(tmp_path / "img.tif")
    write_pyramid(slide, slide_picture(size=(512, 640), patch=(slice(60, 460), slice(80, 560))), levels=2, tile=64)
    options = {"formats": "npz,geojson,csv,zarr,ome-zarr", "mask": "auto", "certify": 0}
    kfs.predict_images(fcn, [slide], tmp_path / "local", **options)  # below the local size: one pass
    assert not (tmp_path / "local" / ".shards-img").exists()
    work = shards.work_folder(str(tmp_path / "ray"), Source(slide, "img"))

    real_plan, real_bar = shards.plan_input, ray_engine.progress_bar

    def interrupted_before_region_0(*args):  # region 0 is still running when the driver is interrupted
        plan = real_plan(*args)
        return replace(plan, pending=tuple(r for r in plan.pending if r.index != 0))

    monkeypatch.setattr(shards, "plan_input", interrupted_before_region_0)
    monkeypatch.setattr(ray_engine, "progress_bar", lambda total, *a: _StopAfter(total))
    with pytest.raises(KeyboardInterrupt):
        kfs.predict_images(fcn, [slide], tmp_path / "ray", engine="ray", workers=2, **options)
    assert not ray.is_initialized()
    monkeypatch.setattr(shards, "plan_input", real_plan)
    monkeypatch.setattr(ray_engine, "progress_bar", real_bar)
    with open(os.path.join(work, "plan.json")) as handle:
        cut = json.load(handle)["regions"]
    assert len(cut) >= 4  # two regions a worker at least, without `shards`
    before = shards.region_records(work)
    assert sorted(before) == list(range(1, len(cut)))  # all but region 0, by Ray's workers
    assert os.getpid() not in {r["pid"] for r in before.values()}

    finish, records = shards.finish_input, {}
    monkeypatch.setattr(
        shards, "finish_input", lambda *a, **k: (records.update(shards.region_records(a[1].work)), finish(*a, **k))[1]
    )
    summary = kfs.predict_images(fcn, [slide], tmp_path / "ray", engine="ray", workers=2, **options)
    assert summary.ok and not ray.is_initialized()
    assert sorted(records) == list(range(len(cut)))
    assert [i for i in records if records[i] != before.get(i)] == [0]  # only region 0 computed again
    assert {r["execution"] for r in records.values()} == {"tf"}  # "auto", fixed once: below the measured size
    _assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert not os.path.exists(work)
