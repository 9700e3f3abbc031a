"""Structure figures of the package, read from its source with `ast` (issue 35's before/after table).

Prints: the 5 widest public functions (parameters), ``x=x`` keyword
pass-throughs, places that route a map's method, batch-and-scatter loops,
process-wide caches, import cycles, function-level imports of the package's
own modules, classes that describe a map's grid or a model's image, public
names, and the lines of ``inference/`` and ``batch/``. Where a figure is one
that tests/test_architecture.py guards, it is counted by that test's own check
(imported from it), so the figures and the guards cannot disagree.

Run from a checkout, on this or any other commit's package::

    python tools/structure_metrics.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import collections
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import test_architecture as guards  # noqa: E402

PACKAGE_NAME = "keras_fcn_surgery"


def modules(root: pathlib.Path):
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        yield relative, guards._module_name(relative), ast.parse(path.read_text(encoding="utf-8"))


def widest_functions(parsed, count: int = 5) -> list[tuple[int, str]]:
    found = [
        (width, f"{name.removeprefix(PACKAGE_NAME + '.')}.{function}")
        for _, name, tree in parsed
        for width, function in guards.public_function_widths(tree)
    ]
    return sorted(found, reverse=True)[:count]


def pass_throughs(parsed) -> tuple[int, collections.Counter]:
    names: collections.Counter = collections.Counter()
    for _, _, tree in parsed:
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and isinstance(node.value, ast.Name) and node.value.id == node.arg:
                names[node.arg] += 1
    return sum(names.values()), names


def per_module(parsed, check) -> list[str]:
    """``module: finding`` of a guard's check over every module."""
    return [f"{relative}: {found}" for relative, _, tree in parsed for found in check(tree)]


def public_names(root: pathlib.Path) -> int:
    tree = ast.parse((root / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("_PUBLIC", "__all__") for t in node.targets):
            try:
                return len(ast.literal_eval(node.value))
            except ValueError:
                continue
    return 0


def lines(root: pathlib.Path, folder: str) -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (root / folder).rglob("*.py"))


def main() -> None:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent / PACKAGE_NAME)
    parsed = list(modules(root))
    trees = {relative: tree for relative, _, tree in parsed}
    print("widest public functions:", ", ".join(f"{n} {p}" for p, n in widest_functions(parsed)))
    total, names = pass_throughs(parsed)
    print(f"x=x pass-throughs: {total} ({len(names)} names; most: {names.most_common(5)})")
    routes = per_module(parsed, guards.routing_calls)
    print(f"places that route a method: {len(routes)} ({'; '.join(routes)})")
    loops = per_module(parsed, guards.batch_and_scatter_loops)
    print(f"batch-and-scatter loops: {len(loops)} ({'; '.join(loops)})")
    caches = guards.process_caches(trees)
    print(f"process-wide caches (module-level tables written at run time): {len(caches)} ({'; '.join(caches)})")
    strict = guards.import_cycles(trees, function_level=False)
    lazy = guards.import_cycles(trees, function_level=True)
    print(f"import cycles, module-level imports: {len(strict)} {strict}")
    print(f"import cycles, with function-level imports: {len(lazy)} {lazy}")
    inner = {
        found.split(": ")[0] + ": " + found.split(": ")[1]
        for found in per_module(parsed, guards.function_level_imports)
    }
    eager = [line for line in inner if line.startswith(guards.EAGER_FOLDERS)]  # one per import statement
    print(f"function-level package imports: {len(inner)} (inference/ and batch/: {len(eager)})")
    grids = per_module(parsed, guards.grid_descriptions) + per_module(parsed, guards.image_spec_descriptions)
    print(f"classes describing a map's grid or a model's image: {len(grids)} ({'; '.join(grids)})")
    print(f"public names: {public_names(root)}")
    print(f"lines: inference/ {lines(root, 'inference')}, batch/ {lines(root, 'batch')}")


if __name__ == "__main__":
    main()
