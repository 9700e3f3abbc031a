"""What every export format shares: the format protocol, the result, and the check in a fresh process.

`exporting.api.export` runs the one orchestration: make the format (its own
options checked first) -> refuse a bad output path -> load or convert the
model (`surgery.fcn.as_fcn`) -> the format's checks on the FCN -> pick the
check sizes -> temporary path (a hidden, pid-stamped name beside the output,
see `saving.atomic`) -> write -> check in a fresh process against Keras ->
publish (an atomic rename). The check compares what `convert` compares, by
the same rule: the logits where the model ends in a softmax or sigmoid (a
twin of the file written without it, run in the same process), then the
file's own outputs. A format (`savedmodel.py`, `onnx.py`, `tflite.py`,
`openvino.py`) is an `ExportFormat`: it writes its file and supplies the
small script that runs it; nothing else.

Backends: a writer runs on the Keras backend its format names
(`ExportFormat.backend`): TensorFlow for tf2onnx, the TFLite converter,
SavedModel and Keras's OpenVINO exporter (they all trace a `tf.function`),
PyTorch for the ``torch`` format (`torch.export`). Under another backend
(``KERAS_BACKEND=jax``) `write_export` saves the model as a ``.keras`` file
(backend-neutral) and runs the same writer in a fresh process on the format's
backend; the check still compares the written file with the model on the
process's own backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError, ExportError  # ExportError: also importable from here
from keras_fcn_surgery.graph import iter_layers, model_layout, producer_of
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.saving.atomic import atomic_output, check_output_path
from keras_fcn_surgery.surgery.fcn import fcn_spec
from keras_fcn_surgery.surgery.verify import VerificationResult, compare_scores

# Seconds the fresh process may take to load and run an export.
CHECK_TIMEOUT = 900


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how it was checked.

    Attributes:
        path: the version folder (SavedModel), the ``.onnx`` or ``.tflite`` file, the OpenVINO folder.
        version: the SavedModel version, or None for the other formats.
        checks: one `VerificationResult` per checked input size, comparing
            the reloaded export with the Keras model on what `convert`
            compares: for a model ending in a softmax or sigmoid, the logits
            (``compared``: ``"logits of 'fc8'"``), from a twin of the file
            written by the same writer without that activation; else the
            file's outputs.
        note: what the checks mean where they are not a pass/fail proof
            (a quantized TFLite model: its measured difference, reported,
            not enforced); empty otherwise.
        output_checks: where ``checks`` are on the twin's logits, one per
            size on the written file's own outputs (probabilities), held to
            the same tolerance; empty otherwise.
    """

    path: str
    version: int | None
    checks: tuple[VerificationResult, ...]
    note: str = ""
    output_checks: tuple[VerificationResult, ...] = ()

    def __str__(self) -> str:
        lines = [f"wrote {self.path}" + (f" (version {self.version})" if self.version is not None else "")]
        lines += [f"  {check}" for check in self.checks]
        lines += [f"  file outputs: {check}" for check in self.output_checks]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    @property
    def max_rel_diff(self) -> float:
        """The largest relative difference from the Keras model over all checked sizes."""
        return max((check.max_rel_diff for check in self.checks), default=float("nan"))


class Destination(NamedTuple):
    """Where an export goes: ``staging`` yields the temporary path and publishes it to ``path`` on a clean exit."""

    staging: Any
    path: str
    version: int | None


@dataclass(frozen=True)
class ExportFormat:
    """One export format: how it writes its file and how that file is checked; the orchestration is `export`'s.

    A format is a frozen dataclass of its own options, checked when it is made
    (before any model is loaded or any file touched).

    Class attributes:
        name: the ``format=`` value (`options.EXPORT_FORMATS`).
        what: how messages name the written export, with ``{name}`` for the model's name.
        check_script: the script `run_check_script` runs on the written file
            (loads PATH, runs every array of INPUTS.npz, saves each output's
            map in OUTPUTS.npz under `output_key`).
    """

    name: ClassVar[str]
    what: ClassVar[str]
    check_script: ClassVar[str]
    # The Keras backend the writer runs on (`write_export`).
    backend: ClassVar[str] = "tensorflow"
    # The precisions its file can be written at and its runtime runs (`export(precision=...)`), and why not others.
    precisions: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")
    precision_refusal: ClassVar[str] = ""

    @property
    def enforce(self) -> bool:
        """Whether a difference from Keras above the tolerance fails the export (False: only measured)."""
        return True

    def output(self, path, *, overwrite: bool) -> str:
        """The output path, refused before any work when it cannot be written."""
        return os.fspath(path)

    def accept(self, fcn) -> None:
        """Refuse an FCN this format cannot hold (raises `ExportError`), before anything is written."""

    def check_precision(self, precision: str) -> None:
        """Refuse a precision this format cannot hold (`ExportError`), before any model is loaded.

        Raises:
            InputError: for a precision other than float32, bfloat16 or float16.
            ExportError: for one the format's file or runtime cannot hold.
        """
        engines.check_precision(precision)
        if precision not in self.precisions:
            raise ExportError(
                f"A {self.name} export cannot be written at precision={precision!r}: {self.precision_refusal}. "
                f"Its precisions are {', '.join(map(repr, self.precisions))}."
            )

    def at_precision(self, fcn, precision: str):
        """``(format, model)`` that write ``fcn`` at ``precision``: this format and ``fcn`` for float32, else
        `reduced_precision` of it (a format whose writer stores the precision its own way overrides this)."""
        return self, (fcn if precision == "float32" else reduced_precision(fcn, precision))

    def destination(self, path: str, *, overwrite: bool) -> contextlib.AbstractContextManager[Destination]:
        """Where the export goes; leaving the context by an exception removes whatever it created."""
        raise NotImplementedError

    def write(self, fcn, path: str) -> None:
        """Write ``fcn`` at the temporary ``path``."""
        raise NotImplementedError

    def fit_sizes(self, fcn, sizes) -> tuple[ExportFormat, tuple]:
        """The format and the check sizes it is written and checked for (this format and ``sizes`` as they are,
        unless the format's file depends on them)."""
        return self, tuple(sizes)

    def twin(self) -> ExportFormat:
        """The format a check's logits twin is written in (see `exporting.api.export`): this one, less what the
        check does not run."""
        return self

    def check_inputs(self, fcn, batches: dict) -> dict:
        """The channels-last check batches as the written file takes them."""
        return batches

    def check_outputs(self, fcn, outputs: dict) -> dict:
        """The file's outputs, channels-last, as `compare_outputs` takes them."""
        return outputs

    def note(self, checks: tuple[VerificationResult, ...]) -> str:
        """What the checks mean where they are not a pass/fail proof (`ExportResult.note`)."""
        return ""


class ModelLayoutIO:
    """For a format whose file keeps the model's own layout (NCHW for a channels-first model: ONNX, OpenVINO):
    the check feeds it the batches in that layout and reads its maps back channels-last."""

    def check_inputs(self, fcn, batches: dict) -> dict:
        layout = model_layout(fcn)
        return {key: layout.from_channels_last(images) for key, images in batches.items()}

    def check_outputs(self, fcn, outputs: dict) -> dict:
        layout = model_layout(fcn)
        return {key: layout.to_channels_last(y) for key, y in outputs.items()}


@dataclass(frozen=True)
class FileFormat(ExportFormat):
    """A format written as one file ending in ``suffix``, whose folder must exist."""

    suffix: ClassVar[str]

    def output(self, path, *, overwrite: bool) -> str:
        return check_output_path(path, suffix=self.suffix, overwrite=overwrite)

    @contextlib.contextmanager
    def destination(self, path: str, *, overwrite: bool) -> Iterator[Destination]:
        yield Destination(atomic_output(path, suffix=self.suffix, overwrite=overwrite), path, None)


def reduced_precision(fcn, precision: str):
    """A copy of ``fcn`` that computes at ``precision`` (``"bfloat16"``, ``"float16"``), same weights.

    Its layers run under Keras's mixed policy (``mixed_bfloat16``,
    ``mixed_float16``: variables in float32, each layer's inputs, weights and
    outputs in the reduced type, what `predict_map` runs at that precision);
    the layers that give the model's outputs compute in float32, so that the
    file's maps come out in float32 (as Keras advises for a final softmax).
    At bfloat16 its BatchNormalizations are folded (`engines.policy_clone`).
    """
    policy = engines.policy_of(precision)
    assert policy is not None, "a reduced precision has a mixed policy"
    last = {producer_of(tensor).name for tensor in fcn.outputs}
    return engines.policy_clone(fcn, policy, float32_layers=last)


def check_choice(option: str, value, choices) -> None:
    """Refuse a format option's value that is not one of ``choices``."""
    if value not in choices:
        raise ExportError(f"Expected `{option}` to be one of {choices}. Received: {option}={value!r}")


def write_export(kind: ExportFormat, model, path: str) -> None:
    """``kind.write(model, path)`` on the format's Keras backend (`ExportFormat.backend`): here, or in a fresh
    process on that backend.

    Under another backend the model goes to that process as a ``.keras``
    file: its layers must be Keras's, this package's, or registered with
    `keras.saving.register_keras_serializable` (imported by the process
    through its module).

    Raises:
        ExportError: when the model cannot be saved or reloaded there, or the
            writer fails (its message).
    """
    if keras.backend.backend() == kind.backend:
        kind.write(model, path)
        return
    framework = _FRAMEWORKS.get(kind.backend, kind.backend)
    unimportable = [layer for layer in [model, *iter_layers(model)] if type(layer).__module__ == "__main__"]
    if unimportable:
        layer = unimportable[0]
        raise ExportError(
            f"Layer '{layer.name}' (class {type(layer).__name__}, defined in __main__) cannot be rebuilt in the "
            f"{framework} process that writes {kind.name} exports when Keras runs on {keras.backend.backend()}: "
            "define it in a module and register it (`keras.saving.register_keras_serializable`), or run the "
            f"export under KERAS_BACKEND={kind.backend}."
        )
    with tempfile.TemporaryDirectory(prefix="kfs-write-") as scratch:
        model_file = os.path.join(scratch, "model.keras")
        try:
            model.save(model_file)
        except Exception as error:  # noqa: BLE001 - any saving failure is this one refusal
            raise ExportError(
                f"Could not save model '{model.name}' to hand it to {framework}, which writes {kind.name} exports "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Run the export "
                f"under KERAS_BACKEND={kind.backend}."
            ) from error
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "KERAS_BACKEND": kind.backend}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        options = json.dumps(dataclasses.asdict(kind))  # type: ignore[call-overload]
        try:
            process = subprocess.run(
                [sys.executable, "-c", _WRITE_SCRIPT, kind.name, options, model_file, path],
                cwd=scratch,
                env=env,
                capture_output=True,
                text=True,
                timeout=CHECK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as error:
            raise ExportError(
                f"Writing the {kind.name} export in a {framework} process took over {CHECK_TIMEOUT} s."
            ) from error
    if process.returncode != 0:
        lines = process.stderr.strip().splitlines()
        reason = lines[-1].rstrip(".") if lines else f"exit {process.returncode}"
        raise ExportError(
            f"Writing the {kind.name} export of '{model.name}' in a {framework} process (this process runs Keras on "
            f"{keras.backend.backend()}) failed: {reason}. Run the export under KERAS_BACKEND={kind.backend}."
        )


# How messages name the framework under a Keras backend.
_FRAMEWORKS = {"tensorflow": "TensorFlow", "torch": "PyTorch", "jax": "JAX"}

# Run by `write_export` under KERAS_BACKEND=<the format's backend>: FORMAT OPTIONS_JSON MODEL.keras PATH. Its last
# stderr line is the reason of a failure.
_WRITE_SCRIPT = """
import json
import sys

try:
    import keras

    from keras_fcn_surgery.exporting.api import export_format

    kind = export_format(sys.argv[1], **json.loads(sys.argv[2]))
    model = keras.saving.load_model(sys.argv[3], compile=False, safe_mode=False)  # written a moment ago by us
    kind.write(model, sys.argv[4])
except Exception as error:
    message = str(error).strip().splitlines()
    print(f"{type(error).__name__}: {message[0] if message else ''}", file=sys.stderr)
    sys.exit(1)
"""


def run_check_script(
    script: str, paths, inputs: dict, *, what: str, timeout: float = CHECK_TIMEOUT
) -> list[dict[str, np.ndarray]]:
    """Run exports in one fresh Python that cannot import this package; returns each one's outputs by key.

    ``script`` is run as ``python -I -c script INPUTS.npz PATH OUTPUTS.npz
    [PATH OUTPUTS.npz ...]``: for each PATH it loads the export there, runs
    it on every array of INPUTS.npz and saves each output's result in its
    OUTPUTS.npz under the input's key and the output's name (`output_key`:
    ``"size0/scores"``). Importing ``keras_fcn_surgery`` fails in that
    process: an export must not need it.

    Raises:
        ExportError: when the process fails or times out.
    """
    with tempfile.TemporaryDirectory(prefix="kfs-check-") as scratch:
        inputs_file = os.path.join(scratch, "inputs.npz")
        outputs_files = [os.path.join(scratch, f"outputs{n}.npz") for n in range(len(paths))]
        np.savez(inputs_file, **inputs)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        arguments = [inputs_file] + [item for pair in zip(paths, outputs_files) for item in pair]
        try:
            process = subprocess.run(
                [sys.executable, "-I", "-c", _REFUSE_THIS_PACKAGE + script, *arguments],
                cwd=scratch,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise ExportError(f"Running {what} in a fresh process took over {timeout:g} s.") from error
        if process.returncode != 0:
            tail = " | ".join(process.stderr.strip().splitlines()[-3:])
            raise ExportError(
                f"{what} could not be loaded and run in a fresh process (exit {process.returncode}): {tail}. "
                "The export was not kept."
            )
        results = []
        for outputs_file in outputs_files:
            with np.load(outputs_file) as loaded:
                results.append({key: loaded[key] for key in loaded.files})
        return results


_REFUSE_THIS_PACKAGE = """
import sys

class _RefuseThisPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "keras_fcn_surgery" or name.startswith("keras_fcn_surgery."):
            raise ImportError("keras_fcn_surgery must not be needed to serve an export")
        return None

sys.meta_path.insert(0, _RefuseThisPackage())
"""


def image_channels(fcn) -> int:
    """The channel count of a fully convolutional model's image input."""
    try:
        return fcn_spec(fcn).channels
    except ConversionError as error:
        raise ExportError(str(error)) from error


def resolve_check_sizes(fcn, original, check_sizes=None) -> tuple[tuple[int, int], ...]:
    """The ``(H, W)`` sizes an export is checked at.

    Default: the original size (or the smallest valid one of an FCN whose
    original size is unknown) and that size plus seven output strides, where
    the map has seven more cells a side (CaffeNet: 227 and 451, a 1x1 and an
    8x8 map).
    """
    if check_sizes is not None:
        pairs = [tuple(int(d) for d in size) for size in check_sizes]
        if not pairs or any(len(size) != 2 or min(size) < 1 for size in pairs):
            raise ExportError(f"Expected `check_sizes` to be (H, W) pairs of positive ints. Received: {check_sizes}")
        return tuple((size[0], size[1]) for size in pairs)
    from keras_fcn_surgery.grid.geometry import geometry

    try:
        grid = geometry(fcn, original)
    except ConversionError as error:
        if original is None:
            segmenter_sizes = _segmenter_check_sizes(fcn)
            if segmenter_sizes is not None:
                return segmenter_sizes
            raise ExportError(
                f"The input size to check model '{fcn.name}' at is unknown ({error}). Pass "
                "`input_size=(H, W)` (CLI: --input-size) or `check_sizes`."
            ) from error
        return (original, (2 * original[0], 2 * original[1]))
    base = grid.input_size
    larger = (base[0] + 7 * grid.stride[0], base[1] + 7 * grid.stride[1])
    return (base, larger)


def _segmenter_check_sizes(fcn):
    """For a segmenter (its upsampling has no geometry of its own): its smallest size and 7 strides more."""
    from keras_fcn_surgery.segmentation.predict import minimum_size, reach

    try:
        base = minimum_size(fcn)
        _, period = reach(fcn)
    except ConversionError:
        return None
    return (base, (base[0] + 7 * period[0], base[1] + 7 * period[1]))


def keras_scores(fcn, images: np.ndarray):
    """The Keras model's map for a channels-last batch, channels-last, as float32 numpy.

    For a model with several outputs, a list of maps in the model's order.
    """
    layout = model_layout(fcn)
    x = layout.from_channels_last(images)
    result = fcn(x.astype(str(fcn.inputs[0].dtype)), training=False)
    maps = [
        layout.to_channels_last(np.asarray(keras.ops.convert_to_numpy(y))).astype(np.float32)
        for y in keras.tree.flatten(result)
    ]
    return maps if len(maps) > 1 else maps[0]


def output_key(batch: str, output: str) -> str:
    """The key of one output's map for one check batch in a check script's results (``"size0/scores"``)."""
    return f"{batch}/{output}"


def check_batches(fcn, sizes, *, batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random channels-last float32 batches, one per size, keyed ``"size0"``, ``"size1"``..."""
    rng = np.random.default_rng(seed)
    channels = image_channels(fcn)
    return {
        f"size{i}": rng.standard_normal((batch_size, h, w, channels)).astype(np.float32)
        for i, (h, w) in enumerate(sizes)
    }


def keras_maps(fcn, batches: dict) -> dict:
    """`keras_scores` of every check batch, by key (a list of maps each, for a model with several outputs)."""
    return {key: keras_scores(fcn, images) for key, images in batches.items()}


@dataclass(frozen=True)
class Compared:
    """What an export's check compares, and how its messages and results name it (`compare_outputs`).

    Attributes:
        what: how messages name the export (`ExportFormat.what`).
        names: the export's names of the model's outputs, in order
            (`savedmodel.signature_outputs`).
        labels: how the results name those outputs (default: ``names``; a
            logits twin's are those of the file it checks).
        compared: what the arrays are: ``"outputs"``, or the logits
            (`surgery.verify.logits_of`).
    """

    what: str
    names: tuple[str, ...] | list[str] = ("scores",)
    labels: tuple[str, ...] | list[str] | None = None
    compared: str = "outputs"


def compare_outputs(
    expected: dict,
    batches: dict,
    outputs: dict,
    checked: Compared,
    *,
    tolerance: float,
    enforce: bool = True,
) -> tuple[VerificationResult, ...]:
    """Compare an export's outputs with the Keras model's (`keras_maps`) on the same batches, by the one
    verification rule (`surgery.verify.compare_scores`).

    Every output is compared, each relative to its own scale (a box's
    pixel offsets do not hide a class probability's difference).

    Args:
        outputs: the export's maps by `output_key` (the batch's key, then the
            export's name of the output: `signature_outputs`).
        checked: what is compared and how it is named (`Compared`).
        tolerance: relative tolerance (`tolerance_for` the model).
        enforce: raise when a difference exceeds the tolerance; False only
            measures it (a quantized export, whose difference is reported).

    Returns:
        One `VerificationResult` per batch and output, batch by batch; for a
        model with several outputs each says which (``compared``).

    Raises:
        ExportError: when an output is missing or its shape differs, or (with
            ``enforce``) a difference exceeds the tolerance.
    """
    what, names, compared = checked.what, checked.names, checked.compared
    labels = checked.labels or names
    results = []
    for key, images in batches.items():
        wants = expected[key] if isinstance(expected[key], list) else [expected[key]]
        for name, label, want in zip(names, labels, wants, strict=True):
            want = np.asarray(want, dtype=np.float64)
            if output_key(key, name) not in outputs:
                raise ExportError(
                    f"{what} has no output '{name}' (it returns {sorted(outputs)}). The export is broken; "
                    "please report the model."
                )
            got = np.asarray(outputs[output_key(key, name)], dtype=np.float64)
            if got.shape != want.shape:
                raise ExportError(
                    f"{what} returns shape {got.shape} for output '{name}' of input {images.shape}, the Keras "
                    f"model {want.shape}. The export is broken; please report the model."
                )
            which = compared
            if len(names) > 1:
                which = f"output '{label}'" if compared == "outputs" else f"logits of output '{label}'"
            result = compare_scores([(want, got)], tolerance=tolerance, input_shape=tuple(images.shape), compared=which)
            if enforce and not result.passed:
                raise ExportError(f"{what} differs from the Keras model: {result}. The export was not kept.")
            results.append(result)
    return tuple(results)
