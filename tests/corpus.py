"""Model definitions this project did not write, loaded as their authors wrote them.

scripts/test.sh installs each into a folder of its own under ``.venv`` (see
scripts/_venv.sh); an environment variable names another folder:

* ``STAC_FLAX_SOURCE``: Flax's ``examples/`` from the installed Flax's source
  distribution (0.12.8 on Python 3.11) (the linen ImageNet ResNet, lm1b, WMT, nlp_seq, SST-2, VAE,
  seq2seq, PPO models and the linen design tests), each ``models.py`` loaded
  from its file.
* ``STAC_RECURRENTGEMMA``: Google DeepMind's ``recurrentgemma`` 1.0.1, which
  ships the Griffin model in Flax linen and in PyTorch, with the packages it
  imports.
* ``STAC_GEMMA_LLM``: ``gemma-llm`` 1.0.0, a linen Gemma.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib
import sys
import types

_VENV = pathlib.Path(__file__).resolve().parents[1] / ".venv"


def _folder(variable: str, default: str, marker: str) -> pathlib.Path:
  root = pathlib.Path(os.environ.get(variable, _VENV / default))
  assert (root / marker).exists(), (
      f"{marker} not found under {root}; scripts/test.sh installs it (see scripts/_venv.sh), "
      f"or set {variable} to a folder that holds it."
  )
  return root


@functools.cache
def flax_example(name: str, file: str = "models.py") -> types.ModuleType:
  """``examples/<name>/<file>`` of Flax's source distribution, as a module."""
  import flax  # pylint: disable=import-outside-toplevel

  root = _folder("STAC_FLAX_SOURCE", f"flax-{flax.__version__}-src", "examples")
  path = root / "examples" / name / file
  module_name = f"_flax_examples_{name}_{path.stem}"
  spec = importlib.util.spec_from_file_location(module_name, path)
  assert spec is not None and spec.loader is not None, path
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  directory = str(path.parent)  # some examples import their siblings by name
  sys.path.insert(0, directory)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(directory)
  return module


def _import_from(variable: str, default: str, package: str, module: str) -> types.ModuleType:
  root = str(_folder(variable, default, package))
  if root not in sys.path:
    sys.path.append(root)
  return importlib.import_module(module)


def recurrentgemma(framework: str) -> types.ModuleType:
  """``recurrentgemma.jax`` or ``recurrentgemma.torch``."""
  return _import_from(
      "STAC_RECURRENTGEMMA", "recurrentgemma-1.0.1", "recurrentgemma", f"recurrentgemma.{framework}"
  )


def gemma_transformer() -> types.ModuleType:
  """``gemma.transformer`` from gemma-llm."""
  return _import_from("STAC_GEMMA_LLM", "gemma-llm-1.0.0", "gemma", "gemma.transformer")
