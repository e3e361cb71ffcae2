"""The wheel and the sdist build, pass ``twine check``, and hold what they should.

The distributions are built from a copy of the project's files (those git tracks, or
would track), as ``python -m build`` does for a release: the sdist first, then the
wheel from the unpacked sdist, so a file missing from the sdist breaks the wheel too.
"""

import email.parser
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import stac_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# what the repository holds but the sdist need not: CI's entry point, git's settings
NOT_SHIPPED = {".ci/run", ".gitignore"}
LEFT_OUT = {".git", ".venv", "__pycache__", "_build", "build", "dist", ".pytest_cache",
            ".ruff_cache", ".hypothesis", ".mypy_cache"}


def project_files():
  """The project's files: git's list (tracked and new, not ignored), else the tree on disk."""
  listed = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
      capture_output=True, text=True, cwd=ROOT, check=False,
  )
  if listed.returncode == 0 and listed.stdout:
    names = [n for n in listed.stdout.split("\0") if n]
    return sorted(n for n in names if (ROOT / n).is_file())  # a deleted, uncommitted file is gone
  return sorted(
      str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
      if p.is_file() and not LEFT_OUT & set(p.relative_to(ROOT).parts)
      and not p.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in str(p)
  )


def run(*args, cwd, env=None):
  done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, check=False)
  assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
  return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  for name in project_files():
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / name, src / name)
  # --no-isolation: the build backend of this environment (setuptools), no download
  run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src),
      cwd=tmp)
  (sdist,) = (tmp / "dist").glob("*.tar.gz")
  (wheel,) = (tmp / "dist").glob("*.whl")
  return {"tmp": tmp, "sdist": sdist, "wheel": wheel}


def test_twine_check_passes_on_both_distributions(dists):
  out = run(sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]),
            str(dists["wheel"]), cwd=dists["tmp"])
  assert out.count("PASSED") == 2, out


def test_the_sdist_holds_the_whole_project(dists):
  with tarfile.open(dists["sdist"]) as tar:
    names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
  top = f"stac_optax-{stac_optax.__version__}"
  assert dists["sdist"].name == f"{top}.tar.gz"
  missing = sorted(set(project_files()) - NOT_SHIPPED - names)
  assert not missing, f"add them to MANIFEST.in: {missing}"
  for helper in ("tests/conftest.py", "tests/models.py", "tests/optax_trees.py",
                 "tests/stacked_models.py", "scripts/test.sh", "docs/conf.py", "CHANGELOG.md"):
    assert helper in names
  junk = sorted(n for n in names if "__pycache__" in n or n.startswith("docs/_build"))
  assert not junk, junk


def test_the_wheel_holds_the_package_its_type_hints_and_nothing_else(dists):
  with zipfile.ZipFile(dists["wheel"]) as whl:
    names = set(whl.namelist())
  sources = {str(p.relative_to(ROOT)) for p in (ROOT / "stac_optax").rglob("*.py")}
  assert sources <= names
  assert "stac_optax/py.typed" in names
  others = sorted(n for n in names if not n.startswith(("stac_optax/", "stac_optax-")))
  assert not others, others


def test_the_metadata_is_ready_for_the_index(dists):
  with zipfile.ZipFile(dists["wheel"]) as whl:
    (meta_name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(whl.read(meta_name).decode())
  assert meta["Name"] == "stac-optax" and meta["Version"] == stac_optax.__version__
  assert meta["Author"] == "The stac_optax maintainers"
  assert meta["License-Expression"] == "Apache-2.0"
  classifiers = meta.get_all("Classifier")
  assert "Typing :: Typed" in classifiers
  assert any(c.startswith("Development Status :: ") for c in classifiers)
  python = f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
  assert python in classifiers, f"this suite passes on {python}; list it"
  assert meta.get_all("Project-URL")
  assert set(meta.get_all("Provides-Extra")) == {"cuda", "examples", "docs", "test"}
  assert meta["Description-Content-Type"] == "text/markdown"
  description = meta.get_payload()
  assert description.startswith("# stac-optax")
  assert "scripts/test.sh" not in description.split("## Documentation")[0]


def test_the_sdists_tests_import(dists):
  out = dists["tmp"] / "unpacked"
  with tarfile.open(dists["sdist"]) as tar:
    tar.extractall(out, filter="data")
  (project,) = out.iterdir()
  env = {**os.environ, "PYTHONPATH": str(project)}  # its own package before any installed one
  listed = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
               "-p", "no:cacheprovider", "tests", cwd=project, env=env)
  assert " error" not in listed, listed
  for test_file in (project / "tests").glob("test_*.py"):
    assert f"tests/{test_file.name}::" in listed, (test_file.name, listed[-2000:])
