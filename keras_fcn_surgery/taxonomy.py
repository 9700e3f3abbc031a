"""What each Keras layer and `keras.ops` operation does to an image map: one classification for the package.

The surgery (which layers carry over to a score map), the geometry (which
layers move or widen a cell's window) and the inference (which layers the
BLAS head runs) all ask these questions; the answers live here only, so that
they cannot disagree. Layer kinds are tuples of classes (for ``isinstance``);
operation kinds are sets of `keras.ops` class names (Keras records ``x + 1``
or ``ops.relu(x)`` in a graph as operations of those classes, which are not
layers).
"""

from __future__ import annotations

import keras

from keras_fcn_surgery.dilated_pooling import DilatedAveragePooling2D, DilatedMaxPooling2D
from keras_fcn_surgery.layout import Layout

_layers = keras.layers

# Layers ------------------------------------------------------------------------------------------------

# Random image augmentations: each returns its input unchanged at inference (``training=False``), whatever
# the image. `RandomCrop` is not one: at inference it crops or resizes to its size. Named, not imported, so
# that a Keras without one of them still loads this module.
_RANDOM_AUGMENTATION_NAMES = """RandomFlip RandomRotation RandomZoom RandomTranslation RandomContrast RandomBrightness
    RandomHue RandomSaturation RandomSharpness RandomShear RandomGrayscale RandomInvert RandomPerspective
    RandomElasticTransform RandomErasing RandomGaussianBlur RandomColorDegeneration RandomColorJitter
    RandomPosterization AugMix RandAugment MixUp CutMix""".split()
RANDOM_AUGMENTATIONS: tuple[type, ...] = tuple(
    getattr(_layers, name) for name in _RANDOM_AUGMENTATION_NAMES if hasattr(_layers, name)
)

# Augmentations that are not the identity at inference: `RandomCrop` computes its output shape as its crop
# size but returns its input unchanged at inference, so a model built on the crop fails there.
NOT_IDENTITY_AUGMENTATIONS = (_layers.RandomCrop,)

# The identity at inference: geometry, conversion, certificates, windowed maps and exports step over them
# (the converted model and exported files leave them out).
INFERENCE_IDENTITY = (
    *RANDOM_AUGMENTATIONS,
    _layers.Dropout,
    _layers.SpatialDropout1D,
    _layers.SpatialDropout2D,
    _layers.SpatialDropout3D,
    _layers.GaussianNoise,
    _layers.GaussianDropout,
    _layers.AlphaDropout,
    _layers.Identity,
    _layers.ActivityRegularization,
)

# A function of each value alone, with no per-feature parameter: right on any layout, even on a
# Flatten's output. (`Rescaling` only with a scalar scale and offset: see `is_elementwise`.)
ELEMENTWISE = (
    *INFERENCE_IDENTITY,
    _layers.ReLU,
    _layers.LeakyReLU,
    _layers.ELU,
    _layers.Rescaling,
)

# Element-wise with parameters per feature (laid along the feature axis, or shared over some axes).
PARAMETRIC_ELEMENTWISE = (_layers.PReLU,)

# Layers that act along one axis (their ``axis``); on a map, pointwise when that is the channel axis.
CHANNEL_AXIS = (
    _layers.BatchNormalization,
    _layers.LayerNormalization,
    _layers.UnitNormalization,
    _layers.Normalization,
    _layers.Softmax,
)

# Element-wise merges of tensors of one shape.
ELEMENTWISE_MERGES = (
    _layers.Add,
    _layers.Subtract,
    _layers.Multiply,
    _layers.Average,
    _layers.Maximum,
    _layers.Minimum,
)
CONCATENATIONS = (_layers.Concatenate,)
MERGES = (*ELEMENTWISE_MERGES, *CONCATENATIONS)
# Merges that put a broadcast vector back into a map: squeeze-and-excitation's gate.
MERGES_INTO_MAP = (_layers.Multiply, _layers.Add, _layers.Subtract)

# Sliding windows over the spatial axes (kernel or pool size, strides, dilation, padding).
PLAIN_CONVOLUTIONS = (_layers.Conv2D,)  # one kernel over all (or grouped) channels
DEPTHWISE_CONVOLUTIONS = (_layers.DepthwiseConv2D,)
SEPARABLE_CONVOLUTIONS = (_layers.SeparableConv2D,)
CONVOLUTIONS = (*PLAIN_CONVOLUTIONS, *DEPTHWISE_CONVOLUTIONS, *SEPARABLE_CONVOLUTIONS)
MAX_POOLINGS = (_layers.MaxPooling2D,)
POOLINGS = (_layers.MaxPooling2D, _layers.AveragePooling2D)
WINDOWS = (*CONVOLUTIONS, *POOLINGS)
# The package's own poolings with holes (a rarefied network's): windows read from their configuration.
DILATED_POOLINGS = (DilatedMaxPooling2D, DilatedAveragePooling2D)
PADDINGS = (_layers.ZeroPadding2D,)
CROPPINGS = (_layers.Cropping2D,)
# A crop of the centre to a fixed size: at the size a classifier was built for, a Cropping2D.
CENTER_CROPS = (_layers.CenterCrop,)

GLOBAL_POOLINGS = (_layers.GlobalAveragePooling2D, _layers.GlobalMaxPooling2D)
# What a global pooling becomes when it pools one window of the original size.
WINDOW_POOLING_OF = {
    _layers.GlobalAveragePooling2D: _layers.AveragePooling2D,
    _layers.GlobalMaxPooling2D: _layers.MaxPooling2D,
}

# `keras.ops` reductions that pool a map when they reduce its two spatial axes, and the window pooling each becomes.
WINDOW_POOLING_OF_REDUCTION = {
    "Mean": _layers.AveragePooling2D,
    "Max": _layers.MaxPooling2D,
    "Amax": _layers.MaxPooling2D,
}

# Learnable upsampling: what makes a model a segmenter (per-pixel logits).
TRANSPOSED_CONVOLUTIONS = (_layers.Conv2DTranspose,)
UPSAMPLINGS = (*TRANSPOSED_CONVOLUTIONS, _layers.Conv3DTranspose)

# Layers that only apply an activation: stepped over to find the layer that computes a model's scores.
ACTIVATIONS = (_layers.Activation,)  # any activation function, by name or callable
SOFTMAXES = (_layers.Softmax,)  # along its ``axis``
RELUS = (_layers.ReLU,)  # with its cap, slope and threshold
ACTIVATION_LAYERS = (*ACTIVATIONS, *SOFTMAXES)

# Layers whose ``data_format`` says where a map's channels are.
SPATIAL_LAYOUT = (
    *WINDOWS,
    *GLOBAL_POOLINGS,
    *PADDINGS,
    *CROPPINGS,
    _layers.Conv2DTranspose,
    _layers.UpSampling2D,
)

# Dense: a matrix product on the last axis; EinsumDense: one over the axes its equation names.
DENSE = (_layers.Dense,)
EINSUM_DENSE = (_layers.EinsumDense,)

# A Python function wrapped as a layer: built in, but what it computes is its function's.
LAMBDAS = (_layers.Lambda,)

# Layers with no weights and no effect on a cell's window: the model's input.
INPUTS = (_layers.InputLayer,)

# Layers that act on each position of a map alone (on its channels), whatever the layout.
POINTWISE = (*INPUTS, *ELEMENTWISE, *PARAMETRIC_ELEMENTWISE, _layers.Activation, *ELEMENTWISE_MERGES)

# Layers that tie a map to one size when they act on it.
RESHAPE = (_layers.Reshape,)
PERMUTE = (_layers.Permute,)
FLATTEN = (_layers.Flatten,)
RESHAPES = (*RESHAPE, *PERMUTE, *FLATTEN)
RESIZINGS = (_layers.Resizing,)


def is_elementwise(layer) -> bool:
    """True for a layer that applies one function to each value alone (no per-feature parameter)."""
    if isinstance(layer, _layers.Rescaling):
        import numpy as np

        return np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0
    if isinstance(layer, _layers.Activation):
        return activation_name(layer.activation) not in AXIS_ACTIVATIONS
    return isinstance(layer, ELEMENTWISE)


def is_large_kernel_conv(layer) -> bool:
    """True for a convolution with a large kernel and many filters: a classifier's head turned into one.

    VGG16's fc6 (7 x 7, 4096 filters) and CaffeNet's (6 x 6) are; a network's own
    convolutions, with kernels of at most 5 x 5 or few filters, are not.
    """
    return (
        isinstance(layer, _layers.Conv2D)
        and layer.kernel_size[0] * layer.kernel_size[1] >= LARGE_KERNEL_CELLS
        and layer.filters >= LARGE_KERNEL_FILTERS
    )


# BatchNormalizations fold into the convolution they read (`graph.batch_norm_folds`): at inference each is an
# affine map per channel. Exact classes: a subclass may compute something else.
BATCH_NORMS = (_layers.BatchNormalization,)
FOLDING_CONVOLUTIONS = (*PLAIN_CONVOLUTIONS, *DEPTHWISE_CONVOLUTIONS)


def folds_into(norm, conv) -> bool:
    """True where ``norm`` is a BatchNormalization over the channels of what ``conv``, a Conv2D or
    DepthwiseConv2D with a linear activation (not quantized), computes: ``norm`` folds into ``conv``'s weights."""
    return (
        type(norm) in BATCH_NORMS
        and type(conv) in FOLDING_CONVOLUTIONS
        and activation_name(conv.activation) == "linear"
        and getattr(conv, "quantization_mode", None) is None
        and isinstance(norm.axis, int)
        and norm.axis % 4 == Layout.of(conv).channel_axis
    )


def is_depthwise(layer) -> bool:
    """True for a DepthwiseConv2D (its kernel is ``(h, w, in, multiplier)``)."""
    return isinstance(layer, DEPTHWISE_CONVOLUTIONS)


LARGE_KERNEL_CELLS = 25
LARGE_KERNEL_FILTERS = 512

# Activations ---------------------------------------------------------------------------------------------

# Activations that act along an axis (the features), not on each value alone.
AXIS_ACTIVATIONS = frozenset({"softmax", "log_softmax"})
# Final activations whose input (the logits) a check compares instead: a softmax hides a shift of every
# logit and saturates, a sigmoid flattens large logits.
SQUASHING_ACTIVATIONS = frozenset({"softmax", "sigmoid"})


def activation_name(activation) -> str:
    """The name of a Keras activation (a function, a string, or None for linear)."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        return activation
    return getattr(activation, "__name__", "")


def squashing_activation(operation) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` when ``operation``'s output is one's (see `SQUASHING_ACTIVATIONS`), else None.

    A `Softmax` layer, a layer whose own activation is one (a Dense, a
    convolution, an `Activation`), or the `keras.ops` operation itself.
    """
    if isinstance(operation, _layers.Softmax):
        return "softmax"
    if isinstance(operation, _layers.Layer):
        name = activation_name(getattr(operation, "activation", None))
        return name if name in SQUASHING_ACTIVATIONS else None
    name = type(operation).__name__.lower()
    return name if name in SQUASHING_ACTIVATIONS else None


# keras.ops operations, by class name --------------------------------------------------------------------

UNARY_OPERATIONS = frozenset(
    """Abs Absolute Cast Ceil Celu Clip Cos Cosh Elu Erf Erfc Exp Exp2 Expm1 Fabs Floor Gelu HardShrink HardSigmoid
    HardSilu HardTanh LeakyRelu Log Log10 Log1p Log2 LogSigmoid Negative NanToNum Reciprocal Relu Relu6 Round
    Rsqrt SaturateCast Selu Sigmoid Sign Silu Sin Sinh SoftShrink Softplus Softsign SparsePlus SparseSigmoid
    Sqrt Square Squareplus StopGradient Tan Tanh TanhShrink Threshold Trunc Copy""".split()
)
BINARY_OPERATIONS = frozenset(
    """Add Subtract Multiply Divide TrueDivide DivideNoNan FloorDivide Power Maximum Minimum Mod Fmax Fmin
    Fmod Hypot Logaddexp Arctan2""".split()
)
# Operations along one axis (their ``axis`` attribute) that keep the tensor's shape.
AXIS_OPERATIONS = frozenset({"Softmax", "LogSoftmax", "Normalize", "Cumsum", "Cumprod"})
# Reductions with ``axis`` and ``keepdims`` attributes.
REDUCTION_OPERATIONS = frozenset({"Mean", "Sum", "Max", "Min", "Prod", "Amax", "Amin", "Logsumexp", "Std", "Var"})
# Operations that split a tensor along an axis.
SPLIT_OPERATIONS = frozenset({"Split", "ArraySplit"})
# Operations that move values between axes: on a feature map they tie it to one size.
RESHAPING_OPERATIONS = frozenset({"Reshape", "Transpose", "Swapaxes", "Moveaxis", "Ravel", "Flatten", "Squeeze"})


def operation_kind(name: str) -> str:
    """``"unary"``, ``"binary"``, ``"axis"``, ``"reduction"``, ``"concatenate"``, ``"split"``,
    ``"reshaping"``, or the class name itself for any other built-in operation."""
    if name in UNARY_OPERATIONS:
        return "unary"
    if name in BINARY_OPERATIONS:
        return "binary"
    if name in AXIS_OPERATIONS:
        return "axis"
    if name in REDUCTION_OPERATIONS:
        return "reduction"
    if name in SPLIT_OPERATIONS:
        return "split"
    if name in RESHAPING_OPERATIONS:
        return "reshaping"
    if name == "Concatenate":
        return "concatenate"
    return name
