"""Sphinx configuration for the optax_sam documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document this checkout, not an installed copy

import optax_sam  # noqa: E402  pylint: disable=g-import-not-at-top

project = "optax_sam"
author = "optax_sam authors"
copyright = "2026, optax_sam authors"  # noqa: A001  pylint: disable=redefined-builtin
release = optax_sam.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/_template.md"]

# Google-style docstrings, as optax writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"optax_sam {release}"
napoleon_use_ivar = True  # NamedTuple fields: one "Variables" list each


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """Skips the ``Alias for field number i`` properties of NamedTuples:
  their docstrings' ``Attributes`` sections already describe the fields."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
