"""Fresh copies of layers, with their weights copied variable by variable."""

from __future__ import annotations

from keras import ops

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe, finalize_state, is_layer


def copy_weights(source, target) -> None:
    """Assign every weight of ``source`` to the matching weight of ``target``.

    Variables are assigned one at a time, so no whole-model copy of the weights
    is ever held in memory.
    """
    if len(source.weights) != len(target.weights):
        raise ConversionError(
            f"Layer {describe(source)} has {len(source.weights)} weights but its copy has "
            f"{len(target.weights)}; the layer's config does not rebuild it faithfully."
        )
    for old, new in zip(source.weights, target.weights):
        if tuple(old.shape) != tuple(new.shape):
            raise ConversionError(
                f"Layer {describe(source)}: weight '{old.path}' has shape {tuple(old.shape)} "
                f"but its copy has {tuple(new.shape)}."
            )
        new.assign(old.value)
    finalize_state(target)


def call_with_initial_values(layer, inputs, values: dict):
    """Call (and so build) ``layer`` with weights initialised from ``values``.

    ``values`` maps initializer attribute names (``"kernel_initializer"``) to the
    arrays the weights must hold. The weights are created directly from them,
    never from random numbers, which keeps peak memory at one copy; the layer's
    own initializers are put back afterwards so its config is unchanged.
    """
    saved = {name: getattr(layer, name) for name in values}

    def constant_initializer(value):
        def initializer(shape, dtype=None):
            return ops.cast(value, dtype) if dtype is not None else value

        return initializer

    for name, value in values.items():
        setattr(layer, name, constant_initializer(value))
    try:
        return layer(inputs)
    finally:
        for name, initializer in saved.items():
            setattr(layer, name, initializer)


class LayerCloner:
    """Makes one fresh copy per source layer, so shared layers stay shared; operations are re-applied."""

    def __init__(self):
        self._clones: dict[int, object] = {}
        self._weights_copied: set[int] = set()

    def clone(self, layer):
        key = id(layer)
        if key not in self._clones:
            self._clones[key] = self._fresh_copy(layer)
        return self._clones[key]

    def call(self, layer, args, kwargs):
        """Call the copy of ``layer`` on new tensors; copy the weights after its first call."""
        new_layer = self.clone(layer)
        outputs = new_layer(*args, **kwargs)
        if id(layer) not in self._weights_copied and new_layer is not layer:
            copy_weights(layer, new_layer)
            self._weights_copied.add(id(layer))
        return outputs

    @staticmethod
    def _fresh_copy(layer):
        if not is_layer(layer):
            # A `keras.ops` operation (``x + 3.0``, ``ops.pad``) holds no weights and no state:
            # calling it on the new tensors records it in the new graph.
            return layer
        try:
            return layer.__class__.from_config(layer.get_config())
        except Exception as error:
            if not layer.weights:
                # A weightless layer that cannot round-trip its config (a Lambda
                # holding a closure, say) is safe to share with the source.
                return layer
            raise ConversionError(
                f"Layer {describe(layer)} cannot be rebuilt from its config ({error}). "
                "Give it a working `get_config()`/`from_config()` pair."
            ) from error
