"""Keras's PyTorch backend: the same conversions, geometry and dense maps as TensorFlow's (issue 40).

As for JAX (tests/test_backends.py), the PyTorch side runs in a subprocess under ``KERAS_BACKEND=torch`` with
TensorFlow made unimportable there (tests/backend_cases.py): the surgery and the maps must not need it.
The `torch` extra installs PyTorch (in the `test` extra: CI has it, and `.ci/run` checks that it imports).
"""

import numpy as np
import pytest
from backend_cases import application_results, save_applications
from other_backends import CLI_WITHOUT_TENSORFLOW, compare_with_tensorflow, run_under


@pytest.mark.heavy  # about 2 min on 2 cores: two keras.applications networks converted and mapped on each backend
def test_mobilenetv2_and_resnet50_under_torch_equal_tensorflow(tmp_path):
    save_applications(str(tmp_path))
    compare_with_tensorflow("torch", str(tmp_path), "applications", *application_results(str(tmp_path)))


@pytest.mark.heavy  # about a minute on 2 cores: four command-line runs, each starting PyTorch
def test_the_command_line_converts_maps_and_runs_a_job_under_torch_without_tensorflow(tmp_path, monkeypatch):
    from models import small_flatten_cnn
    from PIL import Image

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")  # as a user's shell has it: the CLI's quiet TensorFlow import runs
    small_flatten_cnn().save(tmp_path / "classifier.keras")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    convert = run_under("torch", "-c", CLI_WITHOUT_TENSORFLOW, "convert", "classifier.keras", "fcn.keras", cwd=tmp_path)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert "verified" in convert.stdout, convert.stdout
    heatmap = run_under(
        "torch", "-c", CLI_WITHOUT_TENSORFLOW, "heatmap", "fcn.keras", "a.png", "--class", "1", "-o", "map.png",
        "--execution", "torch", cwd=tmp_path,
    )  # fmt: skip
    assert heatmap.returncode == 0, heatmap.stderr[-3000:]
    assert (tmp_path / "map.png").exists()
    refused = run_under(
        "torch", "-c", CLI_WITHOUT_TENSORFLOW, "heatmap", "fcn.keras", "a.png", "--class", "1", "-o", "xla.png",
        "--execution", "xla", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "needs Keras on tensorflow" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    # The batch job, its certificates on: the same map as TensorFlow's (this process) on the same classifier.
    job = run_under(
        "torch", "-c", CLI_WITHOUT_TENSORFLOW, "predict", "classifier.keras", "a.png", "-o", "torch_out",
        "--certify", "4", cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert "certificate: 4 of" in job.stdout and "exact" in job.stdout, job.stdout
    from keras_fcn_surgery.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["predict", "classifier.keras", "a.png", "-o", "tf_out", "--certify", "4"]) == 0
    (torch_file,) = (tmp_path / "torch_out").glob("*.npz")
    (tf_file,) = (tmp_path / "tf_out").glob("*.npz")
    with np.load(torch_file) as got, np.load(tf_file) as expected:
        assert sorted(got.files) == sorted(expected.files)
        for key in expected.files:
            if expected[key].dtype.kind == "f" and not key.startswith("certificate"):  # maps, not differences
                scale = float(np.abs(expected[key]).max())
                np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5 * scale, err_msg=key)
