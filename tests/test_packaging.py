"""Packaging: one version, read without importing jax; typed; documented."""

import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _version_literal() -> str:
  """``__version__`` as setuptools' ``attr:`` reads it: statically, from a
  literal assignment in the module's AST (no import, so no jax at build
  time). Anything else would make setuptools import the package."""
  with open(os.path.join(ROOT, "optax_sam", "__init__.py"),
            encoding="utf-8") as f:
    tree = ast.parse(f.read())
  values = [node.value.value for node in tree.body
            if isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets]
            == ["__version__"] and isinstance(node.value, ast.Constant)]
  assert len(values) == 1, "__version__ must be one literal assignment"
  return values[0]


def test_version_is_written_once():
  project = _pyproject()
  assert "version" not in project["project"]
  assert "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "optax_sam.__version__"
  version = _version_literal()
  assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", version), version
  import optax_sam  # pylint: disable=g-import-not-at-top
  assert optax_sam.__version__ == version


def test_changelog_names_the_version():
  with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
    headings = re.findall(r"^## (\S+)", f.read(), flags=re.M)
  assert _version_literal() in headings


def test_py_typed_ships_in_the_wheel():
  assert os.path.exists(os.path.join(ROOT, "optax_sam", "py.typed"))
  package_data = _pyproject()["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["optax_sam"]


def test_ci_builds_docs_lints_and_installs_the_wheel():
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert "sphinx -W" in ci
  assert "ruff check" in ci
  assert "python3 -m build" in ci
  assert "--system-site-packages" not in ci  # the wheel's venv is clean
  extras = _pyproject()["project"]["optional-dependencies"]
  assert {"docs", "dev", "test"} <= set(extras)
