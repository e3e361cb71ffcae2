"""How a PyTorch parameter's layout becomes a Flax leaf's, and back."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from stac_optax.torch_interop._common import _torch

_NORM_TYPES = (
    "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
)
_CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")


@dataclasses.dataclass(frozen=True)
class ParameterMatch:
  """One PyTorch parameter and the Flax leaf it corresponds to.

  Attributes:
    torch_name: e.g. ``blocks.5.fc2.weight``.
    flax_name: e.g. ``blocks/5/fc2/kernel`` (the path in the params tree).
    layout: ``"identity"``, ``"transpose"`` (linear) or ``"conv"``.
    torch_shape: shape in PyTorch.
    flax_shape: shape in Flax.
  """

  torch_name: str
  flax_name: str
  layout: str
  torch_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]

  def to_flax(self, value: Any) -> np.ndarray:
    """A PyTorch-layout array (tensor or numpy) in this leaf's Flax layout."""
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      if value.dtype == _torch().bfloat16:
        value = value.float()
      value = value.numpy()
    # a copy: a zero-copy view would let later in-place PyTorch steps
    # change the JAX arrays made from it
    value = np.array(value, copy=True)
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (0, 1), (-1, -2))
    return value

  def to_torch(self, value: Any) -> np.ndarray:
    """A Flax-layout array in this parameter's PyTorch layout (numpy)."""
    value = np.asarray(jax.device_get(value), dtype=np.float32)
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (-1, -2), (0, 1))
    return value


def _default_flax_name(torch_module: Any, torch_name: str) -> tuple[str, str]:
  module_name, _, leaf = torch_name.rpartition(".")
  owner = torch_module.get_submodule(module_name) if module_name else torch_module
  kind = type(owner).__name__
  prefix = module_name.replace(".", "/") + "/" if module_name else ""
  if leaf == "weight" and kind == "Linear":
    return prefix + "kernel", "transpose"
  if leaf == "weight" and kind in _CONV_TYPES:
    return prefix + "kernel", "conv"
  if leaf == "weight" and kind == "Embedding":
    return prefix + "embedding", "identity"
  if leaf == "weight" and kind in _NORM_TYPES:
    return prefix + "scale", "identity"
  return prefix + leaf, "identity"


def _layout_for(flax_name: str, torch_ndim: int) -> str:
  leaf = flax_name.rsplit("/", 1)[-1]
  if leaf == "kernel" and torch_ndim == 2:
    return "transpose"
  if leaf == "kernel" and torch_ndim >= 3:
    return "conv"
  return "identity"

