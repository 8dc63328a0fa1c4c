"""pyproject.toml lists every package folder, maps it under xaiadv, and ships py.typed."""

from __future__ import annotations

import importlib
import tomllib
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("plugins", "bridge", "evaluation")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> list[str]:
    """Dotted xaiadv.* names of every folder with an __init__.py under the three layers."""
    names = []
    for layer in LAYERS:
        for init in sorted((ROOT / layer).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT).parts
            names.append(".".join(("xaiadv", *relative)))
    return names


def test_every_package_folder_is_listed() -> None:
    listed = set(_setuptools()["packages"])
    missing = [name for name in _package_folders() if name not in listed]
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert {"xaiadv", "xaiadv.plugins", "xaiadv.bridge", "xaiadv.evaluation"} <= listed


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_map_to_top_level_folders(layer: str) -> None:
    assert _setuptools()["package-dir"][f"xaiadv.{layer}"] == layer


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "xaiadv" / "py.typed").is_file()
    assert "py.typed" in _setuptools()["package-data"]["xaiadv"]


def test_the_demo_config_is_shipped_with_the_evaluation_package() -> None:
    """`xaiadv demo` reads evaluation/demo.toml from the installed package, so it must be package data."""
    assert (ROOT / "evaluation" / "demo.toml").is_file()
    assert "*.toml" in _setuptools()["package-data"]["xaiadv.evaluation"]


def test_layers_import_in_one_direction() -> None:
    """plugins never import bridge or evaluation; bridge never imports evaluation (DESIGN.md)."""
    forbidden = {
        "plugins": ("xaiadv.bridge", "xaiadv.evaluation", "from ..bridge", "from ..evaluation"),
        "bridge": ("xaiadv.evaluation", "from ..evaluation"),
    }
    offenders = [
        f"{path.relative_to(ROOT)}: {needle}"
        for layer, needles in forbidden.items()
        for path in (ROOT / layer).rglob("*.py")
        for needle in needles
        if needle in path.read_text()
    ]
    assert not offenders


@pytest.mark.parametrize(
    ("adapter", "library"), [("art", "art"), ("foolbox", "foolbox"), ("torchattacks", "torchattacks")]
)
def test_bridge_without_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, adapter: str, library: str
) -> None:
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, f"xaiadv.bridge.{adapter}", raising=False)
    monkeypatch.setitem(sys.modules, library, None)  # makes `import <library>` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'xaiadv\[{adapter}\]'"):
        importlib.import_module(f"xaiadv.bridge.{adapter}")


def test_static_tools_resolve_the_package_by_path_from_the_repository_root() -> None:
    """What IDEs and type checkers do with the path make's editable install (``editable_mode=compat``)
    writes into a .pth file: find ``xaiadv.<layer>`` by folders from the root, through ``xaiadv/<layer>``
    links to the top-level layers, to the very files the package runs."""
    assert "editable_mode=compat" in (ROOT / "Makefile").read_text()
    package = PathFinder.find_spec("xaiadv", [str(ROOT)])
    assert package is not None and package.submodule_search_locations
    for layer, module in (("plugins", "model"), ("bridge", "registry"), ("evaluation", "cli")):
        link = ROOT / "xaiadv" / layer
        assert link.is_symlink() and link.resolve() == (ROOT / layer).resolve()
        found = PathFinder.find_spec(layer, list(package.submodule_search_locations))
        assert found is not None and found.submodule_search_locations
        leaf = PathFinder.find_spec(module, list(found.submodule_search_locations))
        assert (
            leaf is not None and Path(str(leaf.origin)).resolve() == (ROOT / layer / f"{module}.py").resolve()
        )
        imported = importlib.import_module(f"xaiadv.{layer}.{module}")
        assert Path(str(imported.__file__)).resolve() == (ROOT / layer / f"{module}.py").resolve()
