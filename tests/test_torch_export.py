"""``export(..., format="torch")``: the FCN as a `torch.export` program that PyTorch alone loads and runs (issue 40)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli

if importlib.util.find_spec("torch") is None:  # not imported here: torch's compiler stack beside TensorFlow can crash
    pytest.skip("the torch extra is not installed", allow_module_level=True)

# Loads a .pt2 with Keras and TensorFlow made unimportable (found, but failing to load: PyTorch looks for
# tensorflow when it imports) and runs it on IN.npy: python -c LOAD PATH IN.npy OUT.npy
LOAD_WITHOUT_KERAS = """
import importlib.machinery, sys

class NoKeras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "tensorflow", "keras_fcn_surgery"):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError("blocked: " + spec.name)

sys.meta_path.insert(0, NoKeras())
import numpy as np, torch

extra = {"outputs.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra).module()
print("outputs:", extra["outputs.json"])
np.save(sys.argv[3], program(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())
print("modules:", sorted(name for name in sys.modules if name.split(".")[0] in ("keras", "tensorflow")))
"""


def run_without_keras(path, images, tmp_path):
    np.save(tmp_path / "in.npy", images)
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            LOAD_WITHOUT_KERAS,
            str(path),
            str(tmp_path / "in.npy"),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, "CUDA_VISIBLE_DEVICES": ""},
    )
    if done.returncode != 0:
        return done
    assert "modules: []" in done.stdout and 'outputs: ["scores"]' in done.stdout, done.stdout
    return np.load(tmp_path / "out.npy")


# The default suite exports a torch program in tests/test_monai_client.py (run without Keras there, against our
# map); this one adds the command line's flag handling: an export in a PyTorch process, over 30 s.
@pytest.mark.heavy
def test_the_cli_exports_a_torch_program_that_runs_without_keras(tmp_path, capsys):
    classifier = small_flatten_cnn()
    model_file = str(tmp_path / "small.keras")
    classifier.save(model_file)
    path = tmp_path / "fcn.pt2"
    assert cli.main(["export", model_file, str(path), "--format", "torch"]) == 0
    out = capsys.readouterr().out
    # Checked on the logits at two sizes whose maps have two cells a side or more (32 x 32 gives one: 36 x 36).
    assert "verified logits of 'fc2' on (2, 36, 36, 3)" in out and "verified logits of 'fc2' on (2, 60, 60, 3)" in out
    assert sorted(os.listdir(tmp_path)) == ["fcn.pt2", "small.keras"]
    fcn = kfs.as_fcn(classifier)
    # Another batch (1) and another size congruent to the traced one modulo the stride (4), in a process where
    # importing Keras or TensorFlow fails.
    images = np.random.default_rng(40).standard_normal((1, 44, 52, 3)).astype("float32")
    got = run_without_keras(path, images, tmp_path)
    expected = np.asarray(fcn(images))
    assert got.shape == expected.shape == (1, 4, 6, 5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    assert cli.main(["export", model_file, str(path), "--format", "torch"]) == 2  # no overwriting without the flag
    assert "overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["fcn.pt2", "in.npy", "out.npy", "small.keras"]


def test_a_torch_export_refuses_another_suffix_and_an_empty_trace_size(tmp_path):
    classifier = small_flatten_cnn()
    with pytest.raises(kfs.ModelFileError, match=r"\.pt2"):
        kfs.export(classifier, tmp_path / "fcn.onnx", format="torch")
    with pytest.raises(kfs.ExportError, match="trace_size"):
        kfs.export(classifier, tmp_path / "other.pt2", format="torch", trace_size=(0, 3))
    assert os.listdir(tmp_path) == []


# 33 s on 2 cores (two export checks and a load, each a PyTorch process): the default suite's torch export is
# tests/test_monai_client.py's, which also runs the program without Keras.
@pytest.mark.heavy
def test_the_torch_program_refuses_a_size_it_was_not_traced_for(tmp_path):
    result = kfs.export(
        small_flatten_cnn(),
        tmp_path / "fcn.pt2",
        format="torch",
        options=kfs.ExportOptions(check_sizes=[(40, 40), (48, 44)]),
    )
    assert [check.input_shape for check in result.checks] == [(2, 40, 40, 3), (2, 48, 44, 3)], result
    assert all(check.passed for check in (*result.checks, *result.output_checks)), result
    # 50 is not 48 modulo the stride, 4: the branch Keras's `same` padding takes differs, and a guard says so.
    refused = run_without_keras(tmp_path / "fcn.pt2", np.zeros((1, 50, 44, 3), "float32"), tmp_path)
    assert refused.returncode != 0 and "Guard failed" in refused.stderr, refused.stderr[-3000:]
