"""The rule contract (issue 10): rules declare what they take, return typed rewrites; one planning pass."""

import keras
import pytest
from models import small_flatten_cnn, valid_gap_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.surgery import engine
from keras_fcn_surgery.surgery.rules import DEFAULT_RULES
from keras_fcn_surgery.surgery.rules.base import Context, Rule, VectorMap, remove


class _Recorder(Rule):
    """Takes nothing; remembers every call the engine offered it."""

    layers = (keras.layers.Dense,)
    modes = (VectorMap,)

    def __init__(self):
        self.seen = []

    def claim(self, view):
        self.seen.append((view.layer, tuple(view.input_modes)))
        return None


class _ClaimOnly:
    """A rule written before rules declared anything: only `claim`, no `Rule` base class."""

    def __init__(self):
        self.calls = 0

    def claim(self, view):
        self.calls += 1
        if isinstance(view.layer, keras.layers.Dropout) and isinstance(view.only_mode, VectorMap):
            return remove(view, view.only_mode, "legacy rule")
        return None


def _with_rules(monkeypatch, *extra):
    monkeypatch.setattr(engine.Surgeon.__init__, "__defaults__", (tuple(extra) + DEFAULT_RULES,))


def test_the_engine_offers_a_rule_only_the_layers_and_modes_it_declares(monkeypatch):
    recorder = _Recorder()
    _with_rules(monkeypatch, recorder)
    kfs.plan(small_flatten_cnn())
    assert [layer.name for layer, _ in recorder.seen] == ["fc2"]  # fc1 reads a FlattenedMap, not a VectorMap
    assert all(isinstance(mode, VectorMap) for _, modes in recorder.seen for mode in modes)


def test_a_rule_with_only_claim_still_works(monkeypatch):
    legacy = _ClaimOnly()
    _with_rules(monkeypatch, legacy)
    plan = {rewrite.layer_name: rewrite for rewrite in kfs.plan(small_flatten_cnn()).rewrites}
    assert legacy.calls == len(small_flatten_cnn().layers)  # offered every call
    assert plan["drop1"].detail == "legacy rule" and plan["drop1"].kind is kfs.RewriteKind.REMOVED


def test_rewrites_carry_their_kind():
    kinds = {rewrite.layer_name: rewrite.kind for rewrite in kfs.plan(small_flatten_cnn()).rewrites}
    assert kinds == {
        "flatten": kfs.RewriteKind.REMOVED,
        "fc1": kfs.RewriteKind.CONV_FROM_DENSE,
        "fc2": kfs.RewriteKind.CONV_FROM_DENSE,
    }
    window = {r.layer_name: r.kind for r in kfs.plan(valid_gap_cnn()).rewrites}
    dense = {r.layer_name: r.kind for r in kfs.plan(valid_gap_cnn(), head="dense").rewrites}
    assert window["gap"] is kfs.RewriteKind.POOL_WINDOW and dense["gap"] is kfs.RewriteKind.POOLING_REMOVED


def test_the_printed_plan_is_unchanged():
    """The table as main printed it before rules became declarative."""
    assert str(kfs.plan(small_flatten_cnn())).splitlines() == [
        "flatten  Flatten         -> (removed)              keeps the 8x8x12 map",
        "fc1      Dense (768, 16) -> Conv2D (8, 8, 12, 16)  12,304 params  (8x8 valid)",
        "fc2      Dense (16, 5)   -> Conv2D (1, 1, 16, 5)   85 params  (1x1)",
    ]
    assert str(kfs.plan(valid_gap_cnn(), head="dense")).splitlines() == [
        "gap     GlobalAveragePooling2D -> (removed)             classifier at every position",
        "logits  Dense (16, 4)          -> Conv2D (1, 1, 16, 4)  68 params  (1x1)",
    ]


def test_the_surgeon_leaves_its_callers_context_alone():
    context = Context(layout=Layout("channels_last"), head="window")
    surgeon = engine.Surgeon(context)
    assert context.cloner is None and surgeon.context.cloner is not None


@pytest.mark.parametrize(("factory", "head", "passes"), [(small_flatten_cnn, "window", 1), (valid_gap_cnn, "dense", 2)])
def test_convert_plans_once(monkeypatch, factory, head, passes):
    """One planning pass; a dense head adds only the window twin that verification compares."""
    calls = []
    original = engine.Surgeon.plan

    def counting(self, model, *args, **kwargs):
        if model is source:
            calls.append(model.name)
        return original(self, model, *args, **kwargs)

    source = factory()
    monkeypatch.setattr(engine.Surgeon, "plan", counting)
    kfs.convert(source, head=head)
    assert len(calls) == passes
