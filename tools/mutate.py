"""Mutation testing of one module against the tests that exercise it (a small driver on `ast`).

Each mutant changes one thing in the module: an arithmetic operator (``+`` and
``-`` swapped, ``*`` and ``//`` swapped, ``/`` to ``*``, ``%`` to ``//``), a
comparison (``<`` and ``<=``, ``>`` and ``>=``, ``==`` and ``!=``), an integer
constant (plus or minus one) or a boolean operator (``and`` and ``or``).
Nothing inside an f-string (an error message) is mutated. The real files are
never edited: the package is copied to a temporary folder, each mutant is
written there, and the tests run with that copy first on ``PYTHONPATH``.

The test files run one at a time, ``--pure`` ones first (with ``--noconftest``:
no Keras start), then the others in the order given, each as
``pytest -x -q -n 0 -p no:cacheprovider FILE``; the mutant is killed by the
first that fails. A run longer than its limit (``--timeout``, or
three times the unmutated run plus 10 s) is killed and counts as a kill by
timeout: a *hang*, reported, since a planning loop should stop with an error
rather than run for ever.

    python tools/mutate.py keras_fcn_surgery/grid/tiling.py tests/test_tiling.py tests/test_masked_prediction.py
    python tools/mutate.py keras_fcn_surgery/grid/axis.py --pure tests/test_geometry_math.py --sample 40

Mutants known to be equivalent (no test can tell them from the module: see
``EQUIVALENT``, each with why) are left out of the score. Exit code: 0 when
the score is at least ``--goal`` percent and no mutant hangs, 1 otherwise.

Named cases (``CASES``) are bugs injected by hand, each a small source edit
of one file (a string replaced, found exactly once) and the key tests that
must see it; ``--case NAME`` (repeatable) or ``--case all`` runs them, each
against each of its key tests alone, and exits 1 when any key test passes
on its case (is blind to it). A case whose
source text is gone (the code was refactored) stops with a message saying
which: retarget it by editing its ``old`` and ``new`` strings.

    python tools/mutate.py --case all
    python tools/mutate.py --case region-row-past-end --case pair-swaps-h-w

Samples over the modules those cases live in (a few minutes each on 2 cores):

    python tools/mutate.py keras_fcn_surgery/grid/geometry.py tests/test_geometry.py --sample 6
    python tools/mutate.py keras_fcn_surgery/inference/windowed.py \
        tests/test_windowed.py::test_squeeze_and_excitation_net_equals_its_crops \
        tests/test_windowed.py::test_masks_skip_windows_and_the_shared_cells_they_do_not_read --sample 6
    python tools/mutate.py keras_fcn_surgery/batch/shards.py tests/test_shards.py::test_a_region_writes_only_its_rows \
        tests/test_shards.py::test_regions_are_bands_of_whole_chunk_rows_balanced_by_kept_cells \
        "tests/test_shards.py::test_sharded_outputs_are_the_bytes_of_the_local_outputs[classifier-masked]" --sample 6
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "keras_fcn_surgery"

BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Div: ast.Mult}
BINARY[ast.Mod] = ast.FloorDiv
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
BOOLEAN = {ast.And: ast.Or, ast.Or: ast.And}
SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.FloorDiv: "//",
    ast.Div: "/",
    ast.Mod: "%",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.And: "and",
    ast.Or: "or",
}

# Equivalent mutants: (module, the source line stripped, the column, the mutation) -> why no test can kill it.
TILING, STAGES = "keras_fcn_surgery/grid/tiling.py", "keras_fcn_surgery/grid/stages.py"
AXIS, KERNELS = "keras_fcn_surgery/grid/axis.py", "keras_fcn_surgery/surgery/kernels.py"
IDENTITY = "dense_to_conv_kernel: a shortcut only; transposing by the identity permutation gives the same kernel"
EQUIVALENT: dict[tuple[str, str, int, str], str] = {
    (TILING, "if step < 1:", 7, "`<` -> `<=`"): (
        "balanced_tile_length at step == 1: count = total - lost tiles, so needed = "
        "1 + lost * (total - lost) / (total - lost) = cells and it returns max(min_length, tile) = tile anyway"
    ),
    (TILING, "if step < 1:", 14, "1 -> 2"): "the same case as `<` -> `<=` (step == 1)",
    (TILING, "count = max(2, -(-(total - lost) // step))", 16, "2 -> 1"): (
        "reached only for an aligned tile < length: total >= cells + 1, so ceil((total - lost) / step) >= 2"
    ),
    (TILING, "if size < 1 or size - 2 * margin < period:", 7, "`or` -> `and`"): (
        "plan_pixels: size < 1 implies size - 2 * margin <= 0 < period (margin >= 0), so `or` and `and` agree"
    ),
    (TILING, "quantum: int = 1,", 19, "1 -> 0"): "crop_tile's default quantum: 0 becomes 1 in `max(1, quantum)`",
    (
        AXIS,
        "size = window_output_size(state.size, kernel, stride, dilation, padding) if state.size >= 1 else 0",
        94,
        "1 -> 0",
    ): "apply_window: window_output_size(0, ...) is 0 too (sizes are never negative)",
    (AXIS, "stride=maps[0].stride,", 20, "0 -> -1"): "merge: every map's stride is equal by then (else it raised)",
    (AXIS, "size=maps[0].size,", 18, "0 -> -1"): "merge: every map's size is equal by then (else it raised)",
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 23, "0 -> 1"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 23, "0 -> -1"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 26, "1 -> 2"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 26, "1 -> 0"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 29, "2 -> 3"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 29, "2 -> 1"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 32, "3 -> 4"): IDENTITY,
    (KERNELS, "if permutation == [0, 1, 2, 3]:", 32, "3 -> 2"): IDENTITY,
    (STAGES, "for j in range(1, count + 1):", 19, "1 -> 0"): "j = 0 has no i < 0: that pass does nothing",
    (STAGES, "best = [math.inf] * (count + 1)", 33, "1 -> 2"): "one more entry, never read",
    (STAGES, "previous = [-1] * (count + 1)", 31, "1 -> 2"): "one more entry, never read",
    (STAGES, "previous = [-1] * (count + 1)", 17, "1 -> 2"): (
        "the initial predecessor (-2 for -1) is read only at boundary 0, where the read-back stops, or for "
        "boundaries no chain reaches"
    ),
    (STAGES, "previous = [-1] * (count + 1)", 17, "1 -> 0"): "as above (-0 for -1)",
    (
        "keras_fcn_surgery/batch/shards.py",
        "if len(regions) + 1 < shards and cells and (before + cells) * shards >= total * (len(regions) + 1):",
        11,
        "`<` -> `<=`",
    ): (
        "cut_regions: a band closed as the last allowed one holds every kept cell left ((before + cells) * shards "
        ">= total * shards), so the rows after it keep none and join it again: the same regions"
    ),
}


@dataclass(frozen=True)
class Case:
    """A bug injected by hand: ``old`` replaced by ``new`` in ``module``; ``tests`` must fail on it."""

    module: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


SHARDS, WINDOWED, RUNNER = (
    "keras_fcn_surgery/batch/shards.py",
    "keras_fcn_surgery/inference/windowed.py",
    "keras_fcn_surgery/inference/runner.py",
)
SHARD_BYTES = "tests/test_shards.py::test_sharded_outputs_are_the_bytes_of_the_local_outputs"
WINDOWED_TESTS = "tests/test_windowed.py::"
# Non-square strides: where a row/column mix-up shows.
WIDE = (
    WINDOWED_TESTS + "test_batches_of_windows_of_any_size_give_the_same_map[8x4]",
    WINDOWED_TESTS + "test_a_prefix_map_larger_than_the_memory_budget_goes_to_disk[4x12]",
    WINDOWED_TESTS + "test_masks_skip_windows_and_the_shared_cells_they_do_not_read",
    "tests/test_windowed_batch.py::test_predict_images_writes_the_windowed_maps_of_classifiers_without_an_exact_fcn"
    "[se-4x8]",
)
CASES: dict[str, Case] = {
    "region-row-past-end": Case(
        SHARDS,
        "low, high = max(first, self.start), min(last, self.stop)",
        "low, high = max(first, self.start), min(last, self.stop + 1)",
        (SHARD_BYTES + "[classifier-masked]", SHARD_BYTES + "[windowed-masked]"),
        "RegionView writes one row past its region: hidden when regions run in order (the next one overwrites it)",
    ),
    "shared-map-column-at-row-stride": Case(
        WINDOWED,
        "j * plan.stride[1] // split.stride[1]",
        "j * plan.stride[0] // split.stride[1]",
        WIDE,
        "a window's column in the shared map from the row stride: the same at square strides",
    ),
    "strip-crop-column-at-row-stride": Case(
        WINDOWED,
        "top, left = i * plan.stride[0], j * plan.stride[1]",
        "top, left = i * plan.stride[0], j * plan.stride[0]",
        WIDE,
        "the strips' crops' left edge from the row stride: the same at square strides",
    ),
    "pair-swaps-h-w": Case(
        RUNNER,
        "return (int(values[0]), int(values[1]))",
        "return (int(values[1]), int(values[0]))",
        # Not through `predict_images`: the batch job stores the stride `check_stride` gives, and `predict_map`
        # pairs it again, so there the swap undoes itself (the maps are right).
        (*WIDE[:3], WINDOWED_TESTS + "test_squeeze_and_excitation_net_equals_its_crops[None-8x12]"),
        "the shared (h, w) helper swaps a stride or tile pair: `sliding_window_predict` shares it, the crops do not",
    ),
}


def run_cases(names: list[str], timeout: float | None) -> int:
    """Each named case against each of its key tests alone, in a copy of the package; 1 unless every key test
    fails on every case."""
    chosen = list(CASES) if names == ["all"] else names
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    blind = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as copy_root:
        shutil.copytree(
            os.path.join(ROOT, PACKAGE), os.path.join(copy_root, PACKAGE), ignore=shutil.ignore_patterns("__pycache__")
        )
        for name in chosen:
            case = CASES[name]
            target = os.path.join(copy_root, case.module)
            with open(target) as handle:
                source = handle.read()
            if source.count(case.old) != 1:
                raise SystemExit(
                    f"case {name}: {case.old!r} occurs {source.count(case.old)} times in {case.module} (once "
                    "expected): the code moved; retarget the case's `old` and `new` in tools/mutate.py"
                )
            print(f"{name} ({case.module}): {case.why}", flush=True)
            try:
                with open(target, "w") as handle:
                    handle.write(source.replace(case.old, case.new))
                for test in case.tests:
                    outcome, _, seconds = run_tests([(test, [])], copy_root, timeout)
                    print(f"  {'fails' if outcome != 'survived' else 'PASSES (blind)'}: {test} ({seconds:.1f} s)")
                    if outcome == "survived":
                        blind.append((name, test))
            finally:
                with open(target, "w") as handle:
                    handle.write(source)
    tests = sum(len(CASES[name].tests) for name in chosen)
    print(f"\n{len(chosen)} named cases, {tests - len(blind)} of {tests} key tests fail on them")
    for name, test in blind:
        print(f"  blind: {test} on {name}")
    return 1 if blind else 0


@dataclass
class Mutant:
    index: int  # position of the node in ast.walk order
    line: int
    column: int
    description: str
    source_line: str


@dataclass
class Result:
    mutant: Mutant
    outcome: str  # "killed", "timeout", "survived", "equivalent", "invalid"
    by: str = ""
    seconds: float = 0.0


def _in_fstring(tree: ast.AST) -> set[int]:
    """ids of the nodes inside f-strings (messages: not mutated)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside.update(id(child) for child in ast.walk(node))
    return inside


def _sites(node: ast.AST) -> list[tuple[str, object]]:
    """The mutations possible at one node: (description, how) pairs."""
    found: list[tuple[str, object]] = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINARY:
        new = BINARY[type(node.op)]
        found.append((f"`{SYMBOL[type(node.op)]}` -> `{SYMBOL[new]}`", ("op", new)))
    elif isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            if type(op) in COMPARE:
                new = COMPARE[type(op)]
                found.append((f"`{SYMBOL[type(op)]}` -> `{SYMBOL[new]}`", ("compare", position, new)))
    elif isinstance(node, ast.BoolOp):
        new = BOOLEAN[type(node.op)]
        found.append((f"`{SYMBOL[type(node.op)]}` -> `{SYMBOL[new]}`", ("op", new)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        for delta in (1, -1):
            found.append((f"{node.value} -> {node.value + delta}", ("constant", node.value + delta)))
    return found


def mutants(source: str) -> list[tuple[Mutant, object]]:
    tree = ast.parse(source)
    skip = _in_fstring(tree)
    lines = source.splitlines()
    found = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for description, how in _sites(node):
            line = getattr(node, "lineno", 0)
            found.append((Mutant(index, line, node.col_offset, description, lines[line - 1].strip()), how))
    return found


def mutated_source(source: str, mutant: Mutant, how) -> str:
    tree = ast.parse(source)
    node = list(ast.walk(tree))[mutant.index]
    kind = how[0]
    if kind == "op":
        node.op = how[1]()
    elif kind == "compare":
        node.ops[how[1]] = how[2]()
    else:
        node.value = how[1]
    return ast.unparse(tree)


def run_tests(test_files, copy_root: str, timeout: float | None) -> tuple[str, str, float]:
    """(outcome, by what, seconds): outcome "killed", "timeout" or "survived" (every file passed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([copy_root, os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.monotonic()
    for test, pytest_args in test_files:
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider"]
        command += ["--hypothesis-seed=0", "--rootdir", ROOT, "-c", os.path.join(ROOT, "setup.cfg")]
        command += list(pytest_args) + [os.path.join(ROOT, test) if "::" not in test else _absolute_node(test)]
        # cwd: the copy's folder, so that Hypothesis keeps its example database there, not in the checkout.
        process = subprocess.Popen(
            command,
            cwd=copy_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return "timeout", test, time.monotonic() - started
        if process.returncode == 5:  # no test collected: a wrong path or selection
            raise SystemExit(f"{test}: no tests collected\n{output.decode(errors='replace')[-2000:]}")
        if process.returncode != 0:
            return "killed", test, time.monotonic() - started
    return "survived", "", time.monotonic() - started


def _absolute_node(test: str) -> str:
    path, _, rest = test.partition("::")
    return os.path.join(ROOT, path) + "::" + rest


def evenly(items: list, count: int | None) -> list:
    """``count`` items spread evenly over the list (all of them when count is None or larger)."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="the module to mutate, e.g. keras_fcn_surgery/grid/tiling.py")
    parser.add_argument("tests", nargs="*", help="test files (or node ids), fastest first, run after --pure ones")
    parser.add_argument("--sample", type=int, help="run only N mutants spread evenly through the module")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3x the unmutated run + 10)")
    parser.add_argument(
        "--pure", action="append", default=[], help="a test file that needs no conftest (run first, --noconftest)"
    )
    parser.add_argument("--lines", help="only mutants on these lines, e.g. 120-160")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--goal", type=float, default=95.0, help="percent to reach (exit code)")
    parser.add_argument(
        "--case", action="append", default=[], help=f"a named injected bug ({', '.join(CASES)}), or all"
    )
    args = parser.parse_intermixed_args(argv)
    if args.case:
        if args.module or args.tests:
            parser.error("--case runs each case against its own key tests: give no module or tests")
        return run_cases(args.case, args.timeout)
    if args.module is None:
        parser.error("give a module to mutate, or --case")

    module = os.path.relpath(os.path.abspath(args.module), ROOT)
    if not module.startswith(PACKAGE + os.sep):
        parser.error(f"the module must lie in {PACKAGE}/: {args.module}")
    with open(os.path.join(ROOT, module)) as handle:
        source = handle.read()
    found = mutants(source)
    if args.lines:
        low, _, high = args.lines.partition("-")
        found = [(m, how) for m, how in found if int(low) <= m.line <= int(high or low)]
    chosen = evenly(found, args.sample)
    if args.list:
        for mutant, _ in chosen:
            print(f"{module}:{mutant.line}:{mutant.column}  {mutant.description:<14} {mutant.source_line}")
        return 0
    if not args.pure and not args.tests:
        parser.error("give at least one test file")
    tests = [(test, ["--noconftest"]) for test in args.pure] + [(test, []) for test in args.tests]

    with tempfile.TemporaryDirectory(prefix="mutate-") as copy_root:
        shutil.copytree(
            os.path.join(ROOT, PACKAGE), os.path.join(copy_root, PACKAGE), ignore=shutil.ignore_patterns("__pycache__")
        )
        target = os.path.join(copy_root, module)
        check = subprocess.run(
            [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
            env=dict(os.environ, PYTHONPATH=copy_root),
            capture_output=True,
            text=True,
            cwd=copy_root,
        )
        if not check.stdout.startswith(copy_root):
            raise SystemExit(f"the copy is not the package imported: {check.stdout or check.stderr}")
        outcome, by, seconds = run_tests(tests, copy_root, None)
        if outcome != "survived":
            raise SystemExit(f"the tests fail on the unmutated module ({by}): fix them first")
        timeout = args.timeout or 3 * seconds + 10
        print(
            f"{module}: {len(found)} mutants, running {len(chosen)}; unmutated tests {seconds:.1f} s, "
            f"limit {timeout:.0f} s per mutant",
            flush=True,
        )

        results: list[Result] = []
        for number, (mutant, how) in enumerate(chosen, 1):
            why = EQUIVALENT.get((module, mutant.source_line, mutant.column, mutant.description))
            if why:
                results.append(Result(mutant, "equivalent", why))
                continue
            try:
                text = mutated_source(source, mutant, how)
                compile(text, target, "exec")
            except (SyntaxError, ValueError):
                results.append(Result(mutant, "invalid"))
                continue
            try:
                with open(target, "w") as handle:
                    handle.write(text)
                outcome, by, seconds = run_tests(tests, copy_root, timeout)
            finally:
                with open(target, "w") as handle:
                    handle.write(source)
            results.append(Result(mutant, outcome, by, seconds))
            mark = {"killed": ".", "timeout": "T", "survived": "S"}[outcome]
            print(
                f"[{number}/{len(chosen)}] {mark} {module}:{mutant.line} {mutant.description} ({seconds:.1f} s)",
                flush=True,
            )
    return report(module, results, args.goal)


def report(module: str, results: list[Result], goal: float) -> int:
    counted = [r for r in results if r.outcome in ("killed", "timeout", "survived")]
    killed = [r for r in counted if r.outcome != "survived"]
    score = 100.0 * len(killed) / len(counted) if counted else 100.0
    hangs = [r for r in results if r.outcome == "timeout"]
    print(f"\n{module}: score {score:.1f}% ({len(killed)} killed of {len(counted)}; equivalents left out)")
    for label, outcome in (("equivalent (left out)", "equivalent"), ("survivors", "survived"), ("hangs", "timeout")):
        rows = [r for r in results if r.outcome == outcome]
        print(f"{label}: {len(rows)}")
        for r in rows:
            extra = f"  -- {r.by}" if outcome == "equivalent" else ""
            print(f"  {module}:{r.mutant.line}  {r.mutant.description:<14} {r.mutant.source_line}{extra}")
    invalid = sum(r.outcome == "invalid" for r in results)
    if invalid:
        print(f"invalid (not compiled): {invalid}")
    return 0 if score >= goal and not hangs else 1


if __name__ == "__main__":
    sys.exit(main())
