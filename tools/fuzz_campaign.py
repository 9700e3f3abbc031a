"""A long fuzz campaign: many generated CNNs, every outcome counted, going on past failures.

Runs the property of ``tests/test_fuzz.py`` (same generator, same check) on
``--examples`` models, each with both heads, without shrinking, and prints
how many converted, how many were refused with a `ConversionError` (by
reason), and every failure. Each failing architecture is written as a Python
file (``build_model()``) under ``--failures``.

    python tools/fuzz_campaign.py --examples 600 --seed 6 --failures fuzz_failures

Exit code: 0 when no model broke the property, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from architectures import Act, Conv, OpNode, Residual, architectures  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from test_fuzz import check_conversion  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402


def run_campaign(examples: int, campaign_seed: int, failures_dir: str | None) -> dict:
    outcomes: collections.Counter = collections.Counter()
    coverage: collections.Counter = collections.Counter()
    failures: list[tuple[str, str, str]] = []
    models = [0]

    @seed(campaign_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(arch=architectures())
    def campaign(arch):
        models[0] += 1
        coverage.update(features(arch))
        for head in kfs.HEADS:
            try:
                outcome = check_conversion(arch, head)
            except Exception as error:  # noqa: BLE001 - every failure is recorded, none stops the campaign
                outcome = f"FAILURE {type(error).__name__}"
                failures.append((head, arch.to_code(), traceback.format_exc()))
            outcomes[(head, outcome)] += 1

    started = time.perf_counter()
    campaign()
    elapsed = time.perf_counter() - started
    if failures_dir and failures:
        os.makedirs(failures_dir, exist_ok=True)
        for index, (head, code, trace) in enumerate(failures):
            with open(os.path.join(failures_dir, f"failure_{index:03d}_{head}.py"), "w", encoding="utf-8") as handle:
                handle.write(code)
                handle.write(f"\n# head={head!r}\n")
                handle.write("".join(f"# {line}\n" for line in trace.splitlines()))
    return {"models": models[0], "outcomes": outcomes, "coverage": coverage, "failures": failures, "seconds": elapsed}


def features(arch) -> set[str]:
    """What a generated architecture exercises, for the coverage summary."""
    found = {arch.data_format, f"outer {arch.outer}", f"head {arch.head.kind}", f"policy {arch.policy or 'float32'}"}
    found |= {
        name
        for name, present in (
            ("nested body", arch.nest_body),
            ("nested head", arch.nest_head),
            ("wrapped", arch.wrap),
            ("keepdims", arch.head.keepdims),
            ("permute before flatten", arch.head.permute is not None),
            ("head PReLU", any(dense.prelu for dense in arch.head.dense)),
            ("second output", arch.second_output > 0),
            ("adapted Normalization", arch.normalization),
            ("underscore names", arch.underscore),
        )
        if present
    }
    if arch.subclass is not None:
        found.add(f"subclassed {arch.subclass}")
    found |= {f"head op {kind}" for kind in arch.head.ops}
    found |= {f"augmentation {kind}" for kind in arch.augment}
    stack = list(arch.body)
    while stack:
        layer = stack.pop()
        if isinstance(layer, Residual):
            found.add(f"residual {layer.merge}")
            stack.extend(inner for branch in layer.branches for inner in branch)
        elif isinstance(layer, Conv):
            found |= {layer.kind, f"padding {layer.padding}"}
            if max(layer.strides) > 1:
                found.add("strided")
            if max(layer.dilation) > 1:
                found.add("dilated")
        elif isinstance(layer, OpNode):
            found.add(f"op {layer.kind}")
        else:
            found.add(type(layer).__name__ if not isinstance(layer, Act) else f"Act {layer.name}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=600, help="generated models (each tried with both heads)")
    parser.add_argument("--seed", type=int, default=6, help="hypothesis seed of the campaign")
    parser.add_argument("--failures", default=None, help="folder for the code of failing architectures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Keras's "softmax over an axis of size 1" and the like, once per model
    report = run_campaign(args.examples, args.seed, args.failures)
    outcomes = report["outcomes"]
    print(f"{report['models']} models x {len(kfs.HEADS)} heads in {report['seconds']:.0f} s (seed {args.seed})")
    for head in kfs.HEADS:
        rows = sorted(((count, outcome) for (h, outcome), count in outcomes.items() if h == head), reverse=True)
        print(f"head={head!r}: {sum(count for count, _ in rows)} conversions")
        for count, outcome in rows:
            print(f"  {count:5d}  {outcome}")
    coverage = report["coverage"]
    print("models exercising: " + ", ".join(f"{name} {count}" for name, count in sorted(coverage.items())))
    print(f"failures: {len(report['failures'])}")
    for head, _, trace in report["failures"][:20]:
        print(f"--- head={head!r}\n{trace.strip().splitlines()[-1]}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
