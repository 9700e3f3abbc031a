"""Kill-safe exports and conversions: SIGTERM/SIGINT leave nothing; SIGKILL's leftovers are cleaned by the next run."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.exporting.savedmodel import next_version
from keras_fcn_surgery.saving import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's and absl's own log lines (C++ logging), which are not this package's output.
_RUNTIME_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the following instructions)")


def start_cli(args, tmp_path, pause_at: str):
    """Start ``keras-fcn-surgery ARGS`` paused at ``pause_at``; returns the process once it waits there."""
    ready = tmp_path / "ready"
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        atomic.PAUSE_AT_ENV: pause_at,
        atomic.PAUSE_READY_ENV: str(ready),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_fcn_surgery.cli", *args],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the command never reached {pause_at!r} (exit {process.returncode}): {err[-2000:]}")
        time.sleep(0.1)
    ready.unlink()
    return process


def own_lines(stderr: str) -> list:
    return [line for line in stderr.strip().splitlines() if line.strip() and not _RUNTIME_LOG.match(line)]


def finish_after(process, signal_number):
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "small.keras"
    small_flatten_cnn().save(path)
    return str(path)


def test_sigterm_while_checking_a_written_savedmodel_leaves_nothing(tmp_path, model_file):
    export_dir = tmp_path / "models"
    process = start_cli(["export", model_file, str(export_dir)], tmp_path, pause_at="check")
    partial = [name for name in os.listdir(export_dir) if ".partial-" in name]
    assert len(partial) == 1 and partial[0].startswith(f".1.partial-{process.pid}-")  # the written SavedModel
    assert os.listdir(export_dir / partial[0] / "new")  # it is really there, so the clean-up is real

    code, out, err = finish_after(process, signal.SIGTERM)

    assert code == 143, err
    assert own_lines(err) == ["terminated (SIGTERM); no partial output left behind."]
    assert "Traceback" not in err
    assert not export_dir.exists()  # the folder this export created goes too


@pytest.mark.heavy  # a slow export in a subprocess; the default run covers the same path for SavedModel
def test_sigint_during_an_onnx_export_leaves_an_existing_file_untouched(tmp_path, model_file):
    pytest.importorskip("tf2onnx")
    target = tmp_path / "fcn.onnx"
    target.write_bytes(b"previous export")
    args = ["export", model_file, str(target), "--format", "onnx", "--overwrite"]
    process = start_cli(args, tmp_path, pause_at="publish")

    code, out, err = finish_after(process, signal.SIGINT)

    assert code == 130, err
    assert own_lines(err) == ["interrupted (SIGINT); no partial output left behind."]
    assert target.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["fcn.onnx"]


@pytest.mark.heavy  # a slow export in a subprocess; the default run covers the same path for SavedModel
def test_sigint_before_an_openvino_folder_is_published_leaves_the_existing_one_untouched(tmp_path, model_file):
    pytest.importorskip("openvino")
    target = tmp_path / "fcn_ov"
    target.mkdir()
    (target / "model.xml").write_text("previous export")
    args = ["export", model_file, str(target), "--format", "openvino", "--overwrite"]
    process = start_cli(args, tmp_path, pause_at="publish")
    (partial,) = [name for name in os.listdir(tmp_path) if name.startswith(".fcn_ov.partial-")]
    assert sorted(os.listdir(tmp_path / partial / "new")) == ["model.bin", "model.xml"]  # written, checked

    code, out, err = finish_after(process, signal.SIGINT)

    assert code == 130, err
    assert own_lines(err) == ["interrupted (SIGINT); no partial output left behind."]
    assert os.listdir(target) == ["model.xml"] and (target / "model.xml").read_text() == "previous export"
    assert sorted(os.listdir(tmp_path)) == ["fcn_ov"]


@pytest.mark.heavy
def test_sigterm_before_a_conversion_is_published_leaves_nothing(tmp_path, model_file):
    process = start_cli(["convert", model_file, str(tmp_path / "fcn.keras")], tmp_path, pause_at="publish")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".fcn.keras.partial-")]

    code, out, err = finish_after(process, signal.SIGTERM)

    assert code == 143, err
    assert own_lines(err) == ["terminated (SIGTERM); no partial output left behind."]
    assert os.listdir(tmp_path) == []


@pytest.mark.heavy  # the default suite has the same clean-up, without a real SIGKILL, below
def test_sigkill_leftovers_are_hidden_from_tf_serving_and_removed_by_the_next_export(tmp_path, model_file):
    export_dir = tmp_path / "models"
    process = start_cli(["export", model_file, str(export_dir)], tmp_path, pause_at="check")
    process.kill()  # SIGKILL: nothing can clean up
    process.communicate(timeout=60)
    (left,) = os.listdir(export_dir)
    assert left.startswith(".1.partial-") and atomic.is_stale_temporary(left)
    assert next_version(export_dir) == 1  # hidden and not numeric: not a version
    # A live writer's temporary (this process's) must survive the clean-up.
    live = atomic.make_temporary_dir(export_dir, stem="7")

    result = kfs.export_savedmodel(small_flatten_cnn(), export_dir, bytes_signature=False)

    assert result.version == 1
    assert sorted(os.listdir(export_dir)) == sorted(["1", os.path.basename(live)])


def test_stale_temporaries_are_told_from_live_ones(tmp_path):
    if atomic.process_start_time(1) is None:
        pytest.skip("no /proc here: start times cannot be read")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, start, init_start = int(dead.stdout), atomic.process_start_time(), atomic.process_start_time(1)
    names = {
        f".1.partial-{dead_pid}-{start}-abc": True,  # its writer is gone
        f".x.onnx.partial-{dead_pid}-{start}-abc": True,
        f".1.partial-{os.getpid()}-{start}-abc": False,  # this process: live
        f".1.partial-{os.getpid()}-zzzzzz-abc": True,  # this pid, another start time: a recycled pid
        f".1.partial-1-{init_start}-abc": False,  # pid 1, started when the name says: live
        ".1.partial-abc123": False,  # old-style name without a pid: never guessed at
        "1": False,
        "notes.partial-1-2-3": False,  # not hidden: not ours
    }
    for name, stale in names.items():
        (tmp_path / name).mkdir()
        assert atomic.is_stale_temporary(name) == stale, name

    removed = {os.path.basename(path) for path in atomic.remove_stale_temporaries(tmp_path)}

    assert removed == {name for name, stale in names.items() if stale}
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, stale in names.items() if not stale)


def test_next_write_removes_a_dead_writers_temporary_and_keeps_a_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    start = atomic.process_start_time() or "0"
    stale = tmp_path / f".fcn.keras.partial-{int(dead.stdout)}-{start}-abcd"
    (stale / "fcn.keras").mkdir(parents=True)  # what a SIGKILLed `convert` leaves
    live = atomic.make_temporary_dir(tmp_path, stem="other.keras")
    assert next_version(tmp_path) == 1  # hidden, not numeric: never a version

    with atomic.atomic_output(tmp_path / "fcn.keras", suffix=".keras") as temporary:
        with open(temporary, "wb") as handle:
            handle.write(b"model")

    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "fcn.keras"])


def test_atomic_output_removes_its_temporary_on_keyboard_interrupt(tmp_path):
    target = tmp_path / "out.keras"
    with pytest.raises(KeyboardInterrupt), atomic.atomic_output(target, suffix=".keras") as temporary:
        with open(temporary, "wb") as handle:
            handle.write(b"half")
        assert os.path.basename(os.path.dirname(temporary)).startswith(f".out.keras.partial-{os.getpid()}-")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_removing_a_temporary_outlasts_a_writer_that_is_still_adding_files(tmp_path):
    """An interrupted zarr write can still land from its I/O thread: the folder must end up gone all the same."""
    import threading

    folder = tmp_path / ".partial-writer"
    folder.mkdir()
    stop = time.monotonic() + 0.5

    def keep_writing():
        count = 0
        while time.monotonic() < stop:
            # Like zarr's local store: recreate the parent folders, then write a chunk.
            (folder / "scores" / "c").mkdir(parents=True, exist_ok=True)
            (folder / "scores" / "c" / str(count)).write_bytes(b"x" * 64)
            count += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    time.sleep(0.05)
    atomic.remove_tree(folder, settle=0.2)
    gone = not folder.exists()  # a single shutil.rmtree leaves it (the writer recreates it at once)
    writer.join()
    assert gone


@pytest.mark.heavy  # two command-line runs; test_shards has the same resume without a real SIGKILL
def test_sigkill_mid_region_leaves_that_region_to_the_next_run(tmp_path, model_file):
    from test_batch_inputs import slide_picture
    from test_shards import _assert_same_outputs

    from keras_fcn_surgery.batch import shards

    Image.fromarray(slide_picture(size=(200, 300))).save(tmp_path / "img.png")
    arguments = ["predict", model_file, str(tmp_path / "img.png"), "--format", "npz,csv,zarr,ome-zarr,geojson"]
    arguments += ["--execution", "tf", "--tile", "64", "--shards", "3", "--shard-rows", "4"]
    out = tmp_path / "sharded"
    process = start_cli([*arguments, "--out", str(out)], tmp_path, pause_at="region 1")
    process.kill()  # SIGKILL after region 1's chunks, before its record
    process.communicate(timeout=60)
    (work,) = os.listdir(out)
    assert work.startswith(".shards-") and os.listdir(out / work / "done") == ["0.json"]  # no output yet
    rerun = subprocess.run(
        [sys.executable, "-m", "keras_fcn_surgery.cli", *arguments, "--out", str(out)],
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    local = subprocess.run(
        [sys.executable, "-m", "keras_fcn_surgery.cli", *arguments[:-4], "--out", str(tmp_path / "local")],
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, local.stderr[-2000:]
    _assert_same_outputs(out, tmp_path / "local")
    assert shards.region_records(str(out / work)) == {}  # published, the work folder is gone
