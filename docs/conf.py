"""Sphinx configuration of the stac_optax documentation (``bash scripts/docs.sh``)."""

import pathlib
import sys
import types
import typing

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, also where another is installed

import warnings  # noqa: E402

import chex  # noqa: E402
import optax  # noqa: E402

import stac_optax  # noqa: E402

# sphinx-autodoc-typehints calls a Sphinx API that Sphinx 9 deprecates; that is
# its business, not a problem in these pages (-W turns only Sphinx's own warnings into errors).
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

project = "stac_optax"
author = "The stac_optax maintainers"
copyright = "the stac_optax maintainers"
release = version = stac_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "benchmark/*.json"]

# Markdown guides: anchors for headings (links like optimizer.md#jax-notes), $...$ maths.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "colon_fence"]

# Docstrings are Google style (Args/Returns/Raises); hints come from the signatures.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
always_document_param_types = True
typehints_use_signature = False
typehints_use_signature_return = False
typehints_document_rtype_none = False
# optax.OptState (optax.Updates, ...) is chex.ArrayTree, a recursive alias whose inner
# references name "ArrayTree": resolved here, then shown by its name (_alias_name).
autodoc_type_aliases = {"ArrayTree": "chex.ArrayTree"}


def _alias_name(annotation, config):  # the signature sphinx-autodoc-typehints calls
  """Names optax's and chex's type aliases instead of spelling out the unions they stand for."""
  if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
    return None
  members = [a for a in typing.get_args(annotation) if a is not type(None)]
  optional = len(members) < len(typing.get_args(annotation))
  if any("chex.ArrayTree" in str(a) for a in members):  # optax.OptState, optax.Updates, ...
    return "``chex.ArrayTree``" + (" | ``None``" if optional else "")
  for name, alias in TYPE_ALIASES.items():
    expected = typing.get_args(alias)
    if len(members) == len(expected) and all(m in expected for m in members):
      return f"``{name}``" + (" | ``None``" if optional else "")
  return None


TYPE_ALIASES = {
    "optax.ScalarOrSchedule": optax.ScalarOrSchedule,
    "chex.Numeric": chex.Numeric,
    "chex.Array": chex.Array,
}
typehints_formatter = _alias_name
# the formatter is a function, which Sphinx cannot pickle: it re-reads every page each build
suppress_warnings = ["config.cache"]

# Every reference must resolve, so that a renamed or removed name fails the build; the
# libraries this site does not link to (no intersphinx: it builds offline) are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(typing|collections\.abc|builtins|types|numpy|np|jax|jnp|optax|flax|nnx|chex"
               r"|orbax|ocp|torch|equinox|eqx)(\..*)?"),
    (r"py:.*", r"Ellipsis|NoneType"),  # tuple[int, ...], X | None
]

html_theme = "furo"
html_title = f"stac_optax {version}"
html_static_path = []
