"""What one forward pass costs: multiply-accumulates and activation memory, from the layers' shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.graph import flat_nodes, tensor_shapes
from keras_fcn_surgery.layout import Layout


@dataclass(frozen=True)
class PassCost:
    """The cost of one forward pass at one input shape.

    Attributes:
        macs: multiply-accumulates of its convolutions and dense layers.
        peak_elements: the most activation elements alive at once (a layer's
            inputs and output), an estimate of the pass's working memory.
        output_shape: the shape of the model's output.
    """

    macs: int
    peak_elements: int
    output_shape: tuple


def layer_macs(layer, input_shape, output_shape) -> int:
    """Multiply-accumulates of one call of a convolution or dense layer (0 for other layers)."""
    out = int(np.prod(output_shape[1:]))
    if isinstance(layer, taxonomy.DEPTHWISE_CONVOLUTIONS):
        return out * int(np.prod(layer.kernel_size))
    if isinstance(layer, taxonomy.SEPARABLE_CONVOLUTIONS):
        channels = int(Layout.of(layer).channels(input_shape))
        depthwise = int(np.prod(input_shape[1:])) * layer.depth_multiplier * int(np.prod(layer.kernel_size))
        return depthwise + out * channels * layer.depth_multiplier
    if isinstance(layer, taxonomy.PLAIN_CONVOLUTIONS):
        channels = int(Layout.of(layer).channels(input_shape))
        return out * int(np.prod(layer.kernel_size)) * channels // layer.groups
    if isinstance(layer, taxonomy.DENSE):
        return out * int(input_shape[-1])
    if isinstance(layer, taxonomy.EINSUM_DENSE):
        return out * _einsum_contracted(layer)
    return 0


def _einsum_contracted(layer) -> int:
    """Kernel elements one output element of an `EinsumDense` sums over (its kernel's contracted axes)."""
    operands, output = layer.equation.replace(" ", "").split("->")
    kernel_letters = operands.split(",")[1]
    shape = tuple(layer.kernel.shape)
    if "." in kernel_letters or len(kernel_letters) != len(shape):
        return 0
    return int(np.prod([d for letter, d in zip(kernel_letters, shape) if letter not in output]))


def layer_costs(model, input_shape) -> list[tuple[int, tuple]]:
    """``(MACs, output shape)`` of each layer of ``model`` that computes (MACs > 0) on an input of ``input_shape``."""
    shapes = tensor_shapes(model, input_shape)
    found = []
    for node in flat_nodes(model):
        inputs = [shapes[id(t)] for t in node.input_tensors]
        outputs = [shapes[id(t)] for t in node.outputs]
        if inputs and outputs:
            macs = layer_macs(node.operation, inputs[0], outputs[0])
            if macs:
                found.append((macs, outputs[0]))
    return found


def pass_cost(model, input_shape) -> PassCost:
    """MACs and peak activation elements of ``model`` on an input of ``input_shape`` (batch included)."""
    shapes = tensor_shapes(model, input_shape)
    macs, peak = 0, int(np.prod(input_shape))
    for node in flat_nodes(model):
        inputs = [shapes[id(t)] for t in node.input_tensors]
        outputs = [shapes[id(t)] for t in node.outputs]
        if inputs and outputs:
            macs += layer_macs(node.operation, inputs[0], outputs[0])
        alive = sum(int(np.prod(s)) for s in inputs + outputs)
        peak = max(peak, alive)
    return PassCost(macs, peak, shapes[id(model.outputs[0])])
