"""The README's demo command."""

from keras_fcn_surgery.cli import main


def test_demo_prints_plan_verification_and_the_8x8_map(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "fc6      Dense (9216, 4096) -> Conv2D (6, 6, 256, 4096)   37,752,832 params" in out
    assert ": equal" in out
    assert "451x451 input -> 8x8 map of 1000 classes" in out
