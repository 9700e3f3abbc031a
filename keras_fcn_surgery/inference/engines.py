"""How a forward pass runs, chosen by measurement on the machine it runs on.

The same network can run through several executions whose speed depends on
the host (processor, BLAS, core count) far more than on the network: on one
2-core AVX-512 Xeon the BLAS head (`inference.blas`) ran VGG16's fc6 at 1.8x
TensorFlow's speed, on a 2-core AVX2 EPYC it made CaffeNet twice as slow. So
no rule fitted on one machine picks the default; `choose_engine` times the
candidates the first time a (model, input shape) is run and keeps the fastest:

- ``"tf"``: the model in a `tf.function`, without XLA;
- ``"xla"``: the same compiled with XLA (``jit_compile=True``);
- ``"jax"``: the model's stateless call in `jax.jit` (its weights passed as
  arguments, not baked in as constants);
- ``"torch"``: the model called eagerly by PyTorch under `torch.inference_mode`;
- ``"blas"``: the large-kernel head convolution as blocked matrix products in
  numpy's BLAS where the graph splits there (`blas.split_forward`), the rest
  under the backend's own execution; only on a CPU, at float32.

``"tf"`` and ``"xla"`` need Keras on TensorFlow, ``"jax"`` Keras on JAX,
``"torch"`` Keras on PyTorch (``KERAS_BACKEND``); `native` names the backend's own execution, the one
``"auto"`` compares with ``"blas"`` (and ``"xla"`` on TensorFlow).

Passes below `MEASURE_MACS` multiply-accumulates per call run the native
engine untimed (a measurement would cost more than any saving, and XLA's
compile time alone exceeds such a pass). The choice is kept for the process
and in a JSON file (`cache_path`) keyed by the model's architecture, the input
shape, the backend and its version, and the host, so that later processes skip
the timing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import threading
import time
import weakref
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.cost import pass_cost
from keras_fcn_surgery.errors import InputError, ModelFileError
from keras_fcn_surgery.graph import batch_norm_folds, is_layer, iter_layers, model_facts, model_layout
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.inference.blas import split_forward
from keras_fcn_surgery.inference.fragments import fragments_forward, fragments_refusal
from keras_fcn_surgery.inference.runner import input_dtype
from keras_fcn_surgery.inference.stitch import stitch_refusal, stitched_forward
from keras_fcn_surgery.names import runtime_name
from keras_fcn_surgery.saving.atomic import atomic_output
from keras_fcn_surgery.surgery.kernels import batch_norm_affine, fold_affine_after_conv

ENGINES = ("auto", "tf", "xla", "blas", "jax", "torch", "stitch", "fragments")
# The arithmetic a map can run at (`Execution.precision`) and the Keras dtype policy each runs a copy of the model
# under (float32: the model itself). Variables stay float32; the maps are stored in float32 whatever the precision.
PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# The engines each Keras backend can run itself, its own execution first ("blas" runs on any of them).
_BACKEND_ENGINES = {"tensorflow": ("tf", "xla"), "jax": ("jax",), "torch": ("torch",)}
# Multiply-accumulates per forward call below which "auto" runs the native engine ("tf", "jax") without measuring.
MEASURE_MACS = 4_000_000_000
# Multiply-accumulates per call below which a plan does not time the precisions (`precision_costs`): three
# traces (two of a mixed-policy copy) cost more than such a pass. Its own knob: the engine choice's threshold
# may be lowered alone.
PRECISION_MEASURE_MACS = 4_000_000_000
# A probe call computes at most about this many multiply-accumulates: a larger input is shrunk (batch
# first, then its sides) to fit. Large enough to time VGG16 at 1024 x 1024 (about 400 GMAC) as it runs: at
# half that side the head's share of the work differs, and so did the fastest engine (issue 22).
PROBE_MACS = 500_000_000_000
# Under "auto", a stage whose tiles take more call shapes than this runs under the fastest measured execution
# other than XLA, which compiles each shape: 0.5-1.0 s a shape for a VGG16 stage on 2 cores, against 0.0-0.35 s
# for "tf" (one generalised trace) and nothing for "blas" (its head is a matrix product of any shape).
COMPILED_SHAPES = 4
# Timed rounds after the warm-up call; a candidate over `_DROP_RATIO` x the best after a round stops.
PROBE_ROUNDS = 3
_DROP_RATIO = 1.5
# The on-disk cache: this environment variable names the file ("" or "off" turns it off).
CACHE_ENV = "KFS_ENGINE_CACHE"
_CACHE_VERSION = 1
_CACHE_ENTRIES = 512

# Compiled forwards, choices, BLAS splits and policy copies are kept on each model (`graph.model_facts`);
# `clear_cache` starts a new generation of choices, so that the ones made before are measured again.
_LOCK = threading.RLock()
_generation = 0


@dataclass(frozen=True)
class EngineChoice:
    """The execution chosen for a model at one input shape, and why.

    Attributes:
        engine: ``"tf"``, ``"xla"``, ``"jax"``, ``"torch"`` or ``"blas"``.
        reason: a short sentence: asked for, below the measuring threshold,
            measured now, or measured earlier (read from the cache file).
        timings: seconds of the best probe call of each timed candidate
            (empty when nothing was timed; ``inf`` for one that failed).
    """

    engine: str
    reason: str
    timings: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.engine} ({self.reason})"


def check_engine(engine) -> str:
    """``engine`` when it names an execution, else an `InputError` listing the allowed values."""
    if engine not in ENGINES:
        raise InputError(f"Expected `engine` to be one of {', '.join(map(repr, ENGINES))}. Received: {engine!r}")
    return engine


def check_precision(precision) -> str:
    """``precision`` when it names one of `PRECISIONS`, else an `InputError` listing them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(
            f"Expected `precision` to be one of {', '.join(map(repr, PRECISIONS))}. Received: {precision!r}"
        )
    return precision


def policy_of(precision: str | None) -> str | None:
    """The Keras dtype policy a pass at ``precision`` runs under: None for float32 (the model itself), else
    ``"mixed_bfloat16"`` or ``"mixed_float16"``; a policy's name (``"mixed_float16"``) is returned as it is."""
    if precision is None or precision.startswith("mixed_"):
        return precision
    return PRECISIONS[check_precision(precision)]


def backend_name() -> str:
    """The Keras backend this process runs on (``"tensorflow"``, ``"jax"``, ...)."""
    return keras.backend.backend()


def native() -> str:
    """The backend's own execution: ``"tf"`` on TensorFlow, ``"jax"`` on JAX, ``"torch"`` on PyTorch.

    Raises:
        InputError: on a backend this library cannot run a forward pass on.
    """
    backend = backend_name()
    if backend not in _BACKEND_ENGINES:
        raise InputError(
            f"Dense maps run on Keras's TensorFlow, JAX or PyTorch backend; this process runs Keras on "
            f"{backend!r}. Set KERAS_BACKEND=tensorflow, jax or torch before Keras is imported."
        )
    return _BACKEND_ENGINES[backend][0]


def backend_refusal(engine: str) -> str | None:
    """Why ``engine`` cannot run on this process's Keras backend, or None when it can."""
    backend = backend_name()
    if engine in ("auto", "blas", "stitch", "fragments") or engine in _BACKEND_ENGINES.get(backend, ()):
        return None
    needs = next(name for name, owned in _BACKEND_ENGINES.items() if engine in owned)
    return (
        f"engine={engine!r} needs Keras on {needs} and this process runs Keras on {backend} (KERAS_BACKEND); "
        f"use 'auto' or {native()!r}"
    )


def engine_from_options(engine, jit_compile) -> str:
    """The engine asked for by ``engine=`` and the deprecated ``jit_compile=`` (True: ``"xla"``, False: ``"tf"``).

    Raises:
        InputError: for an unknown engine, or both options given.
    """
    check_engine(engine)
    if jit_compile is None:
        return engine
    import warnings

    warnings.warn(
        '`jit_compile=` is deprecated; use `engine=` ("xla" for True, "tf" for False, "auto" to measure).',
        DeprecationWarning,
        stacklevel=3,
    )
    if engine != "auto":
        raise InputError(
            f"Give `engine=` or the deprecated `jit_compile=`, not both. Received: engine={engine!r}, "
            f"jit_compile={jit_compile!r}"
        )
    if jit_compile not in (True, False):
        raise InputError(f"Expected `jit_compile` to be True, False or None. Received: {jit_compile!r}")
    return "xla" if jit_compile else "tf"


def accelerators() -> list[str]:
    """The GPUs (or other accelerators) the Keras backend computes on, by name; empty on a CPU-only host."""
    backend = backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        return sorted(d.name for d in tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return sorted(str(d) for d in jax.devices() if d.platform != "cpu")
    if backend == "torch":
        import torch

        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return []


def blas_refusal(model, precision: str | None = None) -> str | None:
    """Why the ``"blas"`` engine cannot run ``model`` here, or None when it can."""
    precision = policy_of(precision)
    if precision is not None:
        return f"the BLAS head computes in float32 only (asked: {precision})"
    if accelerators():
        return "the BLAS head runs on the CPU and a GPU is in use"
    if not _splits(model):
        return (
            "the model has no head convolution that numpy can run (one large-kernel convolution, "
            "channels-last, valid, stride 1, float32, linear or ReLU, that no branch crosses, in a model of "
            "one output)"
        )
    return None


def _splits(model) -> bool:
    """Whether `blas.split_forward` splits ``model`` at a head convolution (cached per model)."""

    facts = model_facts(model)
    with _LOCK:
        if facts.blas_split is None:
            facts.blas_split = split_forward(model, lambda part: lambda batch: batch) is not None
        return facts.blas_split


def candidates(model, precision: str | None = None) -> tuple[str, ...]:
    """The engines that can run ``model`` here, the backend's own (`native`) first (``"stitch"``: an FCN à trous
    by shift-and-stitch of its tail, `inference.stitch`; ``"fragments"``: by multi-pooling fragments,
    `inference.fragments`)."""
    native()  # a clear error on a backend without one
    found = _BACKEND_ENGINES[backend_name()]
    found = found + ("blas",) if blas_refusal(model, precision) is None else found
    found = found + ("stitch",) if stitch_refusal(model) is None else found
    return found + ("fragments",) if fragments_refusal(model, precision) is None else found


def forward(model, engine: str, precision: str | None = None):
    """``numpy batch -> numpy outputs`` for ``model`` under ``engine``, built once and cached per model.

    A model with several outputs gives a list of arrays, in the order of ``model.outputs``.

    Args:
        model: the model to run.
        engine: ``"tf"``, ``"xla"``, ``"jax"``, ``"torch"`` or ``"blas"`` (where the BLAS
            head cannot run this model, e.g. a stage without the head, it runs
            under the backend's own execution, `native`).
        precision: None or ``"float32"`` (the model itself), ``"bfloat16"`` or
            ``"float16"`` (a copy of the model under that mixed policy; its
            outputs are cast to float32), or a Keras dtype policy's name
            (``"mixed_float16"``); ``"blas"`` then runs natively.

    Raises:
        InputError: for an unknown engine, or one the Keras backend cannot run.
    """

    if engine not in ENGINES[1:]:
        raise InputError(f"Expected an engine among {', '.join(map(repr, ENGINES[1:]))}. Received: {engine!r}")
    refusal = backend_refusal(engine)
    if refusal is not None:
        raise InputError(f"Cannot run model '{model.name}': {refusal}.")
    precision = policy_of(precision)
    with _LOCK:
        per_model = model_facts(model).forwards
        key = (engine, precision)
        if key not in per_model:
            split = None
            own = native()
            if engine == "blas" and precision is None and not accelerators():
                split = split_forward(model, lambda part: forward(part, own))
            if engine == "stitch" and stitch_refusal(model) is None:
                split = stitched_forward(model, lambda part: forward(part, own, precision))
            elif engine == "fragments" and fragments_refusal(model, precision) is None:
                # Its models (one per input size: static lengths) run compiled where the backend compiles: on
                # TensorFlow under XLA, which fuses the rearrangements (VGG16 256^2 at stride 8 on 2 CPU cores:
                # 1.64 s under XLA, 3.28 s traced, à trous 1.56 s under XLA).
                inner = "xla" if own == "tf" else own
                split = fragments_forward(model, lambda part: forward(part, inner, precision))
            elif engine in ("stitch", "fragments"):
                engine = own  # a stage of a staged pass, or no FCN à trous: its own execution, as "blas" does
            if split is not None:
                per_model[key] = split
            elif (own if engine == "blas" else engine) == "jax":
                per_model[key] = _jitted(model, precision)
            elif (own if engine == "blas" else engine) == "torch":
                per_model[key] = _torch_eager(model, precision)
            else:
                per_model[key] = _traced(model, engine == "xla", precision)
            if precision is not None:
                per_model[key] = _as_float32(per_model[key])
        return per_model[key]


def _as_float32(function):
    """``function`` with its outputs cast to float32: a reduced-precision pass's map is stored in float32 (and a
    staged pass's next stage reads float32, as at full precision)."""

    def run(batch):
        outputs = function(batch)
        if isinstance(outputs, list):
            return [np.asarray(y, dtype=np.float32) for y in outputs]
        return np.asarray(outputs, dtype=np.float32)

    return run


def _traced(model, jit_compile: bool, precision: str | None):
    import tensorflow as tf

    reference = weakref.ref(model)  # the cache must not keep the model alive
    copy = policy_copy(model, precision) if precision else None

    def call(x):
        live = copy if copy is not None else reference()
        assert live is not None, "the model is alive while its cached function runs"
        # A valid root scope: TensorFlow refuses one named after the model where that name starts with "_".
        with tf.name_scope(runtime_name(live.name)):
            return live(x, training=False)

    # A second input shape (a masked plan's cropped tiles) generalises the trace instead of retracing per shape;
    # XLA still compiles per shape. A pass with one tile shape keeps its first, exact-shape trace. TensorFlow
    # counts traces per Python code object, which every model's `call` shares: a pass of many stages, each traced
    # once, read as one function retraced (and warned so). A partial has no code object: it is counted alone.
    compiled = tf.function(functools.partial(call), jit_compile=jit_compile, reduce_retracing=True)
    single = len(model.outputs) == 1
    return lambda batch: _arrays(compiled(tf.constant(batch)), single)


def _arrays(outputs, single: bool):
    """A forward call's outputs as numpy: one array, or with several outputs one each, in the order of
    `model.outputs` (a dict of outputs flattens to it)."""
    if single:
        return np.asarray(outputs)
    return [np.asarray(y) for y in keras.tree.flatten(outputs)]


def _jitted(model, precision: str | None):
    """``numpy batch -> numpy outputs``: the model's stateless call under `jax.jit`, its weights as arguments."""
    import jax

    reference = weakref.ref(model)  # the cache must not keep the model alive
    copy = policy_copy(model, precision) if precision else None

    def live():
        found = copy if copy is not None else reference()
        assert found is not None, "the model is alive while its cached function runs"
        return found

    def call(trainable, non_trainable, x):
        outputs, _ = live().stateless_call(trainable, non_trainable, x, training=False)
        return outputs

    # The weights go in as arguments: baked in as constants they would be compiled into the program (slow for
    # VGG16's 500 MB) and stale after a `set_weights`. jit compiles once per input shape, as XLA does.
    compiled = jax.jit(call)
    single = len(model.outputs) == 1

    def run(batch):
        model = live()
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return _arrays(compiled(trainable, non_trainable, batch), single)

    return run


def _torch_eager(model, precision: str | None):
    """``numpy batch -> numpy outputs``: the model called by PyTorch under `torch.inference_mode`."""
    import torch

    reference = weakref.ref(model)  # the cache must not keep the model alive
    copy = policy_copy(model, precision) if precision else None
    single = len(model.outputs) == 1

    def run(batch):
        live = copy if copy is not None else reference()
        assert live is not None, "the model is alive while its cached function runs"
        with torch.inference_mode():
            outputs = live(keras.ops.convert_to_tensor(batch), training=False)
            if single:
                return keras.ops.convert_to_numpy(outputs)
            return [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(outputs)]

    return run


def policy_copy(model, policy: str):
    """`policy_clone` of ``model``, made once per policy (kept on the model, `graph.model_facts`)."""
    per_model = model_facts(model).policy_copies
    if policy not in per_model:
        per_model[policy] = policy_clone(model, policy)
    return per_model[policy]


def policy_clone(model, policy: str, *, float32_layers=frozenset()):
    """A new copy of ``model`` whose layers compute under the dtype policy ``policy``, same function.

    The layers named in ``float32_layers`` compute at float32 (an export's
    output layers, so that its maps come out in float32). At bfloat16 (or
    float32) the copy also folds each BatchNormalization into the convolution
    before it (`graph.batch_norm_folds`): Keras computes a BatchNormalization
    at float32 whatever the policy, so unfolded each one casts its input up and
    its output down (ResNet50 at 1024x1024 on 2 cores: 0.69 s unfolded, 0.46 s
    folded). The folded weights are rounded to bfloat16 as the unfolded ones
    are; float16's narrower range could overflow a folded weight, so float16
    copies keep their BatchNormalizations. A float32 pass runs the model
    itself, not a copy (folded, ResNet50 took 0.84 s against 0.98 s): a copy
    holds the weights it was made with, the model those of its latest `fit`.
    """
    # where the compute dtype has float32's range (a folded weight is a product of two)
    foldable = keras.DTypePolicy(policy).compute_dtype in ("bfloat16", "float32")
    folds = batch_norm_folds(model) if foldable else {}
    convolutions = {conv.name: norm for conv, norm in folds.values()}
    at_float32 = set(float32_layers) | {conv.name for conv, norm in folds.values() if norm.name in float32_layers}

    def clone(layer):
        if not is_layer(layer):
            return layer  # a `keras.ops` operation (``x + y``) holds no weights and computes in its inputs' type
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name in at_float32 else policy
        if layer.name in convolutions:
            config["use_bias"] = True  # the folded shift
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        # a folded BatchNormalization is its convolution's output
        return args[0] if layer.name in folds else layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call if folds else None)
    if not folds:
        copy.set_weights(model.get_weights())
        return copy
    for layer in model.layers:
        if layer.name in folds or not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if layer.name not in convolutions:
            target.set_weights(layer.get_weights())
            continue
        norm = convolutions[layer.name]
        gamma, beta = norm.gamma if norm.scale else None, norm.beta if norm.center else None
        affine = batch_norm_affine(gamma, beta, norm.moving_mean, norm.moving_variance, norm.epsilon)
        bias = layer.bias if layer.use_bias else None
        folded = fold_affine_after_conv(layer.kernel, bias, *affine, depthwise=taxonomy.is_depthwise(layer))
        target.set_weights(list(folded))
    return copy


def choose_engine(model, batch_shape, engine: str = "auto", precision: str | None = None) -> EngineChoice:
    """The engine that runs ``model`` on batches of ``batch_shape``, measured on first use under ``"auto"``.

    Args:
        model: the model (a whole FCN; its stages run under the same engine).
        batch_shape: the shape of one forward call's input, batch included.
        engine: ``"auto"`` to measure, or an engine to use as asked.
        precision: None, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a
            dtype policy's name): what the pass runs at. ``"auto"`` chooses
            among the executions at that precision; it never lowers it.

    Returns:
        An `EngineChoice`. Under ``"auto"``: `native` untimed below
        `MEASURE_MACS` per call; else the fastest candidate, from the process's
        cache, the cache file, or a probe timed now (a warm-up call each, so
        tracing and compiling are not counted, then `PROBE_ROUNDS` rounds in
        turn, best of each, on ``batch_shape`` or a smaller one of about
        `PROBE_MACS`).

    Raises:
        InputError: for an unknown engine, or ``"blas"`` where it cannot run.
    """
    check_engine(engine)
    precision = policy_of(precision)
    shape = tuple(int(d) for d in batch_shape)
    if engine != "auto":
        refusal = backend_refusal(engine)
        if refusal is not None:
            raise InputError(f"Cannot run model '{model.name}': {refusal}.")
        if engine == "blas":
            refusal = blas_refusal(model, precision)
            if refusal is not None:
                raise InputError(
                    f"engine='blas' cannot run model '{model.name}': {refusal}. Use 'auto' or {native()!r}."
                )
        if engine in ("stitch", "fragments"):
            refusal = stitch_refusal(model) if engine == "stitch" else fragments_refusal(model, precision)
            if refusal is not None:
                raise InputError(
                    f"engine={engine!r} cannot run model '{model.name}': {refusal}. Use 'auto' or {native()!r}."
                )
        return EngineChoice(engine, "asked for")
    with _LOCK:
        per_model = model_facts(model).choices
        key = (shape, precision)
        generation, choice = per_model.get(key, (None, None))
        if generation != _generation:
            choice = _auto_choice(model, shape, precision)
            per_model[key] = (_generation, choice)
        return choice


def with_engine(plan, fcn, engine: str, precision: str | None = None, *, calls):
    """``plan`` (a `PredictionPlan`) with the engine each stage runs under and why (`choose_engine`).

    Each stage is chosen for on its own model at its own call shape (its
    largest tile times its batch; ``calls``: ``(model, call shape)`` per
    stage, `staged.stage_calls`, so the plan's private fields stay its
    planner's; a third item, where given, counts the stage's call shapes:
    past `COMPILED_SHAPES` of them, ``"auto"`` does not pick ``"xla"``,
    which compiles each, but the fastest other execution measured, `without_compiling`): a converted
    classifier's convolutions and its head may run
    fastest under different executions on one machine. ``plan.engine`` names
    the stages' engines in order, each once.
    """
    import dataclasses

    check_engine(engine)
    precision = policy_of(precision)
    refusal = backend_refusal(engine)
    if refusal is not None:
        raise InputError(f"Cannot run model '{fcn.name}': {refusal}.")
    if engine == "blas":  # the whole network must hold the head; its other stages then run natively
        refusal = blas_refusal(fcn, precision)
        if refusal is not None:
            raise InputError(f"engine='blas' cannot run model '{fcn.name}': {refusal}. Use 'auto' or {native()!r}.")
    if engine == "stitch" and stitch_refusal(fcn) is not None:
        raise InputError(f"engine='stitch' cannot run model '{fcn.name}': {stitch_refusal(fcn)}. Use 'auto'.")
    if engine == "fragments" and fragments_refusal(fcn, precision) is not None:
        refusal = fragments_refusal(fcn, precision)
        raise InputError(f"engine='fragments' cannot run model '{fcn.name}': {refusal}. Use 'auto'.")
    stages, reasons = [], []
    for index, (stage, (model, call_shape, *shapes)) in enumerate(zip(plan.stages, calls)):
        if engine == "blas" and blas_refusal(model, precision) is not None:
            choice = EngineChoice(native(), "blas asked for; this stage holds no head convolution")
        elif engine == "stitch" and stitch_refusal(model) is not None:
            choice = EngineChoice(native(), "stitch asked for; this stage is part of the FCN à trous")
        elif engine == "fragments" and fragments_refusal(model, precision) is not None:
            choice = EngineChoice(native(), "fragments asked for; this stage is part of the FCN à trous")
        else:
            choice = choose_engine(model, call_shape, engine, precision)
            if engine == "auto" and choice.engine == "xla" and shapes and shapes[0] > COMPILED_SHAPES:
                choice = without_compiling(choice, shapes[0])
        stages.append(dataclasses.replace(stage, engine=choice.engine))
        reasons.append(choice.reason if len(plan.stages) == 1 else f"stage {index + 1}: {choice}")
    names = list(dict.fromkeys(stage.engine for stage in stages))
    return dataclasses.replace(plan, stages=tuple(stages), engine="+".join(names), engine_reason="; ".join(reasons))


def without_compiling(choice: EngineChoice, shapes: int) -> EngineChoice:
    """``choice`` (XLA, measured fastest) for a stage whose calls take ``shapes`` shapes: the fastest other
    execution its probe timed (a masked VGG16 head: "blas" 1.13x XLA's time, the traced "tf" 1.7x), or the
    backend's own where none other was timed."""
    others = {name: seconds for name, seconds in choice.timings.items() if name != "xla" and math.isfinite(seconds)}
    best = min(others, key=others.__getitem__) if others else native()
    return EngineChoice(
        best,
        f"{shapes} call shapes (a masked plan's tiles), each an XLA compilation: the fastest other",
        choice.timings,
    )


def precision_costs(model, batch_shape, engine: str) -> str:
    """What one call of ``model`` on ``batch_shape`` costs at each precision on this machine, in a line.

    Each of float32, bfloat16 and float16 is timed under ``engine`` (``"blas"``
    runs natively at a reduced precision) by `time_engines`, on a probe of
    about `PROBE_MACS` (`probe_shape`), once per model architecture, shape,
    engine, backend and host: the figures go into the cache file beside the
    engine choices (`cache_path`), and later plans read them. Below
    `PRECISION_MEASURE_MACS` a call nothing is timed. ``"auto"`` never lowers the
    precision: the line says what asking for one would gain.
    """
    shape = tuple(int(d) for d in batch_shape)
    try:
        macs = call_macs(model, shape)
    except Exception as error:  # a shape the model cannot take whole: nothing to time
        return f"precisions: not measured ({type(error).__name__} at {'x'.join(map(str, shape))})"
    if macs < PRECISION_MEASURE_MACS:
        return (
            f"precisions: not measured ({macs / 1e9:.2g} GMAC a call, below the {PRECISION_MEASURE_MACS / 1e9:.0f} "
            "GMAC worth measuring)"
        )
    path = cache_path()
    key = _cache_key(model, shape, f"precisions:{engine}") if path else None
    entry = _read_cache(path).get(key) if path and key else None
    if entry is not None and set(entry.get("timings", {})) == set(PRECISIONS):
        timings = {k: math.inf if v is None else float(v) for k, v in entry["timings"].items()}
        where, probe = f"measured earlier on this host ({path})", tuple(entry.get("probe", shape))
    else:
        probe = probe_shape(model, shape, macs)
        timings = {p: time_engines(model, [engine], probe, p)[engine] for p in PRECISIONS}
        where = "measured now"
        if path and key:
            _write_cache(path, key, {"engine": engine, "timings": timings, "probe": list(probe), "time": time.time()})
    base = timings["float32"]
    parts = []
    for name, seconds in timings.items():
        if not math.isfinite(seconds):
            parts.append(f"{name} failed")
            continue
        speed = "" if name == "float32" or not math.isfinite(base) else f" ({base / seconds:.2f}x float32's speed)"
        parts.append(f"{name} {seconds * 1e3:.3g} ms{speed}")
    return (
        f"precisions, one call of {'x'.join(map(str, probe))} under {engine} ({where}): {', '.join(parts)}; "
        "the map runs at the precision asked for (float32 unless `precision=` says otherwise: `auto` never "
        "lowers it)"
    )


def _auto_choice(model, shape, precision) -> EngineChoice:
    try:
        macs = call_macs(model, shape)
    except Exception as error:  # a shape the model cannot take whole: nothing to measure on
        return EngineChoice(native(), f"no measurable pass at {'x'.join(map(str, shape))} ({type(error).__name__})")
    if macs < MEASURE_MACS:
        return EngineChoice(
            native(), f"{macs / 1e9:.2g} GMAC a call, below the {MEASURE_MACS / 1e9:.0f} GMAC worth measuring"
        )
    names = candidates(model, precision)
    path = cache_path()
    key = _cache_key(model, shape, precision) if path else None
    if path and key:
        entry = _read_cache(path).get(key)
        if entry is not None and entry.get("engine") in names:
            timings = {k: math.inf if v is None else float(v) for k, v in entry.get("timings", {}).items()}
            return EngineChoice(entry["engine"], f"measured earlier on this host ({path})", timings)
    probe = probe_shape(model, shape, macs)
    timings = time_engines(model, names, probe, precision)
    best = min(timings, key=lambda name: timings[name])
    if not math.isfinite(timings[best]):
        return EngineChoice(native(), "every candidate failed its probe", timings)
    ranked = ", ".join(f"{name} {seconds * 1e3:.3g} ms" for name, seconds in sorted(timings.items(), key=_by_time))
    where = "x".join(map(str, probe))
    choice = EngineChoice(best, f"fastest measured at {where}: {ranked}", timings)
    if path and key:
        _write_cache(path, key, {"engine": best, "timings": timings, "probe": list(probe), "time": time.time()})
    return choice


def _by_time(item) -> float:
    return item[1]


def call_macs(model, shape) -> int:
    """Multiply-accumulates of one forward call on ``shape``, every image of the batch counted."""

    return pass_cost(model, shape).macs * int(shape[0])


def probe_shape(model, shape, macs: int | None = None) -> tuple[int, ...]:
    """``shape``, or a smaller input of about `PROBE_MACS` a call: fewer images first, then shorter sides."""

    if macs is None:
        macs = call_macs(model, shape)
    if macs <= PROBE_MACS:
        return tuple(shape)
    layout = model_layout(model)
    height, width = (int(d) for d in layout.spatial_shape(shape))
    channels = int(layout.channels(shape))
    one = macs / int(shape[0])
    if one <= PROBE_MACS:
        return tuple(layout.batch_shape(max(1, int(PROBE_MACS // one)), height, width, channels))
    scale = math.sqrt(PROBE_MACS / one)
    try:
        low = geometry(model).min_input_size
    except Exception:  # a model geometry cannot follow: keep a side of at least 32
        low = (32, 32)
    sides = [max(int(low_side), min(side, round(side * scale))) for side, low_side in zip((height, width), low)]
    return tuple(layout.batch_shape(1, sides[0], sides[1], channels))


def time_engines(model, names, shape, precision: str | None = None, rounds: int = PROBE_ROUNDS) -> dict:
    """Seconds of the best call of each engine in ``names`` on a random input of ``shape``.

    Each engine is called once untimed (tracing, compiling); then every round
    calls each in turn, in a new random order, so that a slow spell of the
    machine, or the one engine's threads still spinning, falls on all of them. A candidate over 1.5x the best after a
    round is not called again; one that fails gets ``inf``.
    """

    pixels = np.random.default_rng(0).uniform(0, 1, shape).astype(input_dtype(model))
    functions, timings = {}, {}
    for name in names:
        try:
            function = forward(model, name, precision)
            function(pixels)
        except Exception:  # an execution that cannot run this model (an XLA compile error): not a candidate
            timings[name] = math.inf
            continue
        functions[name], timings[name] = function, math.inf
    live = list(functions)
    shuffle = np.random.default_rng(0)
    for _ in range(rounds):
        # A new order each round: an engine timed right after another can pay for it (numpy's BLAS threads
        # spin a while after a call), and a fixed rotation would always put the same one after it.
        for name in shuffle.permutation(live):
            start = time.perf_counter()
            functions[name](pixels)
            timings[name] = min(timings[name], time.perf_counter() - start)
        best = min((timings[name] for name in live), default=math.inf)
        live = [name for name in live if timings[name] <= _DROP_RATIO * best]
    return timings


def clear_cache() -> None:
    """Forget the choices made in this process (the cache file stays): each is made again when next asked."""
    global _generation
    with _LOCK:
        _generation += 1


def cache_path() -> str | None:
    """The cache file: ``$KFS_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/keras_fcn_surgery/engines.json``
    (``~/.cache/...`` without it); None when the variable is ``""`` or ``"off"``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "none", "0") else os.path.abspath(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "keras_fcn_surgery", "engines.json")


def model_fingerprint(model) -> str:
    """A hash of the model's layers in order: their classes, configurations (names left out) and weight shapes."""

    parts = []
    for layer in iter_layers(model):
        try:
            config = {k: v for k, v in layer.get_config().items() if k != "name"}
        except Exception:  # a layer without a serialisable configuration: its class and weights only
            config = {}
        shapes = [tuple(int(d) for d in w.shape) for w in layer.weights]
        parts.append([type(layer).__name__, config, shapes])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def host_fingerprint() -> str:
    """The processor model, core counts, machine type and visible GPUs, as one string."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = ",".join(accelerators())
    return f"{platform.machine()}|{cpu}|{os.cpu_count()} cores|{usable} usable|gpus:{gpus}"


def backend_version() -> str:
    """The version of the framework under Keras: TensorFlow's as it is, else the backend's name and version."""
    backend = backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.__version__
    try:
        import importlib.metadata

        return f"{backend} {importlib.metadata.version(backend)}"
    except Exception:  # pragma: no cover - a backend without distribution metadata
        return backend


def _cache_key(model, shape, precision) -> str | None:
    try:
        model_part = model_fingerprint(model)
    except Exception:  # pragma: no cover - an exotic model: measure every time rather than fail
        return None
    text = json.dumps([model_part, list(shape), precision, backend_version(), keras.__version__, host_fingerprint()])
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Add ``entry`` to the cache file, written atomically; a cache that cannot be written is skipped."""

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = _read_cache(path)
        entries.pop(key, None)
        entries[key] = {**entry, "timings": {k: (v if math.isfinite(v) else None) for k, v in entry["timings"].items()}}
        while len(entries) > _CACHE_ENTRIES:
            entries.pop(next(iter(entries)))
        suffix = os.path.splitext(path)[1] or os.path.basename(path)
        with atomic_output(path, suffix=suffix, overwrite=True) as temporary, open(temporary, "w") as handle:
            json.dump({"version": _CACHE_VERSION, "entries": entries}, handle, indent=1)
    except (OSError, ModelFileError):
        pass
