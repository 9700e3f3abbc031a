"""The rules: each one knows how to carry one kind of layer call onto a score map.

The engine asks them in order; the first that claims a call wins. A new head
pattern is a new `Rule` in this list. The body rules come last: a call on
feature maps that no head rule claims is refused when it ties the map to one
size, and copied otherwise.
"""

from keras_fcn_surgery.surgery.rules.base import Context, NodeView, Rewrite, Rule, Step
from keras_fcn_surgery.surgery.rules.body import BodyRule, SizeBoundRule
from keras_fcn_surgery.surgery.rules.flatten_dense import (
    BatchNormOnFlattenedMapRule,
    DenseOnFlattenedMapRule,
    FlattenRule,
    PermuteBeforeFlattenRule,
)
from keras_fcn_surgery.surgery.rules.global_pooling import (
    GlobalPoolingRule,
    GlobalReductionRule,
    SqueezeExcitationRule,
)
from keras_fcn_surgery.surgery.rules.identity import CenterCropRule, InferenceIdentityRule
from keras_fcn_surgery.surgery.rules.operations import OperationRule
from keras_fcn_surgery.surgery.rules.vector_layers import (
    ChannelAxisRule,
    DenseOnVectorMapRule,
    ElementwiseRule,
    MergeRule,
    ParametricElementwiseRule,
    ReshapeRule,
    UnitMapConvRule,
)

DEFAULT_RULES: tuple[Rule, ...] = (
    InferenceIdentityRule(),
    CenterCropRule(),
    PermuteBeforeFlattenRule(),
    FlattenRule(),
    DenseOnFlattenedMapRule(),
    BatchNormOnFlattenedMapRule(),
    SqueezeExcitationRule(),
    GlobalPoolingRule(),
    GlobalReductionRule(),
    DenseOnVectorMapRule(),
    ElementwiseRule(),
    ChannelAxisRule(),
    ParametricElementwiseRule(),
    MergeRule(),
    ReshapeRule(),
    UnitMapConvRule(),
    OperationRule(),
    SizeBoundRule(),
    BodyRule(),
)

__all__ = ["DEFAULT_RULES", "Context", "NodeView", "Rewrite", "Rule", "Step"]
