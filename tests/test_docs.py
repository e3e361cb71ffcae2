"""The documentation site builds without a warning and documents every public name."""

import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import stac_optax
import stac_optax.checkpoint
import stac_optax.torch_interop

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_names():
  """Every public name, with its documented home (``stac_optax.X``, ...)."""
  names = [f"stac_optax.{name}" for name in stac_optax.__all__]
  names += [f"stac_optax.torch_interop.{name}" for name in stac_optax.torch_interop.__all__]
  for name, fn in inspect.getmembers(stac_optax.checkpoint, inspect.isfunction):
    if not name.startswith("_") and fn.__module__ == stac_optax.checkpoint.__name__:
      # validate_state is exported at the top level too and documented there once
      top = getattr(stac_optax, name, None) is fn
      names.append(f"stac_optax.{name}" if top else f"stac_optax.checkpoint.{name}")
  return names


def public_members(names):
  """The documented methods and properties of the public classes among ``names``."""
  members = []
  for name in names:
    module, _, attr = name.rpartition(".")
    obj = getattr(sys.modules[module], attr)
    if not inspect.isclass(obj):
      continue
    for member_name, member in vars(obj).items():
      routine = inspect.isfunction(member) or isinstance(member, (property, classmethod,
                                                                  staticmethod))
      if routine and not member_name.startswith("_") and inspect.getdoc(member):
        members.append(f"{name}.{member_name}")
  return members


def build(source, out):
  """The command of scripts/docs.sh (warnings are errors), with the site's configuration."""
  return subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-c", str(DOCS),
       str(source), str(out)],
      capture_output=True, text=True, cwd=ROOT, check=False,
  )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("docs") / "html"
  done = build(DOCS, out)
  assert done.returncode == 0, done.stdout + done.stderr
  return out


def test_the_site_documents_every_public_name(site):
  documented = set()
  for page in (site / "api").glob("*.html"):
    documented |= set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page.read_text()))
  missing = [name for name in public_names() if name not in documented]
  assert not missing, f"not in the API reference (add them to a page in docs/api/): {missing}"
  members = public_members(public_names())
  assert "stac_optax.STACPartition.labels" in members
  missing = [name for name in members if name not in documented]
  assert not missing, f"methods not rendered (give their class :members: in docs/api/): {missing}"


def test_every_guide_is_a_page_of_the_site(site):
  guides = sorted(p.relative_to(DOCS).with_suffix(".html") for p in DOCS.rglob("*.md")
                  if "_build" not in p.parts)
  assert guides and all((site / page).is_file() for page in guides)


def test_the_stac_page_renders_its_docstring_maths_and_example(site):
  page = (site / "api" / "stac.html").read_text()
  assert 'id="stac_optax.stac"' in page
  assert "math notranslate" in page  # the update rule's .. math:: block
  assert "&gt;&gt;&gt; " in page  # the doctest example, as code


def test_a_broken_reference_fails_the_build(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  (source / "index.md").write_text(
      "# Page\n\n```{py:function} stac_optax.documented()\n```\n\n"
      "{func}`stac_optax.documented` is documented here; "
      "{func}`stac_optax.no_such_function` is not.\n")
  done = build(source, tmp_path / "html")
  assert done.returncode != 0
  assert "reference target not found: stac_optax.no_such_function" in done.stderr, done.stderr
  assert done.stderr.count("WARNING") == 1, done.stderr
