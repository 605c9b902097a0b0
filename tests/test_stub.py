"""The extension's type stub describes exactly what the extension exports."""

import ast
import inspect
from pathlib import Path

import pytest

ferroloop = pytest.importorskip("ferroloop")
from ferroloop import _ferroloop  # noqa: E402

STUB = Path(inspect.getfile(ferroloop)).with_name("_ferroloop.pyi")


def stub_classes() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
            classes[node.name] = names
    return classes


def test_stub_lists_every_class_the_extension_exports():
    exported = {n for n, v in vars(_ferroloop).items() if isinstance(v, type)}
    assert set(stub_classes()) == exported


@pytest.mark.parametrize("name", sorted(stub_classes()))
def test_stub_lists_every_method_of_the_class(name):
    cls = getattr(_ferroloop, name)
    dunders = ("__lt__", "__le__", "__gt__", "__ge__", "__len__", "__contains__")
    own = {attr for attr in vars(cls) if not attr.startswith("__") or attr in dunders}
    declared = stub_classes()[name] - {"__new__"}
    assert own == declared
