"""Exporting a converted model as OpenVINO IR (``model.xml`` + ``model.bin``) with free batch, height and width.

Needs the optional package ``openvino`` (``pip install keras-fcn-surgery[openvino]``).
The export is a folder holding ``model.xml`` (the graph) and ``model.bin``
(the weights, float32), published together by one rename of the folder, as
OpenVINO Model Server reads a version folder. The file is written by
Keras's own exporter (``model.export(path, format="openvino")``: OpenVINO's
TensorFlow frontend on the model's ``tf.function``); its input is then named
``images``, dimensions ``[?, ?, ?, C]`` (``[?, C, ?, ?]`` for a channels-first
model: the graph keeps the model's own layout, as the ONNX export does), and
its output ``scores`` (a model with several outputs: one per output, named
by its name).

Precision: on a CPU with bfloat16 units (AVX512-BF16, AMX) OpenVINO computes
in bfloat16 unless told otherwise, about three significant digits. The
export is checked as compiled with ``{"INFERENCE_PRECISION_HINT": "f32"}``
(float32, what Keras computes); compile it so to get those numbers:

    core = openvino.Core()
    compiled = core.compile_model(core.read_model("fcn_ov/model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from keras_fcn_surgery.errors import ExportError, ModelFileError, first_line
from keras_fcn_surgery.exporting.pipeline import Destination, ExportFormat, ModelLayoutIO
from keras_fcn_surgery.exporting.savedmodel import INPUT_NAME, signature_outputs
from keras_fcn_surgery.saving.atomic import atomic_folder, refuse_foreign_files

# The files of an export folder.
XML_NAME, BIN_NAME = "model.xml", "model.bin"
OUTPUT_WHAT = "OpenVINO export"
# The compile option the export is checked with (and that gives Keras's float32 numbers on any CPU).
PRECISION_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

_CHECK_SCRIPT = f"""
import os

import numpy as np
import openvino

core = openvino.Core()
inputs = np.load(sys.argv[1])
for path, outputs_file in zip(sys.argv[2::2], sys.argv[3::2]):
    model = core.read_model(os.path.join(path, "{XML_NAME}"))
    (image,) = model.inputs
    shape = image.get_partial_shape()
    assert image.get_any_name() == "{INPUT_NAME}", image.get_names()
    assert shape.rank.get_length() == 4 and sum(dim.is_dynamic for dim in shape) == 3, shape
    compiled = core.compile_model(model, "CPU", {PRECISION_CONFIG!r})
    names = [output.get_any_name() for output in compiled.outputs]
    outputs = {{}}
    for key in inputs.files:
        result = compiled({{"{INPUT_NAME}": inputs[key]}})
        for name, output in zip(names, compiled.outputs):
            outputs[key + "/" + name] = np.asarray(result[output])
    np.savez(outputs_file, **outputs)
"""


@dataclass(frozen=True)
class OpenvinoFormat(ModelLayoutIO, ExportFormat):
    """OpenVINO IR: a folder with ``model.xml`` and ``model.bin``, checked by the OpenVINO runtime (CPU, f32)."""

    name: ClassVar[str] = "openvino"
    what: ClassVar[str] = "The OpenVINO export of '{name}' (OpenVINO runtime, CPU, f32)"
    check_script: ClassVar[str] = _CHECK_SCRIPT
    precisions: ClassVar[tuple[str, ...]] = ("float32", "float16")
    precision_refusal: ClassVar[str] = (
        "OpenVINO's CPU runtime cannot run a bfloat16 graph (it computes in bfloat16 itself where the processor "
        "has it: compile the float32 export with INFERENCE_PRECISION_HINT 'bf16')"
    )

    def __post_init__(self) -> None:
        _require_openvino()

    def output(self, path, *, overwrite: bool) -> str:
        path = os.path.abspath(os.fspath(path))
        if path.endswith(".xml"):
            raise ModelFileError(
                f"Output '{path}' names a file; an OpenVINO export is a folder holding {XML_NAME} and {BIN_NAME}: "
                f"give the folder ('{path[:-4]}')."
            )
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ModelFileError(f"'{path}' exists and is not a folder; an OpenVINO export is a folder.")
        if os.path.lexists(path) and not overwrite:
            raise ModelFileError(f"Folder '{path}' exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        refuse_foreign_files(path, (XML_NAME, BIN_NAME), what=OUTPUT_WHAT)
        if not os.path.isdir(os.path.dirname(path)):
            raise ModelFileError(f"Folder '{os.path.dirname(path)}' for output '{path}' does not exist.")
        return path

    @contextlib.contextmanager
    def destination(self, path: str, *, overwrite: bool) -> Iterator[Destination]:
        own = (XML_NAME, BIN_NAME)
        staging = atomic_folder(
            path, overwrite=overwrite, what="OpenVINO folder", own_names=own, output_what=OUTPUT_WHAT
        )
        yield Destination(staging, path, None)

    def write(self, fcn, path: str) -> None:
        _write_openvino(fcn, path)

    def note(self, checks) -> str:
        return (
            f"checked as compiled with {PRECISION_CONFIG}; without it a CPU with bfloat16 units computes in "
            "bfloat16 (about 3 significant digits)"
        )


def _require_openvino():
    if importlib.util.find_spec("openvino") is None:
        raise ExportError(
            "OpenVINO export needs openvino, which is not installed: pip install keras-fcn-surgery[openvino]"
        )
    import openvino

    return openvino


def _write_openvino(fcn, folder: str) -> None:
    """Keras's exporter into a scratch folder, then the IR with this package's names, float32, into ``folder``."""
    openvino = _require_openvino()
    with tempfile.TemporaryDirectory(prefix="kfs-openvino-") as scratch:
        written = os.path.join(scratch, XML_NAME)
        try:
            fcn.export(written, format="openvino", verbose=False)
            model = openvino.Core().read_model(written)
        except Exception as error:
            raise ExportError(
                f"Keras's OpenVINO exporter could not convert model '{fcn.name}' ({type(error).__name__}: "
                f"{first_line(str(error))})."
            ) from error
        _name_io(model, fcn)
        try:
            os.makedirs(folder, exist_ok=True)
            # compress_to_fp16=False: the weights stay float32 (save_model halves them by default).
            openvino.save_model(model, os.path.join(folder, XML_NAME), compress_to_fp16=False)
        except (OSError, RuntimeError) as error:
            raise ModelFileError(
                f"Could not write the OpenVINO files in '{folder}': {first_line(str(error))}."
            ) from error


def _name_io(model, fcn) -> None:
    """Name the input ``images`` and the outputs `signature_outputs` (Keras's exporter leaves TensorFlow's)."""
    if len(model.inputs) != 1:
        raise ExportError(f"Expected one image input in the OpenVINO model of '{fcn.name}', got {len(model.inputs)}.")
    names = signature_outputs(fcn)
    if len(model.outputs) != len(names):
        raise ExportError(f"Expected {len(names)} OpenVINO outputs ({', '.join(names)}), got {len(model.outputs)}.")
    image = model.inputs[0]
    image.get_node().set_friendly_name(INPUT_NAME)
    image.get_tensor().set_names({INPUT_NAME})
    for output, name in zip(model.outputs, names):
        output.get_tensor().set_names({name})
