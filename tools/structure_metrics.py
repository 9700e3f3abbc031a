"""Structure figures of the package, read from its source with `ast` (issue 35's before/after table).

Prints: the 5 widest public functions (parameters), ``x=x`` keyword
pass-throughs, places that route a map's method, batch-and-scatter loops,
process-wide caches, import cycles, function-level imports of the package's
own modules, and the lines of ``inference/`` and ``batch/``.

Run from a checkout (any commit)::

    python tools/structure_metrics.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import collections
import pathlib
import sys

PACKAGE_NAME = "keras_fcn_surgery"
# Calls that decide a map's method (the FCN or the windowed map).
ROUTING_CALLS = {"route", "choose_method", "_is_windowed", "_route"}
# Names of a forward pass called inside a loop over batches.
FORWARD_NAMES = {"forward", "forward_for", "_forward"}
CACHE_TYPES = {"WeakKeyDictionary", "WeakValueDictionary", "dict"}


def modules(root: pathlib.Path):
    for path in sorted(root.rglob("*.py")):
        name = ".".join((PACKAGE_NAME, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _imported(node, module: str, is_package: bool) -> list[str]:
    """The package modules an import statement names (``from a import b`` may name module ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith(PACKAGE_NAME)]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(PACKAGE_NAME):
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _function_level(tree) -> set[int]:
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    inner.add(id(child))
    return inner


def _type_checking(tree) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(c) for c in ast.walk(node)}
    return skipped


def import_graph(parsed, *, with_function_level: bool) -> dict[str, set[str]]:
    names = {name for name, _, _ in parsed}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path, tree in parsed:
        inner, skipped = _function_level(tree), _type_checking(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            if id(node) in inner and not with_function_level:
                continue
            for target in _imported(node, name, path.name == "__init__.py"):
                if target in names and target != name and target != PACKAGE_NAME:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def widest_functions(parsed, count: int = 5) -> list[tuple[int, str]]:
    found = []
    for name, _, tree in parsed:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                args = node.args
                every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                params = [a.arg for a in every if a.arg not in ("self", "cls")]
                found.append((len(params), f"{name.removeprefix(PACKAGE_NAME + '.')}.{node.name}"))
    return sorted(found, reverse=True)[:count]


def pass_throughs(parsed) -> tuple[int, collections.Counter]:
    names: collections.Counter = collections.Counter()
    for _, _, tree in parsed:
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and isinstance(node.value, ast.Name) and node.value.id == node.arg:
                names[node.arg] += 1
    return sum(names.values()), names


def routing_places(parsed) -> list[str]:
    found = []
    for name, _, tree in parsed:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ROUTING_CALLS:
                    found.append(f"{name.removeprefix(PACKAGE_NAME + '.')}:{node.lineno} {called}")
    return found


def scatter_loops(parsed) -> list[str]:
    """Loops that call a forward pass (``forward(...)``, ``engines.forward(m, e)(x)``) in their body."""
    found = []
    for name, _, tree in parsed:
        for node in ast.walk(tree):
            if not isinstance(node, (ast.For, ast.While)):
                continue
            for child in ast.walk(node):
                if not isinstance(child, ast.Call):
                    continue
                func = child.func
                direct = isinstance(func, ast.Name) and func.id in FORWARD_NAMES
                chained = isinstance(func, ast.Call) and ast.unparse(func.func).split(".")[-1] in FORWARD_NAMES
                if direct or chained:
                    found.append(f"{name.removeprefix(PACKAGE_NAME + '.')}:{node.lineno}")
                    break
    # nested loops count once: keep the outermost per function
    return _outermost(found, parsed)


def _outermost(found: list[str], parsed) -> list[str]:
    spans = {}
    for name, _, tree in parsed:
        for node in ast.walk(tree):
            if isinstance(node, (ast.For, ast.While)):
                spans[f"{name.removeprefix(PACKAGE_NAME + '.')}:{node.lineno}"] = (name, node.lineno, node.end_lineno)
    kept = []
    for key in found:
        module, start, end = spans[key]
        inside = any(
            other != key and spans[other][0] == module and spans[other][1] < start and spans[other][2] >= end
            for other in found
        )
        if not inside:
            kept.append(key)
    return kept


def process_caches(parsed) -> list[str]:
    found = []
    for name, _, tree in parsed:
        for node in tree.body:
            if not isinstance(node, (ast.Assign, ast.AnnAssign)):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            is_cache = (isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in CACHE_TYPES) or (
                isinstance(value, ast.Dict) and not value.keys
            )
            if is_cache:
                found += [f"{name.removeprefix(PACKAGE_NAME + '.')}.{ast.unparse(t)}" for t in targets]
    return found


def function_level_imports(parsed, under: tuple[str, ...] = ()) -> int:
    total = 0
    for name, path, tree in parsed:
        if under and not any(name.startswith(f"{PACKAGE_NAME}.{u}") for u in under):
            continue
        inner = _function_level(tree)
        for node in ast.walk(tree):
            if id(node) in inner and _imported(node, name, path.name == "__init__.py"):
                total += 1
    return total


def lines(root: pathlib.Path, folder: str) -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (root / folder).rglob("*.py"))


def main() -> None:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent / PACKAGE_NAME)
    parsed = list(modules(root))
    print("widest public functions:", ", ".join(f"{n} {p}" for p, n in widest_functions(parsed)))
    total, names = pass_throughs(parsed)
    print(f"x=x pass-throughs: {total} ({len(names)} names; most: {names.most_common(5)})")
    routes = routing_places(parsed)
    print(f"places that route a method: {len(routes)} ({', '.join(routes)})")
    loops = scatter_loops(parsed)
    print(f"batch-and-scatter loops (a forward pass in a loop): {len(loops)} ({', '.join(loops)})")
    caches = process_caches(parsed)
    print(f"process-wide caches (module-level dicts): {len(caches)} ({', '.join(caches)})")
    strict = cycles(import_graph(parsed, with_function_level=False))
    lazy = cycles(import_graph(parsed, with_function_level=True))
    print(f"import cycles, module-level imports: {len(strict)} {strict}")
    print(f"import cycles, with function-level imports: {len(lazy)} {[len(c) for c in lazy]} modules")
    print(
        f"function-level package imports: {function_level_imports(parsed)} "
        f"(inference/ and batch/: {function_level_imports(parsed, ('inference', 'batch'))})"
    )
    print(f"lines: inference/ {lines(root, 'inference')}, batch/ {lines(root, 'batch')}")


if __name__ == "__main__":
    main()
