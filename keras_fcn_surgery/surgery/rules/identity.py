"""Layers that are the identity at inference (random augmentations, the Dropout family) leave the graph."""

from __future__ import annotations

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.surgery.rules.base import NodeView, Rule, Step, pass_through


class InferenceIdentityRule(Rule):
    """A layer that returns its input at inference is dropped, in any mode, nested models included.

    Its output is its input: the converted model and the files exported from
    it hold no augmentation or noise layer, so no random operation reaches a
    runtime, and a recorded ``training=True`` (a `Sequential` of augmentations
    built outside a model records it) cannot turn one on. The plan does not
    list it: it changes nothing.
    """

    layers = taxonomy.INFERENCE_IDENTITY

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        return None if mode is None else pass_through(mode)
