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
"""

from __future__ import annotations

import ast
import pathlib

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
    )
    tree = ast.parse(allowed)
    assert not keras_internals(tree) and not layout_comparisons(tree)
    assert not facade_imports(tree, {"predict_map"}) and not layer_kind_lists(tree)


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
