"""The package's seams, read from its source: what ARCHITECTURE.md promises, each rule a test.

- Keras internals (``keras.src``, ``_keras_history``, node ``arguments`` and the
  private node lists) are touched in ``graph.py`` only.
- ``data_format`` strings are compared in ``layout.py`` only (elsewhere a
  `Layout` says ``channels_last``/``channels_first``).
- No package module imports the public facade (``import keras_fcn_surgery``,
  ``from keras_fcn_surgery import <public name>``), except the CLI's commands,
  which are its users.
- ``_PUBLIC``, ``__all__`` and the type-checking imports of ``__init__.py``
  name the same things, from the same modules.
- Lists of layer kinds live in ``taxonomy.py`` only.
- No process-wide cache: no module-level table (a dict, ``WeakKeyDictionary``...)
  is written at run time; what the package learns about a model is kept on it
  (`graph.model_facts`), and the one cache across processes is a file.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_fcn_surgery"
KERAS_INTERNALS = {"_keras_history", "_nodes_by_depth", "_inbound_nodes", "_outbound_nodes", "arguments"}
FACADE_USERS = ("commands/", "cli.py")
LAYOUT_WORDS = {"channels_last", "channels_first"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def keras_internals(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src"):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("keras.src")]
        elif isinstance(node, ast.Attribute) and node.attr in KERAS_INTERNALS:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("keras.src"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def layout_comparisons(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        parts = [node.left, *node.comparators]
        words = {n.value for p in parts for n in ast.walk(p) if isinstance(n, ast.Constant)} & LAYOUT_WORDS
        formats = [
            n
            for p in parts
            for n in ast.walk(p)
            if (isinstance(n, ast.Attribute) and n.attr == "data_format")
            or (isinstance(n, ast.Name) and n.id == "data_format")
            or (isinstance(n, ast.Call) and ast.unparse(n.func).endswith("data_format"))
        ]
        if words or formats:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def facade_imports(tree, public: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name == "keras_fcn_surgery"]
        elif isinstance(node, ast.ImportFrom) and node.module == "keras_fcn_surgery" and node.level == 0:
            names = [a.name for a in node.names if a.name in public]
            found += [f"line {node.lineno}: from keras_fcn_surgery import {name}" for name in names]
    return found


def layer_kind_lists(tree) -> list[str]:
    """Literal tuples, lists and sets of two or more ``layers.X`` classes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
            if all(isinstance(e, ast.Attribute) and ast.unparse(e.value).endswith("layers") for e in node.elts):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def layer_kind_tests(tree) -> list[str]:
    """``isinstance``/``issubclass`` on, or ``type(x) is``, a ``layers.X`` class other than ``Layer`` itself: what
    kind a layer is is the taxonomy's to say (issue 35: one place per kind)."""
    found = []

    def named(node) -> list[str]:
        parts = node.elts if isinstance(node, ast.Tuple) else [node]
        return [
            ast.unparse(p)
            for p in parts
            if isinstance(p, ast.Attribute) and ast.unparse(p.value).endswith("layers") and p.attr != "Layer"
        ]

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
            if len(node.args) == 2 and named(node.args[1]):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            if any(named(c) for c in node.comparators):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _public_names() -> set[str]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_PUBLIC" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("__init__.py defines no _PUBLIC")


def _offenders(check, allowed) -> dict[str, list[str]]:
    return {name: found for name, tree in _modules() if not allowed(name) and (found := check(tree))}


def test_only_graph_touches_keras_internals():
    assert _offenders(keras_internals, lambda name: name == "graph.py") == {}


def test_only_layout_compares_data_format_strings():
    assert _offenders(layout_comparisons, lambda name: name == "layout.py") == {}


def test_no_package_module_imports_the_facade():
    public = _public_names()
    allowed = lambda name: name == "__init__.py" or name.startswith(FACADE_USERS)  # noqa: E731
    assert _offenders(lambda tree: facade_imports(tree, public), allowed) == {}


def test_layer_kinds_are_listed_in_the_taxonomy_only():
    assert _offenders(layer_kind_lists, lambda name: name == "taxonomy.py") == {}


def test_what_kind_a_layer_is_is_asked_of_the_taxonomy_only():
    assert _offenders(layer_kind_tests, lambda name: name == "taxonomy.py") == {}


def public_api_disagreements(source: str) -> list[str]:
    """Where ``_PUBLIC``, ``__all__`` and the TYPE_CHECKING imports of a facade's source disagree."""
    public, listed, typed = {}, set(), {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            target = ast.unparse(node.targets[0])
            if target == "_PUBLIC":
                public = ast.literal_eval(node.value)
            elif target == "__all__":
                listed = set(ast.literal_eval(node.value))
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    for alias in statement.names:
                        typed[alias.name] = (statement.module or "").removeprefix("keras_fcn_surgery.")
    problems = [f"in _PUBLIC, not in __all__: {name}" for name in sorted(set(public) - listed)]
    problems += [f"in __all__, not in _PUBLIC: {name}" for name in sorted(listed - set(public))]
    problems += [f"in _PUBLIC, not imported for type checking: {name}" for name in sorted(set(public) - set(typed))]
    problems += [f"imported for type checking, not in _PUBLIC: {name}" for name in sorted(set(typed) - set(public))]
    problems += [
        f"{name}: _PUBLIC says {public[name]}, the type-checking import {module}"
        for name, module in sorted(typed.items())
        if name in public and public[name] != module
    ]
    return problems


def test_public_names_all_and_type_checking_imports_agree():
    assert public_api_disagreements((PACKAGE / "__init__.py").read_text(encoding="utf-8")) == []


def test_public_api_check_finds_each_disagreement():
    source = (
        "_PUBLIC = {'convert': 'surgery.convert', 'geometry': 'grid.geometry', 'plan': 'surgery.convert'}\n"
        "__all__ = ['convert', 'geometry', 'verify']\n"
        "if TYPE_CHECKING:\n"
        "    from keras_fcn_surgery.surgery.convert import convert\n"
        "    from keras_fcn_surgery.grid.other import geometry\n"
    )
    assert public_api_disagreements(source) == [
        "in _PUBLIC, not in __all__: plan",
        "in __all__, not in _PUBLIC: verify",
        "in _PUBLIC, not imported for type checking: plan",
        "geometry: _PUBLIC says grid.geometry, the type-checking import grid.other",
    ]


@pytest.mark.parametrize(
    ("check", "source"),
    [
        (keras_internals, "from keras.src.ops.node import Node\n"),
        (keras_internals, "history = tensor._keras_history\n"),
        (keras_internals, "first = node.arguments.args[0]\n"),
        (layout_comparisons, "if layer.data_format == 'channels_last':\n    pass\n"),
        (layout_comparisons, "flag = spatial_data_format(model) != layout.data_format\n"),
        (lambda tree: facade_imports(tree, {"predict_map"}), "import keras_fcn_surgery as kfs\n"),
        (lambda tree: facade_imports(tree, {"predict_map"}), "from keras_fcn_surgery import predict_map\n"),
        (layer_kind_lists, "KINDS = (keras.layers.Conv2D, layers.Dense)\n"),
        (layer_kind_tests, "if isinstance(layer, keras.layers.Softmax):\n    pass\n"),
        (layer_kind_tests, "dense = isinstance(layer, (taxonomy.DENSE, layers.EinsumDense))\n"),
        (layer_kind_tests, "plain = type(layer) is keras.layers.Conv2D\n"),
    ],
)
def test_each_check_finds_what_it_forbids(check, source):
    assert check(ast.parse(source))


def test_checks_leave_allowed_code_alone():
    allowed = (
        "from keras_fcn_surgery import taxonomy\n"
        "layer = keras.layers.Conv2D(3, 1, data_format=layout.data_format)\n"
        "if layout.channels_last:\n    pass\n"
        "kinds = taxonomy.POOLINGS\n"
        "any_layer = isinstance(layer, keras.layers.Layer)\n"
        "plain = isinstance(layer, taxonomy.PLAIN_CONVOLUTIONS)\n"
    )
    tree = ast.parse(allowed)
    assert not keras_internals(tree) and not layout_comparisons(tree)
    assert not facade_imports(tree, {"predict_map"}) and not layer_kind_lists(tree) and not layer_kind_tests(tree)


def named_layer_kinds(tree) -> list[str]:
    """References to layer classes (``layers.X``) or to the taxonomy's lists."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value).endswith("layers"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and "taxonomy" in ast.unparse(node):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_surgery_engine_knows_no_layer():
    tree = ast.parse((PACKAGE / "surgery" / "engine.py").read_text(encoding="utf-8"))
    assert named_layer_kinds(tree) == []
    assert named_layer_kinds(ast.parse("if isinstance(layer, keras.layers.Reshape):\n    pass\n"))


# --- issue 35: the inference and batch half -------------------------------------------------------------------------

# Folders whose modules import the package's own modules at module level only (the CLI's commands/ and
# `__init__.py` stay lazy by design: `import keras_fcn_surgery` and quick CLI answers do not start TensorFlow).
EAGER_FOLDERS = ("inference/", "batch/")
# Function-level imports of the package allowed there: none.
LAZY_ALLOWED: set[tuple[str, str]] = set()
# The calls that choose a map's method, and the one module that may make them (`windowed.route` calls
# `choose_method`, the rule itself).
ROUTING = {"route", "choose_method"}
ROUTERS = {"inference/mapper.py": {"route"}, "inference/windowed.py": {"choose_method"}}


# The one execution loop (`runner.run_batches`), and the one other loop that calls forward passes and stores
# what they give: `engines.time_engines` times candidate executions on one random input and keeps timings, no map.
ONE_LOOP = {("inference/runner.py", "run_batches"), ("inference/engines.py", "time_engines")}
FORWARD_METHODS = {"predict", "predict_on_batch"}


# A plan's private fields (what runs it), each read and set only by the module that plans it: other modules see a
# plan's public description (`staged.stage_calls` hands the engine choice what it needs).
PLAN_PRIVATE_FIELDS = {
    "_runs": "inference/staged.py",
    "_split": "inference/windowed.py",
    "_bands": "inference/windowed.py",
    "_analysis": "inference/windowed.py",
}


def _module_name(relative: str) -> str:
    return "keras_fcn_surgery." + relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _imports(tree, name: str, *, function_level: bool):
    """``(node, imported module)`` of the package's own modules, at module level or inside functions."""
    inside = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.walk(node)
    }
    skipped = {id(c) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
               for c in ast.walk(n)}  # fmt: skip
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
            continue
        if (id(node) in inside) != function_level:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            if target.startswith("keras_fcn_surgery") and target != "keras_fcn_surgery" and target != name:
                yield node, target


def function_level_imports(tree, name: str = "") -> list[str]:
    return sorted({f"line {node.lineno}: {target}" for node, target in _imports(tree, name, function_level=True)})


def import_cycles(trees: dict[str, ast.Module], *, function_level: bool) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected, more than one), by module name."""
    names = {_module_name(relative): tree for relative, tree in trees.items()}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, tree in names.items():
        for level in (False, True) if function_level else (False,):
            graph[name] |= {t for _, t in _imports(tree, name, function_level=level) if t in names}
    order, low, stack, found = {}, {}, [], []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return found


def routing_calls(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ROUTING:
                found.append(f"line {node.lineno}: {called}")
    return found


def test_no_import_cycle_in_the_package():
    assert import_cycles(dict(_modules()), function_level=False) == []


def test_no_import_cycle_in_inference_and_batch_even_through_function_level_imports():
    trees = {name: tree for name, tree in _modules() if name.startswith(EAGER_FOLDERS)}
    for name, module in LAZY_ALLOWED:  # the one lazy import, named above, is left out
        trees[name] = ast.parse(
            "\n".join(
                line
                for line in (PACKAGE / name).read_text(encoding="utf-8").splitlines()
                if module not in line or not line.startswith(" ")
            )
        )
    assert import_cycles(trees, function_level=True) == []


def test_inference_and_batch_import_the_package_at_module_level():
    found = {}
    for name, tree in _modules():
        if name.startswith(EAGER_FOLDERS):
            lazy = [
                line
                for line in function_level_imports(tree)
                if not any(name == n and line.split(": ")[1].startswith(m) for n, m in LAZY_ALLOWED)
            ]
            if lazy:
                found[name] = lazy
    assert found == {}


def _own_nodes(statements):
    """The nodes of ``statements``, not entering the functions, lambdas and classes defined there."""
    stack = list(statements)
    while stack:
        node = stack.pop()
        yield node
        nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
        stack += [child for child in ast.iter_child_nodes(node) if not isinstance(child, nested)]


def _is_forward_pass(node) -> bool:
    """A call of a forward pass: ``forward(x)``, ``engines.forward(m, e)(x)``, ``model.predict(x)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Call):
        inner = func.func
        return (inner.attr if isinstance(inner, ast.Attribute) else getattr(inner, "id", "")) == "forward"
    if isinstance(func, ast.Attribute):
        return func.attr in FORWARD_METHODS
    return isinstance(func, ast.Name) and func.id == "forward"


def _writes(node) -> bool:
    """A store into a subscript, a list's ``append``/``extend``, or a forward pass's result handed to a call."""
    if isinstance(node, ast.Assign):
        return any(isinstance(target, ast.Subscript) for target in node.targets)
    if isinstance(node, ast.AugAssign):
        return isinstance(node.target, ast.Subscript)
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute) and node.func.attr in {"append", "extend"}:
            return True
        return not _is_forward_pass(node) and any(_is_forward_pass(argument) for argument in node.args)
    return False


def batch_and_scatter_loops(tree) -> list[str]:
    """``function: line``s of the batch-and-scatter loops of a module.

    Such a loop is a ``for`` or ``while`` whose own body (not the functions
    defined in it) both calls a forward pass (`_is_forward_pass`) and writes
    (`_writes`).
    """
    found = []

    def visit(node, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, (ast.For, ast.AsyncFor, ast.While)):
                own = list(_own_nodes(child.body + child.orelse))
                if any(map(_is_forward_pass, own)) and any(map(_writes, own)):
                    found.append(f"{name}: line {child.lineno}")
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_every_batch_and_scatter_pass_runs_through_the_one_loop():
    found = {}
    for name, tree in _modules():
        loops = [loop for loop in batch_and_scatter_loops(tree) if (name, loop.split(":")[0]) not in ONE_LOOP]
        if loops:
            found[name] = loops
    assert found == {}


def test_a_loop_that_hands_batches_to_the_one_loop_is_not_a_second_loop():
    source = (
        "for size, group in by_size.items():\n"
        "    forward = engines.forward(fcn, chosen)\n"
        "    def write(batch, result):\n"
        "        for i, index in enumerate(batch):\n"
        "            results[index] = result[i]\n"
        "    runner.run_batches(forward, group, load, write)\n"
    )
    assert batch_and_scatter_loops(ast.parse(source)) == []


def plan_private_fields(tree, owner: str = "") -> list[str]:
    """Reads and settings (``plan._runs``, ``replace(plan, _runs=...)``) of the plans' private fields that
    ``owner`` (a module's path) does not own; ``self._x`` is an object's own attribute, left alone."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PLAN_PRIVATE_FIELDS:
            if ast.unparse(node.value) != "self" and PLAN_PRIVATE_FIELDS[node.attr] != owner:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.keyword) and node.arg in PLAN_PRIVATE_FIELDS:
            if PLAN_PRIVATE_FIELDS[node.arg] != owner:
                found.append(f"line {node.value.lineno}: {node.arg}=")
    return found


def test_plans_private_fields_stay_in_the_module_that_plans():
    found = {name: fields for name, tree in _modules() if (fields := plan_private_fields(tree, name))}
    assert found == {}


def test_a_maps_method_is_routed_in_one_place():
    found = {}
    for name, tree in _modules():
        calls = [c for c in routing_calls(tree) if c.split(": ")[1] not in ROUTERS.get(name, set())]
        if calls:
            found[name] = calls
    assert found == {}


@pytest.mark.parametrize(
    ("check", "source"),
    [
        (function_level_imports, "def f():\n    from keras_fcn_surgery.inference import windowed\n"),
        (routing_calls, "chosen, fcn = windowed.route(model, None, 'auto')\n"),
        (routing_calls, "chosen = choose_method(model, None, 'auto')\n"),
        (batch_and_scatter_loops, "for first in starts:\n    out[first : first + n] = forward(load(first))\n"),
        (batch_and_scatter_loops, "for batch in batches:\n    write(batch, forward(load(batch)))\n"),
        (batch_and_scatter_loops, "for group in groups:\n    found.append(engines.forward(m, e)(stack(group)))\n"),
        (plan_private_fields, "for stage, run in zip(plan.stages, plan._runs):\n    pass\n"),
        (plan_private_fields, "plan = dataclasses.replace(plan, _runs=runs)\n"),
        (plan_private_fields, "split = plan._split\n"),
        (batch_and_scatter_loops, "while todo:\n    scores = model.predict(todo.pop())\n    out[i] = scores\n"),
    ],
)
def test_the_issue_35_checks_find_what_they_forbid(check, source):
    assert check(ast.parse(source))


def test_the_cycle_check_finds_a_cycle_and_a_lazy_one():
    eager = {"a.py": ast.parse("from keras_fcn_surgery import b\n"), "b.py": ast.parse("import keras_fcn_surgery.a\n")}
    assert import_cycles(eager, function_level=False) == [["keras_fcn_surgery.a", "keras_fcn_surgery.b"]]
    lazy = {
        "a.py": ast.parse("from keras_fcn_surgery import b\n"),
        "b.py": ast.parse("def f():\n    import keras_fcn_surgery.a\n"),
    }
    assert import_cycles(lazy, function_level=False) == []
    assert len(import_cycles(lazy, function_level=True)) == 1


# Issue 35: one description of where a map's cells look (`grid.geometry.MapGrid`: `Geometry`, `WindowGrid`, and
# `AxisGeometry`, one axis of a `Geometry`) and one of the image a model takes (`layout.ImageSpec`; `FcnSpec`
# extends it). A class that describes either again is a second copy of the concept.
# Allowed beside them: the per-axis state the geometry is computed with (grid/axis.py), the flat record of a grid's
# figures stored in output files (batch/writers.py), a classifier's windowed analysis (which names the image it
# takes) and the conversion rules' context (a tensor being rewritten, not an image).
GRID_CLASSES = {
    "grid/geometry.py": {"MapGrid", "AxisGeometry", "Geometry", "WindowGrid"},
    "grid/axis.py": {"AxisState"},
    "batch/writers.py": {"MapInfo"},
}
IMAGE_SPEC_CLASSES = {
    "layout.py": {"ImageSpec"},
    "inference/windowed.py": {"_Analysis"},
    "surgery/rules/base.py": {"Context"},
}


def _class_names(tree) -> dict[str, set[str]]:
    """Each class's names of fields, properties and methods, by class name."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names = set()
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    names.add(statement.target.id)
                elif isinstance(statement, ast.FunctionDef):
                    names.add(statement.name)
            found[node.name] = names
    return found


def grid_descriptions(tree) -> list[str]:
    """Classes that say where cells look (a stride and a receptive field)."""
    return sorted(name for name, names in _class_names(tree).items() if {"stride", "receptive_field"} <= names)


def image_spec_descriptions(tree) -> list[str]:
    """Classes that describe an image a model takes (a layout and a channel count)."""
    return sorted(name for name, names in _class_names(tree).items() if {"layout", "channels"} <= names)


@pytest.mark.parametrize(
    ("check", "allowed"), [(grid_descriptions, GRID_CLASSES), (image_spec_descriptions, IMAGE_SPEC_CLASSES)]
)
def test_a_maps_grid_and_a_models_image_are_each_described_once(check, allowed):
    found = {name: sorted(set(check(tree)) - allowed.get(name, set())) for name, tree in _modules()}
    assert {name: classes for name, classes in found.items() if classes} == {}


@pytest.mark.parametrize(
    ("check", "source"),
    [
        (grid_descriptions, "@dataclass\nclass PixelGrid:\n    stride: tuple\n    receptive_field: tuple\n"),
        (image_spec_descriptions, "@dataclass\nclass ImageSpec:\n    layout: Layout\n    channels: int\n"),
    ],
)
def test_the_description_checks_find_a_second_copy(check, source):
    assert check(ast.parse(source))


def test_keras_nodes_never_leave_graph_py():
    """Issue 35: one Keras adapter. What graph.py hands out of a model's calls is its own `graph.Call`."""
    import keras
    from keras import layers

    from keras_fcn_surgery import graph

    inner = keras.Sequential([keras.Input((None, None, 4)), layers.Conv2D(4, 1)], name="inner")
    inputs = keras.Input((12, 12, 3))
    x = inner(layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x + 1.0)))
    trace = graph.flat_trace(model, 1)
    handed_out = {
        "nodes_in_order": graph.nodes_in_order(graph.graph_of(model)),
        "flat_nodes": list(graph.flat_nodes(model)),
        "nodes_between": graph.nodes_between(model.inputs, model.outputs),
        "flat_trace": trace.nodes,
    }
    for name, calls in handed_out.items():
        assert calls and all(type(call) is graph.Call for call in calls), (name, [type(c) for c in calls])
    part = graph.graph_part(trace.nodes, trace.input, trace.outputs, name="part")
    image = np.random.default_rng(0).uniform(size=(1, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(part(image)), np.asarray(model(image)), rtol=1e-6, atol=1e-6)


# --- issue 35: no public entry point past about 8 parameters -------------------------------------------------------

# Past this, a function's options are grouped in small frozen objects (`Tiling`, `Execution`, `ExportOptions`...).
MAX_PARAMETERS = 8


def public_function_widths(tree) -> list[tuple[int, str]]:
    """``(parameters, name)`` of each public function and method of a module: every ``def`` whose name has no
    leading underscore, nested ones included; ``self`` and ``cls`` are not counted, nor ``*args``/``**kwargs``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            found.append((len([a for a in every if a.arg not in ("self", "cls")]), node.name))
    return found


def test_no_public_function_takes_more_than_8_parameters():
    found = {
        name: [f"{function} ({count})" for count, function in wide]
        for name, tree in _modules()
        if (wide := [(count, f) for count, f in public_function_widths(tree) if count > MAX_PARAMETERS])
    }
    assert found == {}


def test_the_width_check_counts_what_a_caller_passes():
    source = (
        "def f(a, /, b, *args, c=1, **kwargs):\n    def inner(x):\n        pass\n"
        "class A:\n    def m(self, x):\n        pass\n    @classmethod\n    def k(cls):\n        pass\n"
        "    def _p(self, a, b, c, d, e, f, g, h, i):\n        pass\n"
    )
    assert sorted(public_function_widths(ast.parse(source))) == [(0, "k"), (1, "inner"), (1, "m"), (3, "f")]


# --- issue 35: no process-wide cache ----------------------------------------------------------------------------

# Module-level tables: made by a dict literal or comprehension, or by one of these calls.
TABLE_CALLS = {"dict", "WeakKeyDictionary", "WeakValueDictionary", "defaultdict", "OrderedDict", "Counter"}
TABLE_MUTATORS = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}
# Tables allowed to be written at run time: none (the executions' timings are cached in a file, `engines.cache_path`).
CACHES_ALLOWED: set[tuple[str, str]] = set()


def module_tables(tree) -> dict[str, int]:
    """``name: line`` of the module-level tables of a module (constant ones included)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            made = isinstance(value, (ast.Dict, ast.DictComp)) or (
                isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in TABLE_CALLS
            )
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {target.id: node.lineno for target in targets if made and isinstance(target, ast.Name)}
    return found


def _written_name(node) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def table_writes(tree) -> set[str]:
    """Names (``table`` or ``module.table``'s ``table``) that the functions of a module store into: ``t[k] = v``,
    ``del t[k]``, ``t[k] += v``, ``t.setdefault(...)``, ``t.clear()``..."""
    found = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.Delete)):
                found |= {_written_name(t.value) for t in node.targets if isinstance(t, ast.Subscript)}
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Subscript):
                found.add(_written_name(node.target.value))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in TABLE_MUTATORS:
                    found.add(_written_name(node.func.value))
    return found - {None}  # type: ignore[arg-type]


def process_caches(trees: dict[str, ast.Module]) -> list[str]:
    """``module: table (line)`` of each module-level table that a function of the package writes."""
    written = set().union(*(table_writes(tree) for tree in trees.values())) if trees else set()
    return [
        f"{name}: {table} (line {line})"
        for name, tree in trees.items()
        for table, line in module_tables(tree).items()
        if table in written and (name, table) not in CACHES_ALLOWED
    ]


def test_no_process_wide_cache_in_the_package():
    assert process_caches(dict(_modules())) == []


@pytest.mark.parametrize(
    "source",
    [
        "_PLANS = weakref.WeakKeyDictionary()\ndef plan(fcn):\n    _PLANS.setdefault(fcn, {})\n",
        "_SEEN = {}\ndef see(model):\n    _SEEN[model] = True\n",
        "_SEEN: dict = dict()\ndef forget():\n    _SEEN.clear()\n",
    ],
)
def test_the_cache_check_finds_a_table_written_at_run_time(source):
    assert process_caches({"m.py": ast.parse(source)}) != []


def test_the_cache_check_leaves_constant_tables_alone():
    source = "KINDS = {'a': 1}\nFROZEN = MappingProxyType(dict(KINDS))\ndef kind(name):\n    return KINDS.get(name)\n"
    assert process_caches({"m.py": ast.parse(source)}) == []


def test_the_structure_figures_count_with_these_checks():
    """tools/structure_metrics.py (issue 35's table) counts with the checks above: on this tree, what they allow."""
    from conftest import run_tool

    done = run_tool("structure_metrics.py", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert figures["process-wide caches (module-level tables written at run time)"].startswith("0 ")
    assert figures["import cycles, with function-level imports"] == "0 []"
    assert figures["function-level package imports"].endswith("(inference/ and batch/: 0)")
    assert figures["places that route a method"].startswith("2 (inference/mapper.py")
    widest = figures["widest public functions"].split(", ")[0]
    assert int(widest.split(" ")[1]) <= MAX_PARAMETERS, widest
