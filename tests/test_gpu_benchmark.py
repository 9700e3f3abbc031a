"""benchmarks/gpu.py keeps working without a GPU: its smallest CPU run (issue 39)."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

pytest.importorskip("tifffile")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_benchmark_runs_its_smallest_cpu_mode(tmp_path, capsys):
    benchmark = _load()
    out = tmp_path / "rows.json"
    arguments = ["--small", "--models", "tiny", "--precisions", "float32,bfloat16", "--executions", "tf"]
    rows = benchmark.main([*arguments, "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r.model, r.precision, r.execution, r.method) for r in rows] == [
        ("tiny", "float32", "tf", "fcn"),
        ("tiny", "bfloat16", "tf", "fcn"),
    ]
    for row in rows:  # every figure measured: maps, the slide, the patch baseline (16 x 16 patches of 32 pixels)
        assert not row.note and row.patches == 256, row
        assert all(math.isfinite(x) and x > 0 for x in (row.images_per_second, row.slide_seconds, row.patch_seconds))
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2 and saved["device"] in printed
    with pytest.raises(SystemExit):
        benchmark.main(["--small", "--models", "tiny", "--precisions", "float8"])
