"""`graph` on a plain install: TensorFlow 2.21 no longer brings `tensorboard`, and the event files are written
without it; a failure leaves no partial run behind."""

import os
import subprocess
import sys

import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.exporting import tensorboard as tensorboard_export
from keras_fcn_surgery.exporting.tensorboard import PLAN_TAG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI with every `tensorboard` module made unimportable, as after `pip install .` of TF 2.21.
WITHOUT_TENSORBOARD = """
import sys


class NoTensorBoard:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTensorBoard())
from keras_fcn_surgery import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def _run_without_tensorboard(*args):
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORBOARD, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_graph_writes_both_runs_and_the_plan_without_tensorboard(tmp_path):
    model = tmp_path / "model.keras"
    small_flatten_cnn().save(model)
    logs = tmp_path / "logs"

    done = _run_without_tensorboard("graph", str(model), "--logdir", str(logs))

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"view with: tensorboard --logdir {logs}" in done.stdout
    assert 'pip install "keras-fcn-surgery[tensorboard]"' in done.stdout  # what provides `tensorboard` here
    assert sorted(os.listdir(logs)) == ["fcn", "source"]
    # Read back by TensorBoard's own reader (installed in this test environment): both graphs, and the plan.
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    runs = {}
    for run in ("source", "fcn"):
        runs[run] = accumulator.EventAccumulator(str(logs / run))
        runs[run].Reload()
        assert runs[run].Tags()["graph"]
    (event,) = runs["fcn"].Tensors(PLAN_TAG)
    assert "fc1" in event.tensor_proto.string_val[0].decode()
    plugin = runs["fcn"].SummaryMetadata(PLAN_TAG).plugin_data.plugin_name
    assert plugin == "text"  # shown in TensorBoard's Text tab


def test_a_failed_graph_leaves_no_partial_run(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tensorboard_export, "_write_text", fail)
    logs = tmp_path / "logs"
    with pytest.raises(RuntimeError, match="disk full"):
        kfs.log_graphs(small_flatten_cnn(), logs)
    assert os.listdir(tmp_path) == []  # the folder this call created goes too

    logs.mkdir()
    (logs / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk full"):
        kfs.log_graphs(small_flatten_cnn(), logs)
    assert os.listdir(logs) == ["notes.txt"]  # so a rerun is not refused as "already holds the runs"
    monkeypatch.undo()
    assert kfs.log_graphs(small_flatten_cnn(), logs) == (str(logs / "source"), str(logs / "fcn"))
