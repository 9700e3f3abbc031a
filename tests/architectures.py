"""Random small Keras CNN classifiers for property-based tests, printable as Python code.

An `Architecture` is a plain description (frozen dataclasses). `to_code()` turns
it into a self-contained Python module defining ``build_model()``, and `build()`
executes exactly that code, so a failing example printed by a test rebuilds the
same model outside the test suite. `architectures()` is the hypothesis strategy.

The generator tracks the map size through every layer and only proposes layers
Keras can build: a ``valid`` window larger than the map becomes ``same``, and a
stride above 1 never comes with a dilation above 1. It also steers clear of
what TensorFlow's CPU kernels cannot run or get wrong (not the converter's
business): float16 channels-first Conv2D, float16 and bfloat16 depthwise convolutions
with unequal strides, and one-channel convolutions strided along the width only
(see ``tests/test_upstream_bugs.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from hypothesis import strategies as st

# Body ------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """Conv2D, SeparableConv2D or DepthwiseConv2D (``filters`` is the depth multiplier for the last)."""

    kind: str
    filters: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str = "valid"
    activation: str | None = None
    use_bias: bool = True

    def out_channels(self, channels: int) -> int:
        return channels * self.filters if self.kind == "DepthwiseConv2D" else self.filters

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            window_output(n, k, s, d, self.padding)
            for n, k, s, d in zip(size, self.kernel, self.strides, self.dilation)
        )

    def code(self, name: str, data_format: str) -> str:
        if self.kind == "DepthwiseConv2D":
            first = f"{self.kernel}, depth_multiplier={self.filters}"
        else:
            first = f"{self.filters}, {self.kernel}"
        return (
            f"layers.{self.kind}({first}, strides={self.strides}, dilation_rate={self.dilation}, "
            f'padding="{self.padding}", activation={self.activation!r}, use_bias={self.use_bias}, '
            f'data_format="{data_format}", name="{name}")'
        )


@dataclass(frozen=True)
class Pool:
    """MaxPooling2D or AveragePooling2D."""

    kind: str
    pool: tuple[int, int]
    strides: tuple[int, int]
    padding: str = "valid"

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            window_output(n, k, s, 1, self.padding) for n, k, s in zip(size, self.pool, self.strides)
        )

    def code(self, name: str, data_format: str) -> str:
        return (
            f'layers.{self.kind}({self.pool}, strides={self.strides}, padding="{self.padding}", '
            f'data_format="{data_format}", name="{name}")'
        )


@dataclass(frozen=True)
class Norm:
    """BatchNormalization on the channel axis (its statistics are randomized by `randomize_weights`)."""

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size):
        return size

    def code(self, name: str, data_format: str) -> str:
        axis = -1 if data_format == "channels_last" else 1
        return f'layers.BatchNormalization(axis={axis}, name="{name}")'


@dataclass(frozen=True)
class Act:
    """A layer acting on each value (or along channels): an activation, Rescaling, SpatialDropout2D, Softmax."""

    name: str

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size):
        return size

    def code(self, name: str, data_format: str) -> str:
        if self.name == "relu6":
            return f'layers.ReLU(max_value=6.0, name="{name}")'
        if self.name == "leaky_relu":
            return f'layers.LeakyReLU(negative_slope=0.1, name="{name}")'
        if self.name == "rescaling":
            return f'layers.Rescaling(0.5, offset=0.1, name="{name}")'
        if self.name == "spatial_dropout":
            return f'layers.SpatialDropout2D(0.2, data_format="{data_format}", name="{name}")'
        if self.name == "channel_softmax":
            axis = -1 if data_format == "channels_last" else 1
            return f'layers.Softmax(axis={axis}, name="{name}")'
        return f'layers.Activation("{self.name}", name="{name}")'


@dataclass(frozen=True)
class Pad:
    """ZeroPadding2D (``crop=False``) or Cropping2D (``crop=True``) by ``((top, bottom), (left, right))``."""

    amounts: tuple[tuple[int, int], tuple[int, int]]
    crop: bool = False

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size):
        sign = -1 if self.crop else 1
        return tuple(n + sign * (before + after) for n, (before, after) in zip(size, self.amounts))

    def code(self, name: str, data_format: str) -> str:
        kind = "Cropping2D" if self.crop else "ZeroPadding2D"
        return f'layers.{kind}({self.amounts}, data_format="{data_format}", name="{name}")'


@dataclass(frozen=True)
class SqueezeExcite:
    """A squeeze-and-excitation block (functional bodies only): the map times a gate from its global pooling.

    ``keepdims=False`` pools to a vector and reshapes it to ``1 x 1`` (as
    EfficientNet does). The pooling feeds back into the map, so it stays a
    global pooling in the FCN (global context).
    """

    channels: int
    hidden: int
    pooling: str = "avg"
    keepdims: bool = True

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size):
        return size

    def statements(self, prefix: str, data_format: str) -> list[str]:
        pooling = "GlobalAveragePooling2D" if self.pooling == "avg" else "GlobalMaxPooling2D"
        gate = f"{prefix}_gate"
        lines = [
            f'{gate} = layers.{pooling}(data_format="{data_format}", keepdims={self.keepdims}, '
            f'name="{prefix}_squeeze")(x)'
        ]
        if not self.keepdims:
            shape = (1, 1, self.channels) if data_format == "channels_last" else (self.channels, 1, 1)
            lines.append(f'{gate} = layers.Reshape({shape}, name="{prefix}_reshape")({gate})')
        lines += [
            f'{gate} = layers.Conv2D({self.hidden}, 1, activation="relu", data_format="{data_format}", '
            f'name="{prefix}_reduce")({gate})',
            f'{gate} = layers.Conv2D({self.channels}, 1, activation="sigmoid", data_format="{data_format}", '
            f'name="{prefix}_expand")({gate})',
            f'x = layers.Multiply(name="{prefix}_excite")([x, {gate}])',
        ]
        return lines


@dataclass(frozen=True)
class OpNode:
    """`keras.ops` calls on the map (functional bodies only): Keras records them as operations, not layers.

    ``kind``: "affine" (``x * a + b``), "relu6"/"sigmoid"/"tanh"/"silu" (``ops.<kind>(x)``),
    "hard_sigmoid" (``ops.relu6(x + 3.0) / 6.0``, as MobileNetV3), "pad" (``ops.pad``
    by ``amounts``), "split" (``ops.split`` along the channels, halves swapped and
    re-joined with ``ops.concatenate``) or "slice" (``x[:, a::s, b::t]``, ``amounts`` =
    ``((a, s), (b, t))``).
    """

    kind: str
    amounts: tuple[tuple[int, int], tuple[int, int]] = ((0, 1), (0, 1))
    scale: float = 0.5
    shift: float = 0.25

    def out_channels(self, channels: int) -> int:
        return channels

    def out_size(self, size):
        if self.kind == "pad":
            return tuple(n + before + after for n, (before, after) in zip(size, self.amounts))
        if self.kind == "slice":
            return tuple(len(range(start, n, step)) for n, (start, step) in zip(size, self.amounts))
        return size

    def statements(self, prefix: str, data_format: str) -> list[str]:
        channel_axis = -1 if data_format == "channels_last" else 1
        if self.kind == "affine":
            return [f"x = x * {self.scale} + {self.shift}"]
        if self.kind == "hard_sigmoid":
            return ["x = x * (ops.relu6(x + 3.0) / 6.0)"]
        if self.kind == "pad":
            spatial = [list(a) for a in self.amounts]
            pads = [[0, 0], *spatial, [0, 0]] if data_format == "channels_last" else [[0, 0], [0, 0], *spatial]
            return [f"x = ops.pad(x, {pads})"]
        if self.kind == "split":
            return [
                f"{prefix}_a, {prefix}_b = ops.split(x, [1], axis={channel_axis})",
                f"x = ops.concatenate([{prefix}_b, {prefix}_a * {self.scale}], axis={channel_axis})",
            ]
        if self.kind == "slice":
            (a, s), (b, t) = self.amounts
            key = f"[:, {a}::{s}, {b}::{t}, :]" if data_format == "channels_last" else f"[:, :, {a}::{s}, {b}::{t}]"
            return [f"x = x{key}"]
        return [f"x = ops.{self.kind}(x)"]


OP_KINDS = ("affine", "relu6", "sigmoid", "tanh", "silu", "hard_sigmoid", "pad", "split", "slice")
# `keras.ops` calls after the head's last layer (functional heads only).
HEAD_OPS = ("scale", "per_feature", "softmax", "sigmoid", "centre", "relu")


@dataclass(frozen=True)
class Residual:
    """Branches merged by ``Add`` or ``Concatenate`` (functional bodies only).

    ``branches`` are chains of layers; an empty chain is the identity shortcut.
    Every branch ends at the same map size (the generator makes sure).
    """

    branches: tuple[tuple, ...]
    merge: str  # "Add" or "Concatenate"

    def out_channels(self, channels: int) -> int:
        outs = [_chain_channels(branch, channels) for branch in self.branches]
        return outs[0] if self.merge == "Add" else sum(outs)

    def out_size(self, size):
        return _chain_size(self.branches[0], size)


def _chain_channels(chain, channels: int) -> int:
    for layer in chain:
        channels = layer.out_channels(channels)
    return channels


def _chain_size(chain, size):
    for layer in chain:
        size = layer.out_size(size)
    return size


def window_output(n: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    """Output length of a window along one axis (written here independently of the package)."""
    if padding == "same":
        return math.ceil(n / stride)
    effective = dilation * (kernel - 1) + 1
    return (n - effective) // stride + 1 if n >= effective else 0


# Head ------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseSpec:
    units: int
    activation: str | None = None
    dropout: float | None = None  # a Dropout before this Dense
    norm: str | None = None  # "batch" or "layer": a normalization before this Dense (after the Dropout)
    use_bias: bool = True
    prelu: bool = False  # a per-feature PReLU after this Dense (as mtcnn's heads)


@dataclass(frozen=True)
class Head:
    """``kind``: "flatten", "avg" or "max" (global pooling).

    For global pooling with ``keepdims``, ``after_keepdims`` says what follows
    the ``1 x 1`` map: "flatten", "reshape" (to ``(C,)``), "conv1x1" (a
    pointwise Conv2D, then Flatten, as in MobileNet) or "none" (Dense on the
    rank-4 map). ``flatten_format`` is the Flatten's own ``data_format``.
    ``final`` is a last layer: None, "softmax" (``Softmax()``) or
    "activation_softmax" (``Activation("softmax")``).
    """

    kind: str
    dense: tuple[DenseSpec, ...]
    keepdims: bool = False
    after_keepdims: str = "flatten"
    flatten_format: str | None = None
    final: str | None = None
    ops: tuple[str, ...] = ()  # `HEAD_OPS` applied after the last layer (functional heads only)
    permute: tuple[int, int, int] | None = None  # a Permute before the Flatten (kind "flatten"; as mtcnn's nets)


# The architecture ----------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """A whole classifier.

    ``outer``: "sequential" or "functional" container; ``nest_body`` wraps the
    body into a functional sub-model named "body"; ``nest_head`` wraps the head
    into a Sequential sub-model named "head"; ``wrap`` puts the whole classifier
    into an outer Sequential named "wrapper". ``policy`` is a global dtype
    policy set while building ("mixed_float16", "mixed_bfloat16").
    ``subclass`` turns the classifier into a subclassed `keras.Model` (before
    ``wrap``): "wrapper" calls the built model from its ``call``; "steps"
    (Sequential containers) holds its layers and calls them one by one.
    ``second_output`` adds a second output (functional heads only): a linear
    Dense of that many units on the head's features, beside the first.
    ``augment`` puts random augmentation layers first, in a nested Sequential
    named "data_augmentation" (as the tutorials do); ``normalization`` an
    adapted `Normalization` after them; ``underscore`` names the model (and
    the augmentation block) with a leading underscore.
    """

    data_format: str
    input_size: tuple[int, int]
    channels: int
    body: tuple
    head: Head
    outer: str = "functional"
    nest_body: bool = False
    nest_head: bool = False
    seed: int = 0
    policy: str | None = None
    wrap: bool = False
    feature_shape: tuple[int, int, int] = field(default=(1, 1, 1))  # (H, W, C) at the head, from the generator
    subclass: str | None = None
    second_output: int = 0
    augment: tuple[str, ...] = ()  # random augmentations first, in a nested Sequential (the identity at inference)
    normalization: bool = False  # an adapted Normalization first (after the augmentations)
    underscore: bool = False  # the model named as Keras names a class `_FuzzModel`: "__fuzz_model"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return _layout((*self.input_size, self.channels), self.data_format)

    def to_code(self) -> str:
        """A self-contained Python module whose ``build_model()`` builds this architecture."""
        return _Writer(self).module()

    def build(self):
        """Execute `to_code()` and return its model."""
        namespace: dict = {}
        exec(compile(self.to_code(), "<architecture>", "exec"), namespace)
        return namespace["build_model"]()


def _layout(hwc, data_format: str) -> tuple[int, int, int]:
    height, width, channels = hwc
    return (height, width, channels) if data_format == "channels_last" else (channels, height, width)


_PRELUDE = '''import keras
import numpy as np
from keras import layers, ops


def randomize_weights(model, seed):
    """Non-trivial biases and BatchNormalization statistics (kernels keep their seeded initializers)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif variable.name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif variable.name in ("beta", "moving_mean", "bias"):
            value = rng.normal(0.0, 0.3, shape)
        elif variable.name == "alpha":
            value = rng.uniform(-0.5, 0.5, shape)
        else:
            continue
        variable.assign(value.astype(variable.dtype))


class Wrapper(keras.Model):
    """A subclassed classifier whose `call` calls a built model."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)


class Steps(keras.Model):
    """A subclassed classifier holding the layers of a Sequential and calling them one by one."""

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = list(steps)

    def call(self, x):
        for step in self.steps:
            x = step(x)
        return x


'''


class _Writer:
    """Writes the code of one `Architecture`."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.lines: list[str] = []

    def module(self) -> str:
        arch = self.arch
        self.emit(0, "def build_model():")
        self.emit(1, f"keras.utils.set_random_seed({arch.seed})")
        if arch.policy is not None:
            self.emit(1, f'keras.config.set_dtype_policy("{arch.policy}")')
        self.preprocessing_blocks()
        if arch.nest_body:
            self.functional_body("body_input", "body")
        if arch.nest_head:
            self.emit(1, "head = keras.Sequential(")
            self.emit(2, "[")
            self.emit(3, f"keras.Input({_layout(arch.feature_shape, arch.data_format)}),")
            for expression in self.head_layers():
                self.emit(3, f"{expression},")
            self.emit(2, "],")
            self.emit(2, 'name="head",')
            self.emit(1, ")")
        if arch.outer == "sequential":
            self.sequential_model()
        else:
            self.functional_model()
        if arch.subclass is not None:
            kind = "Wrapper(model" if arch.subclass == "wrapper" else "Steps(model.layers"
            self.emit(1, f'model = {kind}, name="{"_subclassed" if arch.underscore else "subclassed"}")')
            self.emit(1, f'model(np.zeros((1, *{arch.input_shape}), "float32"))')
        if arch.wrap:
            self.emit(1, f'model = keras.Sequential([keras.Input({arch.input_shape}), model], name="wrapper")')
        if arch.policy is not None:
            self.emit(1, 'keras.config.set_dtype_policy("float32")')
        self.emit(1, f"randomize_weights(model, {arch.seed})")
        self.emit(1, "return model")
        return _PRELUDE + "\n".join(self.lines) + "\n"

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    @property
    def model_name(self) -> str:
        return "__fuzz_model" if self.arch.underscore else "fuzz_model"

    def preprocessing_blocks(self) -> None:
        """``augment`` (a nested Sequential) and ``norm`` (adapted), as the tutorials put them first."""
        arch = self.arch
        data_format = arch.data_format
        if arch.augment:
            name = "_data_augmentation" if arch.underscore else "data_augmentation"
            self.emit(1, "augment = keras.Sequential(")
            self.emit(2, "[")
            for kind in arch.augment:
                self.emit(3, f'layers.{kind}({_AUGMENTATION_ARGUMENTS[kind]}data_format="{data_format}"),')
            self.emit(2, "],")
            self.emit(2, f'name="{name}",')
            self.emit(1, ")")
        if arch.normalization:
            axis = -1 if data_format == "channels_last" else 1
            self.emit(1, f'norm = layers.Normalization(axis={axis}, name="norm")')
            shape = (4, *arch.input_shape)
            self.emit(1, f'norm.adapt(np.random.default_rng({arch.seed}).normal(0.5, 2.0, {shape}).astype("float32"))')

    def preprocessing_items(self) -> list[str]:
        return (["augment"] if self.arch.augment else []) + (["norm"] if self.arch.normalization else [])

    def sequential_model(self) -> None:
        arch = self.arch
        items = [f'keras.Input({arch.input_shape}, name="image")', *self.preprocessing_items()]
        if arch.nest_body:
            items.append("body")
        else:
            items.extend(self.body_expressions())
        items.extend(["head"] if arch.nest_head else self.head_layers())
        self.emit(1, "model = keras.Sequential(")
        self.emit(2, "[")
        for item in items:
            self.emit(3, f"{item},")
        self.emit(2, "],")
        self.emit(2, f'name="{self.model_name}",')
        self.emit(1, ")")

    def functional_model(self) -> None:
        arch = self.arch
        self.emit(1, f'inputs = keras.Input({arch.input_shape}, name="image")')
        self.emit(1, "x = inputs")
        for item in self.preprocessing_items():
            self.emit(1, f"x = {item}(x)")
        if arch.nest_body:
            self.emit(1, "x = body(x)")
        else:
            self.body_statements()
        if arch.nest_head:
            self.emit(1, "x = head(x)")
        elif arch.head.kind == "avgmax":
            data_format = arch.data_format
            axis = -1 if data_format == "channels_last" else 1
            self.emit(1, f'average = layers.GlobalAveragePooling2D(data_format="{data_format}", name="avg_pool")(x)')
            self.emit(1, f'maximum = layers.GlobalMaxPooling2D(data_format="{data_format}", name="max_pool")(x)')
            self.emit(1, f'x = layers.Concatenate(axis={axis}, name="pools")([average, maximum])')
            if arch.second_output:
                self.emit(1, "features = x")
            for expression in self.dense_layers():
                self.emit(1, f"x = {expression}(x)")
        else:
            dense = self.dense_layers()
            before = self.head_layers()[: -len(dense)]
            for expression in before:
                self.emit(1, f"x = {expression}(x)")
            if arch.second_output:
                self.emit(1, "features = x")
            for expression in dense:
                self.emit(1, f"x = {expression}(x)")
        if not arch.nest_head:
            for line in self.head_operations():
                self.emit(1, line)
        if arch.second_output and not arch.nest_head:
            self.emit(1, f'second = layers.Dense({arch.second_output}, name="second_output")(features)')
            self.emit(1, f'model = keras.Model(inputs, [x, second], name="{self.model_name}")')
        else:
            self.emit(1, f'model = keras.Model(inputs, x, name="{self.model_name}")')

    def head_operations(self) -> list[str]:
        units = self.arch.head.dense[-1].units
        lines = []
        for kind in self.arch.head.ops:
            if kind == "scale":
                lines.append("x = x * 2.0 - 0.5")
            elif kind == "per_feature":
                lines.append(f'x = x * np.linspace(0.5, 1.5, {units}).astype("float32")')
            elif kind == "softmax":
                lines.append("x = ops.softmax(x, axis=-1)")
            elif kind == "centre":
                lines.append("x = x - ops.mean(x, axis=-1, keepdims=True)")
            else:
                lines.append(f"x = ops.{kind}(x)")
        return lines

    def functional_body(self, input_name: str, model_name: str) -> None:
        self.emit(1, f'body_inputs = keras.Input({self.arch.input_shape}, name="{input_name}")')
        self.emit(1, "x = body_inputs")
        self.body_statements()
        self.emit(1, f'body = keras.Model(body_inputs, x, name="{model_name}")')

    def body_expressions(self) -> list[str]:
        data_format = self.arch.data_format
        return [layer.code(f"b{i}_{_short(layer)}", data_format) for i, layer in enumerate(self.arch.body)]

    def body_statements(self) -> None:
        data_format = self.arch.data_format
        axis = -1 if data_format == "channels_last" else 1
        for i, layer in enumerate(self.arch.body):
            if isinstance(layer, (SqueezeExcite, OpNode)):
                for line in layer.statements(f"b{i}_se" if isinstance(layer, SqueezeExcite) else f"b{i}", data_format):
                    self.emit(1, line)
                continue
            if not isinstance(layer, Residual):
                self.emit(1, f"x = {layer.code(f'b{i}_{_short(layer)}', data_format)}(x)")
                continue
            names = []
            for j, branch in enumerate(layer.branches):
                name = f"b{i}_branch{j}"
                self.emit(1, f"{name} = x")
                for k, inner in enumerate(branch):
                    self.emit(1, f"{name} = {inner.code(f'b{i}_{j}{k}_{_short(inner)}', data_format)}({name})")
                names.append(name)
            if layer.merge == "Add":
                merge = f'layers.Add(name="b{i}_add")'
            else:
                merge = f'layers.Concatenate(axis={axis}, name="b{i}_concat")'
            self.emit(1, f"x = {merge}([{', '.join(names)}])")

    def head_layers(self) -> list[str]:
        arch, head = self.arch, self.arch.head
        data_format = arch.data_format
        out: list[str] = []
        if head.kind == "flatten":
            if head.permute is not None:
                out.append(f'layers.Permute({head.permute}, name="permute")')
            out.append(_flatten(head.flatten_format, "flatten"))
        else:
            pooling = "GlobalAveragePooling2D" if head.kind == "avg" else "GlobalMaxPooling2D"
            out.append(f'layers.{pooling}(data_format="{data_format}", keepdims={head.keepdims}, name="pool")')
            if head.keepdims:
                channels = arch.feature_shape[2]
                if head.after_keepdims == "flatten":
                    out.append(_flatten(head.flatten_format, "flatten"))
                elif head.after_keepdims == "reshape":
                    out.append(f'layers.Reshape(({channels},), name="to_vector")')
                elif head.after_keepdims == "conv1x1":
                    out.append(f'layers.Conv2D({channels + 1}, 1, data_format="{data_format}", name="pointwise")')
                    out.append(_flatten(head.flatten_format, "flatten"))
        return out + self.dense_layers()

    def dense_layers(self) -> list[str]:
        head = self.arch.head
        out: list[str] = []
        for i, dense in enumerate(head.dense):
            if dense.dropout is not None:
                out.append(f'layers.Dropout({dense.dropout}, name="drop{i}")')
            if dense.norm == "batch":
                out.append(f'layers.BatchNormalization(name="bn{i}")')
            elif dense.norm == "layer":
                out.append(f'layers.LayerNormalization(name="ln{i}")')
            out.append(
                f'layers.Dense({dense.units}, activation={dense.activation!r}, use_bias={dense.use_bias}, name="fc{i}")'
            )
            if dense.prelu:
                out.append(f'layers.PReLU(name="prelu{i}")')
        if head.final == "softmax":
            out.append('layers.Softmax(name="probabilities")')
        elif head.final == "activation_softmax":
            out.append('layers.Activation("softmax", name="probabilities")')
        return out


def _flatten(data_format: str | None, name: str) -> str:
    if data_format is None:
        return f'layers.Flatten(name="{name}")'
    return f'layers.Flatten(data_format="{data_format}", name="{name}")'


def _short(layer) -> str:
    if isinstance(layer, Conv):
        return {"Conv2D": "conv", "SeparableConv2D": "sep", "DepthwiseConv2D": "dw"}[layer.kind]
    if isinstance(layer, Pool):
        return "maxpool" if layer.kind == "MaxPooling2D" else "avgpool"
    if isinstance(layer, Norm):
        return "bn"
    if isinstance(layer, Pad):
        return "crop" if layer.crop else "pad"
    if isinstance(layer, Act) and layer.name in ("rescaling", "spatial_dropout", "channel_softmax"):
        return layer.name
    return "act"


# Strategies --------------------------------------------------------------------

ACTIVATIONS = (None, "relu", "tanh", "sigmoid", "swish", "elu", "linear")
LAYER_ACTIVATIONS = (
    "relu",
    "relu6",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "rescaling",
    "spatial_dropout",
    "channel_softmax",
)
SIZES = st.integers(min_value=8, max_value=40)


@st.composite
def convs(draw, size, channels, *, same_only=False, stride_one=False, filters=None):
    """A convolution that Keras can build on a map of ``size``."""
    kind = draw(st.sampled_from(("Conv2D", "SeparableConv2D", "DepthwiseConv2D")))
    if filters is not None and kind == "DepthwiseConv2D" and filters != channels:
        kind = "Conv2D"
    if kind == "DepthwiseConv2D":
        count = 1 if filters is not None else draw(st.integers(1, 2))
    else:
        count = filters if filters is not None else draw(st.integers(1, 6))
    square = draw(st.booleans())
    kernel_h = draw(st.integers(1, 4))
    kernel = (kernel_h, kernel_h) if square else (kernel_h, draw(st.integers(1, 4)))
    strides = (1, 1) if stride_one else draw(st.sampled_from(((1, 1), (2, 2), (1, 2), (2, 1), (3, 3))))
    if channels == 1 and kind != "DepthwiseConv2D" and strides[0] == 1 and strides[1] > 1:
        # TensorFlow's oneDNN convolution reads garbage for one input channel, a
        # stride along the width only and a batch of several (tests/test_upstream_bugs.py).
        strides = (strides[1], strides[1])
    if max(strides) > 1:
        dilation = (1, 1)
    else:
        dilation = draw(st.sampled_from(((1, 1), (2, 2), (1, 2), (3, 1))))
    padding = "same" if same_only else draw(st.sampled_from(("valid", "same")))
    conv = Conv(
        kind,
        count,
        kernel,
        strides,
        dilation,
        padding,
        activation=draw(st.sampled_from(ACTIVATIONS)),
        use_bias=draw(st.booleans()),
    )
    if min(conv.out_size(size)) < 1:
        conv = Conv(kind, count, kernel, strides, dilation, "same", conv.activation, conv.use_bias)
    return conv


@st.composite
def pools(draw, size, *, same_only=False, stride_one=False):
    kind = draw(st.sampled_from(("MaxPooling2D", "AveragePooling2D")))
    side = draw(st.integers(1, 3))
    pool = (side, side) if draw(st.booleans()) else (side, draw(st.integers(1, 3)))
    strides = (1, 1) if stride_one else draw(st.sampled_from((pool, (1, 1), (2, 2), (2, 1))))
    padding = "same" if same_only else draw(st.sampled_from(("valid", "same")))
    layer = Pool(kind, pool, strides, padding)
    if min(layer.out_size(size)) < 1:
        layer = Pool(kind, pool, strides, "same")
    return layer


@st.composite
def residuals(draw, size, channels):
    """An Add or Concatenate block whose branches end at the same map size."""
    merge = draw(st.sampled_from(("Add", "Concatenate")))
    strided = draw(st.sampled_from(("no", "same", "valid")))
    if strided == "valid":
        # ResNet-like downsampling without padding: the two branches line up at
        # this size, but only at some sizes (the FCN refuses the others).
        filters = draw(st.integers(1, 6))
        main = Conv("Conv2D", filters, (2, 2), (2, 2), activation=draw(st.sampled_from(ACTIVATIONS)))
        shortcut = Conv("Conv2D", filters, (1, 1), (2, 2))
        if main.out_size(size) == shortcut.out_size(size):
            return Residual(((main,), (shortcut,)), merge)
        strided = "same"
    if strided == "same":
        stride = draw(st.sampled_from((2, 3)))
        out_channels = draw(st.integers(1, 6)) if merge == "Add" else None
        main = Conv(
            "Conv2D",
            out_channels or draw(st.integers(1, 6)),
            (3, 3),
            (stride, stride),
            padding="same",
            activation=draw(st.sampled_from(ACTIVATIONS)),
        )
        shortcut_filters = main.filters if merge == "Add" else draw(st.integers(1, 4))
        if draw(st.booleans()):
            shortcut = (Conv("Conv2D", shortcut_filters, (1, 1), (stride, stride), padding="same"),)
        else:
            pooled = Pool(
                draw(st.sampled_from(("MaxPooling2D", "AveragePooling2D"))), (stride, stride), (stride, stride), "same"
            )
            shortcut = (
                (pooled,)
                if merge == "Concatenate" or main.filters == channels
                else (pooled, Conv("Conv2D", main.filters, (1, 1), padding="same"))
            )
        extra = (Norm(),) if draw(st.booleans()) else ()
        return Residual(((main, *extra), shortcut), merge)
    depth = draw(st.integers(1, 2))
    branch = []
    for i in range(depth):
        last = i == depth - 1
        if draw(st.integers(0, 4)) == 0:
            branch.append(draw(pools(size, same_only=True, stride_one=True)))
            continue
        filters = channels if (last and merge == "Add") else None
        branch.append(draw(convs(size, channels, same_only=True, stride_one=True, filters=filters)))
        if draw(st.booleans()):
            branch.append(Norm())
    if merge == "Add" and _chain_channels(branch, channels) != channels:
        branch.append(Conv("Conv2D", channels, (1, 1), padding="same"))
    branches = [(), tuple(branch)]
    if merge == "Concatenate" and draw(st.booleans()):
        branches[0] = (draw(convs(size, channels, same_only=True, stride_one=True)),)
    return Residual(tuple(branches), merge)


@st.composite
def operations(draw, size, channels):
    """A `keras.ops` call on the map (see `OpNode`)."""
    kind = draw(st.sampled_from(OP_KINDS))
    if kind == "split" and channels < 2:
        kind = "affine"
    amounts = ((0, 1), (0, 1))
    if kind == "pad":
        amounts = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))  # type: ignore[assignment]
    elif kind == "slice":
        amounts = tuple((draw(st.integers(0, 1)), draw(st.integers(1, 2))) for _ in range(2))  # type: ignore[assignment]
        if min(len(range(start, n, step)) for n, (start, step) in zip(size, amounts)) < 1:
            amounts = ((0, 1), (0, 1))
    return OpNode(kind, amounts, draw(st.sampled_from((0.5, -1.5, 2.0))), draw(st.sampled_from((0.0, 0.25, 3.0))))


@st.composite
def bodies(draw, size, channels, allow_branches):
    layers_, count = [], draw(st.integers(1, 5))
    for _ in range(count):
        choice = draw(st.sampled_from(("conv", "conv", "pool", "norm", "act", "residual", "pad", "se", "op")))
        if choice in ("residual", "se", "op") and not allow_branches:
            choice = "conv"
        if choice == "conv":
            layer = draw(convs(size, channels))
        elif choice == "pool":
            layer = draw(pools(size))
        elif choice == "norm":
            layer = Norm()
        elif choice == "act":
            layer = Act(draw(st.sampled_from(LAYER_ACTIVATIONS)))
        elif choice == "pad":
            crop = draw(st.booleans())
            amounts = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
            layer = Pad(amounts, crop)  # type: ignore[arg-type]
            if min(layer.out_size(size)) < 1:
                layer = Pad(amounts, crop=False)  # type: ignore[arg-type]
        elif choice == "se":
            layer = SqueezeExcite(
                channels,
                draw(st.integers(1, 4)),
                draw(st.sampled_from(("avg", "max"))),
                keepdims=draw(st.booleans()),
            )
        elif choice == "op":
            layer = draw(operations(size, channels))
        else:
            layer = draw(residuals(size, channels))
        layers_.append(layer)
        size, channels = layer.out_size(size), layer.out_channels(channels)
    return tuple(layers_), size, channels


@st.composite
def heads(draw, data_format, feature_shape, allow_branches):
    kind = draw(st.sampled_from(("flatten", "avg", "max", "avgmax")))
    if kind == "avgmax" and not allow_branches:
        kind = "avg"
    keepdims = kind in ("avg", "max") and draw(st.booleans())
    after = draw(st.sampled_from(("flatten", "reshape", "conv1x1", "none"))) if keepdims else "flatten"
    flatten_format = draw(st.sampled_from((None, "channels_last", "channels_first")))
    count = draw(st.integers(1, 3))
    dense = []
    for i in range(count):
        last = i == count - 1
        activation = draw(st.sampled_from((None, "softmax", "sigmoid") if last else (None, "relu", "tanh")))
        dropout = draw(st.sampled_from((None, 0.25)))
        # A normalization right after a Flatten cannot be converted: keep it rare.
        norm = None
        if draw(st.integers(0, 9 if i == 0 and kind == "flatten" else 3)) == 0:
            norm = draw(st.sampled_from(("batch", "layer")))
        prelu = activation is None and draw(st.integers(0, 3)) == 0
        dense.append(
            DenseSpec(draw(st.integers(1, 8)), activation, dropout, norm, use_bias=draw(st.booleans()), prelu=prelu)
        )
    final = draw(st.sampled_from((None, None, "softmax", "activation_softmax")))
    head_ops = tuple(draw(st.lists(st.sampled_from(HEAD_OPS), max_size=2))) if allow_branches else ()
    permute = None
    if kind == "flatten" and draw(st.integers(0, 3)) == 0:
        permute = draw(st.sampled_from(PERMUTATIONS))
    return Head(kind, tuple(dense), keepdims, after, flatten_format, final, head_ops, permute)


# Permute's dims before a Flatten: height and width swapped (mtcnn's (2, 1, 3) in channels-last), or channels moved.
PERMUTATIONS = ((2, 1, 3), (1, 3, 2), (3, 1, 2), (2, 3, 1), (3, 2, 1))


@st.composite
def architectures(draw):
    """Random small CNN classifiers: see the module docstring."""
    data_format = draw(st.sampled_from(("channels_last", "channels_first")))
    size = (draw(SIZES), draw(SIZES))
    channels = draw(st.integers(1, 4))
    outer = draw(st.sampled_from(("functional", "sequential")))
    nest_body = draw(st.booleans())
    nest_head = draw(st.booleans())
    allow_branches = outer == "functional" or nest_body
    body, feature_size, feature_channels = draw(bodies(size, channels, allow_branches))
    feature_shape = (*feature_size, feature_channels)
    head = draw(heads(data_format, feature_shape, outer == "functional" and not nest_head))
    if head.kind == "flatten" and all(isinstance(layer, (Norm, Act, OpNode)) for layer in body):
        # Without a convolution or pooling the layout is not in the model: Keras's
        # global `image_data_format` (channels_last) is what the converter assumes.
        data_format = "channels_last"
    policy = draw(st.sampled_from((None, None, None, None, "mixed_float16", "mixed_bfloat16")))
    if policy == "mixed_float16" and not _runs_in_float16_on_cpu(body, data_format):
        policy = "mixed_bfloat16"
    if policy == "mixed_bfloat16" and data_format == "channels_first" and not _cpu_runs_bfloat16_nchw_conv():
        policy = None
    if policy == "mixed_bfloat16" and _has_unequal_depthwise_strides(body):
        policy = None  # TensorFlow's CPU has no bfloat16 depthwise kernel for unequal strides either
    arch = Architecture(
        data_format=data_format,
        input_size=size,
        channels=channels,
        body=body,
        head=head,
        outer=outer,
        nest_body=nest_body,
        nest_head=nest_head,
        seed=draw(st.integers(0, 2**16)),
        policy=policy,
        wrap=draw(st.integers(0, 4)) == 0,
        feature_shape=feature_shape,
        subclass=_subclass(draw, outer),
        second_output=draw(st.integers(1, 4))
        if outer == "functional" and not nest_head and draw(st.integers(0, 3)) == 0
        else 0,
        augment=tuple(draw(st.lists(st.sampled_from(AUGMENTATIONS), max_size=3, unique=True)))
        if draw(st.integers(0, 3)) == 0
        else (),
        normalization=policy is None and draw(st.integers(0, 4)) == 0,
        underscore=draw(st.integers(0, 4)) == 0,
    )
    # Keras itself cannot build a Sequential around a model named "__...": its symbolic build opens a root scope.
    return replace(arch, underscore=False) if arch.wrap else arch


# Random augmentations the generator puts first (the identity at inference), with their required arguments.
_AUGMENTATION_ARGUMENTS = {
    "RandomFlip": "",
    "RandomRotation": "0.1, ",
    "RandomZoom": "0.1, ",
    "RandomTranslation": "0.1, 0.1, ",
    "RandomContrast": "0.2, ",
    "RandomBrightness": "0.2, ",
}
AUGMENTATIONS = tuple(sorted(_AUGMENTATION_ARGUMENTS))


def _subclass(draw, outer: str) -> str | None:
    if draw(st.integers(0, 3)) != 0:
        return None
    return "steps" if outer == "sequential" and draw(st.booleans()) else "wrapper"


@functools.cache
def _cpu_runs_bfloat16_nchw_conv() -> bool:
    """Whether this CPU's TensorFlow has a bfloat16 channels-first Conv2D.

    oneDNN provides it on processors with AVX-512; on others (AVX2 only) TensorFlow has no such kernel,
    so a generated model could not run at all there, converted or not.
    """
    import tensorflow as tf

    try:
        images = tf.zeros((1, 1, 4, 4), tf.bfloat16)
        tf.nn.conv2d(images, tf.zeros((3, 3, 1, 1), tf.bfloat16), 1, "VALID", data_format="NCHW")
    except tf.errors.UnimplementedError:
        return False
    return True


def _runs_in_float16_on_cpu(body, data_format: str) -> bool:
    """TensorFlow's CPU kernels in float16 lack channels-first Conv2D and unequal depthwise strides."""
    return data_format != "channels_first" and not _has_unequal_depthwise_strides(body)


def _has_unequal_depthwise_strides(body) -> bool:
    """A depthwise or separable convolution strided differently along height and width."""
    layers_ = list(body)
    while layers_:
        layer = layers_.pop()
        if isinstance(layer, Residual):
            layers_.extend(inner for branch in layer.branches for inner in branch)
        elif isinstance(layer, Conv) and layer.kind != "Conv2D" and layer.strides[0] != layer.strides[1]:
            return True
    return False
