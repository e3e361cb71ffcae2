"""What the GPU check (``benchmarks/gpu_check.py``) needs, and a record of
the machine it runs on: devices, driver, and the versions of what it imports."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess

import jax

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = "`bash scripts/gpu_check.sh --prepare` where pip reaches PyPI brings the wheels; carry .whl"


def stac015_folder() -> pathlib.Path:
  return pathlib.Path(os.environ.get("STAC_OPTIMIZER_015", ROOT / ".venv" / "stac-optimizer-0.1.5"))


def missing(smoke: bool) -> list[str]:
  """What the check needs and cannot find (the packages are checked before
  anything is imported), each with where it was looked for."""
  import stac_optimizer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  out = []
  with contextlib.suppress(importlib.metadata.PackageNotFoundError):
    version = importlib.metadata.version("stac-optimizer")
    if version != "0.3.0":
      out.append(f"stac-optimizer 0.3.0 (found {version} at {stac_optimizer.__file__}; {WHEELS})")
  if not (stac015_folder() / "stac_optimizer" / "__init__.py").exists():
    out.append(f"stac-optimizer 0.1.5 in {stac015_folder()} ($STAC_OPTIMIZER_015; {WHEELS})")
  if not smoke:
    if jax.devices()[0].platform != "gpu":
      out.append(f"a CUDA device for JAX (jax.devices() is {jax.devices()}; use --smoke on a CPU)")
    if not torch.cuda.is_available():
      out.append("a CUDA device for PyTorch (torch.cuda.is_available() is False)")
  return out


def versions() -> dict:
  wanted = ("jax", "jaxlib", "optax", "flax", "chex", "numpy", "torch", "stac-optimizer", "matplotlib")
  found = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name in wanted or name.startswith(("jax-cuda", "jax_cuda", "nvidia-cuda-runtime", "nvidia-cudnn")):
      found[name] = dist.version
  for dist in importlib.metadata.distributions(path=[str(stac015_folder())]):
    found[f"{dist.metadata['Name']} (in {stac015_folder()})"] = dist.version
  return dict(sorted(found.items()))


def below_minimums() -> list[str]:
  """The packages older than pyproject.toml asks for (a run goes on; parts may fail)."""
  import tomllib  # pylint: disable=import-outside-toplevel

  def numbers(version):
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])

  out = []
  for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
    name, _, minimum = requirement.partition(">=")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      found = importlib.metadata.version(name.strip())
      if minimum and numbers(found) < numbers(minimum):
        out.append(f"{name.strip()} {found} (pyproject.toml asks for >= {minimum})")
  return out


def environment(smoke: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  info = common.environment()
  device = jax.devices()[0]
  info.update({"smoke": smoke, "jax_devices": [str(d) for d in jax.devices()], "versions": versions(),
               "stac_optimizer_file": importlib.import_module("stac_optimizer").__file__,
               "below_minimums": below_minimums(),
               "jax_memory_stats": device.memory_stats() if hasattr(device, "memory_stats") else None,
               "xla_env": {k: v for k, v in os.environ.items() if k.startswith("XLA")},
               "jax_environment": jax.print_environment_info(return_string=True)})
  info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                   "cuda_available": torch.cuda.is_available()}
  if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info["torch"].update({"device": props.name, "total_memory": props.total_memory,
                          "multiprocessors": props.multi_processor_count,
                          "capability": f"{props.major}.{props.minor}"})
  if shutil.which("nvidia-smi"):
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
    info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
  return info
