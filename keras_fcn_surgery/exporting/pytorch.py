"""Exporting a converted model as a PyTorch program (``.pt2``) that a process without Keras loads and runs.

Needs PyTorch (``pip install keras-fcn-surgery[torch]``). The file is a
`torch.export` ExportedProgram saved with `torch.export.save`, traced as
Keras's own exporter (``model.export(path, format="torch")``) traces it
(`torch.export.export`, non-strict) on Keras's PyTorch backend, here called
directly to trace size-obliviously (a batch of 1 stays allowed) and keep the
output names in the file. Under another backend the model goes to a fresh
``KERAS_BACKEND=torch`` process as a ``.keras`` file (`pipeline.write_export`).
Load and run it with PyTorch alone::

    program = torch.export.load("fcn.pt2").module()
    scores = program(images)  # (N, H, W, C) float32 -> (N, map H, map W, classes)

The program keeps the model's own layout (NHWC for a channels-last model, as
Keras computes; NCHW for a channels-first one) and returns one tensor, or for
a model with several outputs a list in the model's order; their names are in
the file (``extra_files["outputs.json"]``).

Sizes: batch, height and width are dynamic, but `torch.export` records the
branches the trace took on them as guards that the program checks on every
call (a failed one raises an error naming it, never a wrong map). Keras's
``same`` padding picks its split by the parity of each strided layer's input,
and PyTorch's memory-layout rules by whether a map side is 1, so the program
runs sizes congruent to the traced one modulo the network's output stride
whose map has at least two cells a side (those of `predict_map`'s tiles:
``tile`` a multiple of the stride, as `plan` picks them). It is traced at
the larger check size, and checked at two such sizes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass, replace
from typing import ClassVar

from keras_fcn_surgery.errors import ExportError, first_line
from keras_fcn_surgery.exporting.pipeline import FileFormat, ModelLayoutIO
from keras_fcn_surgery.exporting.savedmodel import signature_outputs
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.grid.geometry import geometry

# The file in the program's archive (``torch.export.save(..., extra_files=...)``) naming its outputs, in order.
OUTPUTS_FILE = "outputs.json"

# The check also refuses Keras and TensorFlow: the program must run on PyTorch alone. The refusal comes when one
# would load (`create_module`), not when it is looked for: PyTorch looks for tensorflow when it imports.
_CHECK_SCRIPT = f"""
import importlib.machinery

class _RefuseKeras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "tensorflow"):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(spec.name + " must not be needed to run a PyTorch export")

    def exec_module(self, module):
        raise AssertionError(module)

sys.meta_path.insert(0, _RefuseKeras())

import json

import numpy as np
import torch

inputs = np.load(sys.argv[1])
for path, outputs_file in zip(sys.argv[2::2], sys.argv[3::2]):
    extra = {{"{OUTPUTS_FILE}": ""}}
    program = torch.export.load(path, extra_files=extra)
    names = json.loads(extra["{OUTPUTS_FILE}"])
    module = program.module()
    outputs = {{}}
    with torch.inference_mode():
        for key in inputs.files:
            result = module(torch.from_numpy(inputs[key]))
            result = [result] if isinstance(result, torch.Tensor) else list(result)
            assert len(result) == len(names), (len(result), names)
            for name, y in zip(names, result):
                outputs[key + "/" + name] = y.numpy()
    assert "keras" not in sys.modules and "tensorflow" not in sys.modules, "the program imported Keras"
    np.savez(outputs_file, **outputs)
"""


@dataclass(frozen=True)
class TorchFormat(ModelLayoutIO, FileFormat):
    """A ``.pt2`` file: a `torch.export` program with dynamic batch, height and width, checked by PyTorch alone.

    Attributes:
        trace_size: ``(H, W)`` the program is traced at; default: the larger
            check size (the sizes it runs are those congruent to it modulo
            the output stride, see the module's notes).
    """

    trace_size: tuple[int, int] | None = None

    name: ClassVar[str] = "torch"
    suffix: ClassVar[str] = ".pt2"
    backend: ClassVar[str] = "torch"
    what: ClassVar[str] = "The PyTorch export of '{name}' (torch.export.load, no Keras)"
    check_script: ClassVar[str] = _CHECK_SCRIPT

    def __post_init__(self) -> None:
        _require_torch()
        if self.trace_size is not None:
            size = tuple(self.trace_size)
            if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
                raise ExportError(f"Expected `trace_size` to be (H, W) positive ints. Received: {self.trace_size!r}")
            object.__setattr__(self, "trace_size", size)

    def fit_sizes(self, fcn, sizes):
        """The check sizes with a map of at least two cells a side (a size whose map side is 1 gets one or two
        more output strides: PyTorch specialises a side of 1), and this format traced at the last of them."""
        fitted = []
        for size in sizes:
            try:
                grid = geometry(fcn)
                cells = grid.output_size(size)
            except Exception:  # noqa: BLE001 - a model geometry cannot follow (a segmenter): its size as it is
                fitted.append(tuple(size))
                continue
            fitted.append(tuple(side + max(0, 2 - n) * step for side, n, step in zip(size, cells, grid.stride)))
        kind = self if self.trace_size is not None else replace(self, trace_size=fitted[-1])
        return kind, tuple(fitted)

    def write(self, fcn, path: str) -> None:
        _write_torch(fcn, path, self.trace_size)


def _require_torch() -> None:
    """Refuse without PyTorch; not imported here: in a TensorFlow process, importing its compiler stack (torch._dynamo,
    triton) can crash the process, so only the writer's process on Keras's PyTorch backend imports it."""
    if importlib.util.find_spec("torch") is None:
        raise ExportError("PyTorch export needs torch, which is not installed: pip install keras-fcn-surgery[torch]")


def _write_torch(fcn, path: str, trace_size) -> None:
    """Keras's torch exporter at ``trace_size``, batch, height and width dynamic; the output names in the file."""
    import numpy as np
    import torch

    if trace_size is None:
        raise ExportError(f"The PyTorch export of '{fcn.name}' needs the size to trace it at (`trace_size`).")
    layout = model_layout(fcn)
    channels = int(layout.channels(tuple(fcn.inputs[0].shape)))
    shape = layout.batch_shape(2, trace_size[0], trace_size[1], channels)
    sample = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(str(fcn.inputs[0].dtype)))
    height, width = layout.spatial_axes
    dynamic = torch.export.Dim.DYNAMIC
    dims = {0: torch.export.Dim("batch", min=1), height: dynamic, width: dynamic}
    config = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    try:
        # Size-oblivious reasoning: without it a batch of 2 at tracing would refuse a batch of 1 later.
        with config.patch(backed_size_oblivious=True) if config is not None else contextlib.nullcontext():
            program = torch.export.export(fcn, (sample,), dynamic_shapes=[(dims,)], strict=False)
    except Exception as error:  # noqa: BLE001 - any tracing failure is this one refusal
        raise ExportError(
            f"torch.export could not trace model '{fcn.name}' at {tuple(shape)} with dynamic batch, height and "
            f"width ({type(error).__name__}: {first_line(str(error))})."
        ) from error
    names = json.dumps(list(signature_outputs(fcn)))
    torch.export.save(program, os.fspath(path), extra_files={OUTPUTS_FILE: names})
