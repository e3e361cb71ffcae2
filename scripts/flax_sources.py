"""Unpacks Flax's NNX tests, guides and examples, for the installed Flax version, beside a venv.

    python scripts/flax_sources.py VENV

downloads the source distribution of the installed ``flax`` from PyPI (``pip
download --no-binary :all:``) and unpacks its ``tests/nnx``,
``docs_nnx/guides`` and ``examples`` into ``VENV/flax-<version>-src``, where
``tests/test_flax_suites.py`` (Flax's tests and guides) and
``tests/corpus.py`` (the linen example models) find them (or set
``STAC_FLAX_SOURCE``).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

PARTS = ("tests/nnx/", "docs_nnx/guides/", "examples/")


def main(venv: str) -> pathlib.Path:
  import flax  # pylint: disable=import-outside-toplevel

  version = flax.__version__
  dest = pathlib.Path(venv) / f"flax-{version}-src"
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-binary", ":all:", f"flax=={version}", "-d", tmp],
        check=True,
    )
    archive_path = next(pathlib.Path(tmp).glob("flax-*.tar.gz"))
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(archive_path) as archive:
      top = f"flax-{version}/"
      for member in archive.getmembers():
        relative = member.name[len(top):] if member.name.startswith(top) else ""
        if member.isfile() and relative.startswith(PARTS):
          target = dest / relative
          target.parent.mkdir(parents=True, exist_ok=True)
          with archive.extractfile(member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
  return dest


if __name__ == "__main__":
  print(main(sys.argv[1]))
