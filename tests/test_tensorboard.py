"""TensorBoard op graphs of the source and the FCN, and the plan as a text summary."""

import os

import pytest
from conftest import run_tool
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.exporting.tensorboard import PLAN_TAG
from keras_fcn_surgery.zoo import caffenet

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")



def read_run(folder):
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def layer_ops(graph_def, layer: str) -> set:
    """Op types of the nodes inside a layer's name scope (``.../fc6/...`` or ``.../fc6_1/...``)."""
    ops = set()
    for node in graph_def.node:
        scopes = node.name.split("/")
        if any(scope == layer or scope.startswith(f"{layer}_") for scope in scopes[:-1]):
            ops.add(node.op)
    return ops


def plan_text(accumulator) -> str:
    (event,) = accumulator.Tensors(PLAN_TAG)
    return event.tensor_proto.string_val[0].decode()


def test_caffenet_graphs_show_fc6_before_and_after_surgery(tmp_path):
    source = caffenet()
    runs = kfs.log_graphs(source, tmp_path / "logs")

    assert runs == (str(tmp_path / "logs" / "source"), str(tmp_path / "logs" / "fcn"))
    fcn_run, source_run = read_run(runs[1]), read_run(runs[0])
    assert fcn_run.Tags()["graph"] and source_run.Tags()["graph"]

    fcn_graph, source_graph = fcn_run.Graph(), source_run.Graph()
    assert "Conv2D" in layer_ops(fcn_graph, "fc6") and "MatMul" not in layer_ops(fcn_graph, "fc6")
    assert "MatMul" in layer_ops(source_graph, "fc6") and "Conv2D" not in layer_ops(source_graph, "fc6")
    (image_input,) = [node for node in fcn_graph.node if node.name == "data"]
    assert image_input.op == "Placeholder"
    assert [d.size for d in image_input.attr["shape"].shape.dim] == [-1, -1, -1, 3]

    table = str(kfs.plan(source))
    assert "fc6" in table and "Conv2D (6, 6, 256, 4096)" in table
    assert table in plan_text(fcn_run)


def test_graph_cli_writes_both_runs(tmp_path, capsys):
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    assert cli.main(["graph", model_file, "--logdir", str(tmp_path / "logs")]) == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    fcn_run = read_run(tmp_path / "logs" / "fcn")
    assert "Conv2D" in layer_ops(fcn_run.Graph(), "fc1")
    assert "fc1" in plan_text(fcn_run)
    assert read_run(tmp_path / "logs" / "source").Tags()["graph"]


def test_graph_cli_reports_a_missing_model(tmp_path, capsys):
    assert cli.main(["graph", str(tmp_path / "missing.keras"), "--logdir", str(tmp_path / "logs")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "logs")


def test_log_graph_tool(tmp_path):
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    done = run_tool("log_graph.py", "--model", model_file, "--logdir", str(tmp_path / "logs"), "--head", "dense")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "logs")) == ["fcn", "source"]
    usage = run_tool("log_graph.py", "--model", model_file)
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines()[-1].startswith("error: flag --logdir")


def test_the_tools_keep_tensorflows_start_up_log_off_the_terminal(tmp_path):
    # Issue 28: tools/log_graph.py and tools/export_savedmodel.py printed CUDA and absl lines on every run.
    import subprocess
    import sys

    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "log_graph.py")
    done = subprocess.run(
        [sys.executable, tool, "--model", model_file, "--logdir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if "cuda" in line.lower() or "oneDNN" in line], done.stderr
