"""A classifier's large-kernel head convolution as blocked matrix products in numpy's BLAS (CPU inference).

A Dense layer turned into a convolution (VGG16's fc6: 7 x 7 x 512 -> 4096,
valid) is most of a converted classifier's cost per map cell. On a CPU,
TensorFlow runs it at under half the speed of the same arithmetic as a matrix
product in numpy's BLAS (fc6 on a 131 x 131 map, 2 cores: 47 GMAC/s with XLA,
86 as row blocks here). `split_forward` runs the network before that
convolution and after it in TensorFlow, and the convolution itself as, for
each kernel row, one product of the row's ``kw`` shifted input windows laid
side by side with the kernel row, accumulated over a few output rows at a
time so that memory stays bounded. A pointwise rest (fc7 and fc8 as 1 x 1
convolutions, dropout, ReLU, softmax) runs on each block of rows as it comes,
its leading 1 x 1 convolutions as matrix products here too (TensorFlow's CPU
matrix product runs at about half numpy's). The sums differ from TensorFlow's
only in order (float32 round-off).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.graph import graph_of, nodes_in_order, sub_model
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.names import runtime_name

# Elements of the input windows of one block of output rows (about 64 MiB in float32).
_BLOCK_ELEMENTS = 16 << 20


def _runs_as_rows(layer) -> bool:
    return (
        taxonomy.is_large_kernel_conv(layer)
        and Layout.of(layer).channels_last
        and layer.padding == "valid"
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.compute_dtype == "float32"
        and layer.activation in (keras.activations.linear, keras.activations.relu)
    )


def valid_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, relu: bool) -> np.ndarray:
    """A valid, stride-1, channels-last 2-D convolution (plus bias and ReLU) as blocked matrix products.

    Args:
        x: ``(N, H, W, C)`` float32.
        kernel: ``(kh, kw, C, F)``.
        bias: ``(F,)`` or None.
        relu: apply ``max(0, .)`` to the result.

    Returns:
        ``(N, H - kh + 1, W - kw + 1, F)`` float32.
    """
    batch, height, width, _ = x.shape
    kh, kw, _, filters = kernel.shape
    out = np.empty((batch, max(height - kh + 1, 0), max(width - kw + 1, 0), filters), dtype=np.float32)
    for image, top, block in conv_row_blocks(x, kernel, bias, relu):
        out[image, top : top + block.shape[0]] = block
    return out


def conv_row_blocks(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, relu: bool):
    """`valid_conv`'s output a few rows at a time: ``(image, first row, rows)`` for each block.

    Each yielded block is a buffer reused for the next one: copy it or use it before asking for more.
    """
    batch, height, width, channels = x.shape
    kh, kw, _, filters = kernel.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    if out_h < 1 or out_w < 1:
        return
    rows_per_block = max(1, min(out_h, _BLOCK_ELEMENTS // (out_w * kw * channels)))
    total_buffer = np.empty((rows_per_block * out_w, filters), dtype=np.float32)
    product = np.empty_like(total_buffer)
    for image in range(batch):
        for top in range(0, out_h, rows_per_block):
            rows = min(rows_per_block, out_h - top)
            total = total_buffer[: rows * out_w]
            for i in range(kh):
                band = x[image, top + i : top + i + rows]
                windows = np.concatenate([band[:, j : j + out_w, :] for j in range(kw)], axis=-1)
                weights = kernel[i].reshape(kw * channels, filters)  # (kw, C) flattened as the windows are laid
                part = total if i == 0 else product[: rows * out_w]
                np.matmul(windows.reshape(rows * out_w, -1), weights, out=part)
                if i:
                    total += part
            if bias is not None:
                total += bias
            if relu:
                np.maximum(total, 0, out=total)
            yield image, top, total.reshape(rows, out_w, filters)


def _pointwise(model) -> bool:
    """True when each output cell of ``model`` depends on the same cell of its input only."""
    try:
        grid = geometry(model)
    except Exception:  # a layer geometry cannot follow: treat the part as a whole
        return False
    return not grid.global_context and tuple(grid.receptive_field) == (1, 1) and tuple(grid.stride) == (1, 1)


_CELL_ACTIVATIONS = {"linear", "relu", "softmax"}


def _activation_name(function) -> str | None:
    for name in _CELL_ACTIVATIONS:
        if function is getattr(keras.activations, name):
            return name
    return None


def _cell_step(operation) -> tuple | None:
    """``(kind, layer, activation)`` when numpy can run ``operation`` on a ``(cells, channels)`` matrix."""
    if isinstance(operation, taxonomy.INFERENCE_IDENTITY):
        return ("identity", operation, "linear")
    if isinstance(operation, taxonomy.RELUS):
        config = operation.get_config()
        plain = config.get("max_value") is None and not config.get("negative_slope") and not config.get("threshold")
        return ("identity", operation, "relu") if plain else None
    if isinstance(operation, taxonomy.SOFTMAXES):
        return ("identity", operation, "softmax") if operation.axis in (-1, [-1], (-1,)) else None
    if isinstance(operation, taxonomy.ACTIVATIONS):
        name = _activation_name(operation.activation)
        return ("identity", operation, name) if name else None
    if getattr(operation, "compute_dtype", None) != "float32" or getattr(operation, "quantization_mode", None):
        return None
    name = _activation_name(getattr(operation, "activation", None))
    if name is None:
        return None
    if isinstance(operation, taxonomy.DENSE):
        return ("dense", operation, name)
    pointwise_conv = (
        isinstance(operation, taxonomy.PLAIN_CONVOLUTIONS)
        and tuple(operation.kernel_size) == (1, 1)
        and tuple(operation.strides) == (1, 1)
        and operation.groups == 1
        and Layout.of(operation).channels_last
    )
    return ("conv", operation, name) if pointwise_conv else None


def _cell_steps(model):
    """The leading layers of a pointwise, channels-last ``model`` that numpy runs cell by cell.

    Returns ``(steps, rest)``: the `_cell_step` of each leading layer of a
    plain chain, and the part after them as a sub-model (None when the steps
    cover all of it).
    """
    graph = graph_of(model)
    tensor, steps = graph.inputs[0], []
    for node in nodes_in_order(graph):
        step = _cell_step(node.operation)
        if step is None or len(node.outputs) != 1 or [id(t) for t in node.input_tensors] != [id(tensor)]:
            break
        steps.append(step)
        tensor = node.outputs[0]
    if tensor is graph.outputs[0]:
        return steps, None
    if not steps:
        return [], model
    return steps, sub_model(model, tensor, graph.outputs[0], name=runtime_name(model.name, "rest"))


def _value(variable) -> np.ndarray:
    """A Keras variable's current value as a numpy array, without a copy where the backend allows one."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return np.asarray(tf.convert_to_tensor(variable))  # a view of the variable's current value
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def _cell_functions(steps) -> list:
    """``(cells, channels) -> (cells, channels')`` for each step, with the weights as they are now."""
    functions = []
    for kind, layer, activation in steps:
        weights = None
        if kind != "identity":
            kernel = _value(layer.kernel)
            kernel = kernel.reshape(kernel.shape[-2], kernel.shape[-1])
            bias = _value(layer.bias) if layer.use_bias else None
            weights = (kernel, bias)
        functions.append(_cell_function(weights, activation))
    return functions


def _cell_function(weights, activation):
    def apply(cells):
        if weights is not None:
            kernel, bias = weights
            cells = cells @ kernel
            if bias is not None:
                cells += bias
        # In place: ``cells`` is this step's own product, or the caller's block buffer, which is refilled
        # for the next block only after this one is used.
        if activation == "relu":
            np.maximum(cells, 0, out=cells)
        elif activation == "softmax":
            cells -= cells.max(axis=-1, keepdims=True)
            np.exp(cells, out=cells)
            cells /= cells.sum(axis=-1, keepdims=True)
        return cells

    return apply


def split_forward(model, forward_fn):
    """``numpy batch -> numpy outputs`` with the model's large-kernel head convolution in numpy, or None.

    The model must be a functional graph with one output in which one such convolution
    (channels-last, valid, stride 1, float32, linear or ReLU) is called once
    and its input carries everything after it (no branch crosses it); the
    parts before and after it run through ``forward_fn(sub_model)``.
    """
    try:
        graph = graph_of(model)
    except Exception:
        return None
    if len(graph.outputs) != 1:  # several maps: the row blocks below assemble one
        return None
    nodes = [node for node in nodes_in_order(graph) if _runs_as_rows(node.operation)]
    if len(nodes) != 1:  # none, or several (a shared layer called twice included)
        return None
    node = nodes[0]
    layer = node.operation
    start, stop = node.input_tensors[0], node.outputs[0]
    try:
        output = graph.outputs[0]
        name = runtime_name(model.name, "before")
        before = None if start is graph.inputs[0] else sub_model(model, None, start, name=name)
        after = None if stop is output else sub_model(model, stop, output, name=runtime_name(model.name, "after"))
    except Exception:  # a branch crosses the convolution: the graph does not split there
        return None
    head_before = forward_fn(before) if before is not None else None
    head_after = forward_fn(after) if after is not None else None
    # A pointwise rest (VGG16's fc7, fc8, softmax) runs on each block of rows as it comes, so the
    # convolution's 4096-channel output is never whole in memory.
    by_blocks = after is not None and _pointwise(after)
    steps, rest = _cell_steps(after) if by_blocks and Layout.of(layer).channels_last else ([], after)
    head_rest = forward_fn(rest) if by_blocks and rest is not None else None
    relu = layer.activation is keras.activations.relu
    parts = (before, after, rest)  # forward_fn traces a model through a weak reference: keep the parts alive

    def forward(batch):
        assert parts, "the parts are alive"
        features = head_before(batch) if head_before is not None else np.asarray(batch, dtype=np.float32)
        features = np.ascontiguousarray(features, dtype=np.float32)
        kernel = _value(layer.kernel)
        bias = _value(layer.bias) if layer.use_bias else None
        if not by_blocks:
            scores = valid_conv(features, kernel, bias, relu)
            return head_after(scores) if head_after is not None else scores
        out = None
        cell_functions = _cell_functions(steps)
        for image, top, block in conv_row_blocks(features, kernel, bias, relu):
            if cell_functions:
                cells = block.reshape(-1, block.shape[-1])
                for function in cell_functions:
                    cells = function(cells)
                block = cells.reshape(*block.shape[:2], cells.shape[-1])
            result = head_rest(block[None])[0] if head_rest is not None else block
            if out is None:
                height, width = features.shape[1] - kernel.shape[0] + 1, features.shape[2] - kernel.shape[1] + 1
                out = np.empty((features.shape[0], height, width, result.shape[-1]), dtype=result.dtype)
            out[image, top : top + result.shape[0]] = result
        if out is None:  # no cell at all: let the rest say what it makes of an empty map
            return head_after(valid_conv(features, kernel, bias, relu))
        return out

    if before is None and by_blocks:
        # its output cell (i, j) reads the input's rows i..i+kh-1 and columns j..j+kw-1: valid, stride 1, pointwise rest
        forward.cells = _cells_function(layer, steps, head_rest, relu, parts)  # type: ignore[attr-defined]
    return forward


def _cells_function(layer, steps, head_rest, relu: bool, parts):
    """``windows -> scores`` for a model that starts with the head convolution: ``windows``, ``(n, kh, kw, C)``,
    are the input windows of ``n`` output cells, scattered anywhere over a map; the result is their ``(n, classes)``.

    A masked map's last stage computes only its kept cells this way, in products of many cells at a time: as
    tiles, the cells at a tissue's edge came in thin strips, each product streaming the whole kernel (VGG16's
    fc6: 411 MB) for a few dozen cells (30% slower a multiply-accumulate at 4096², 34% tissue).
    """

    def cells(windows: np.ndarray) -> np.ndarray:
        assert parts, "the parts are alive"
        count = windows.shape[0]
        kernel = _value(layer.kernel)
        kernel = kernel.reshape(-1, kernel.shape[-1])  # (kh, kw, C) flattened as each window is laid
        bias = _value(layer.bias) if layer.use_bias else None
        functions = _cell_functions(steps)
        per_block = max(1, _BLOCK_ELEMENTS // kernel.shape[0])
        found = None
        for start in range(0, count, per_block):
            block = np.ascontiguousarray(windows[start : start + per_block], dtype=np.float32)
            values = block.reshape(block.shape[0], -1) @ kernel
            if bias is not None:
                values += bias
            if relu:
                np.maximum(values, 0, out=values)
            for function in functions:
                values = function(values)
            if head_rest is not None:
                values = head_rest(values[None, None])[0, 0]
            if found is None:
                found = np.empty((count, values.shape[-1]), dtype=values.dtype)
            found[start : start + len(values)] = values
        return found if found is not None else np.empty((0, 0), dtype=np.float32)

    cells.window = tuple(int(k) for k in layer.kernel_size)  # type: ignore[attr-defined]
    return cells
