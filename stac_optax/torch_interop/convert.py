"""Weights and other per-parameter values, PyTorch to Flax and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stac_optax import partition as partition_lib
from stac_optax.torch_interop._common import _torch
from stac_optax.torch_interop.matching import flax_params, match_parameters


def _tree_from_values(target: Any, values: Mapping[str, Any]) -> Any:
  """A tree shaped like ``flax_params(target)`` with leaves from ``values``."""
  template = flax_params(target)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(
          values[partition_lib.path_name(path)], dtype=jnp.result_type(leaf)
      ),
      template,
  )


def tree_from_torch(
    torch_module: Any,
    tensors: Mapping[str, Any],
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
) -> Any:
  """Any per-parameter tensors keyed by PyTorch name (weights, gradients,
  moments) as a Flax tree with the params' structure and layouts."""
  matches = match_parameters(torch_module, target, name_map=name_map)
  return _tree_from_values(target, {m.flax_name: m.to_flax(tensors[m.torch_name]) for m in matches})


def params_from_torch(
    torch_module: Any, target: Any, *, name_map: Mapping[str, str] | None = None
) -> Any:
  """The PyTorch module's weights as a Flax params tree shaped like ``target``'s.

  For an NNX module, apply it with ``nnx.update(model, params)``.

  Example:
    >>> import numpy as np, torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> linear = torch.nn.Linear(3, 2)
    >>> twin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> params = torch_interop.params_from_torch(linear, twin)
    >>> nnx.update(twin, params)
    >>> x = np.ones((1, 3), np.float32)
    >>> bool(np.allclose(twin(x), linear(torch.from_numpy(x)).detach().numpy(), atol=1e-6))
    True
  """
  return tree_from_torch(
      torch_module, dict(torch_module.named_parameters()), target, name_map=name_map
  )


def tree_to_torch(
    tree: Any, torch_module: Any, *, name_map: Mapping[str, str] | None = None,
    target: Any | None = None,
) -> dict[str, np.ndarray]:
  """A Flax tree with the params' paths as ``{torch_name: array}`` in PyTorch layout."""
  matches = match_parameters(torch_module, tree if target is None else target, name_map=name_map)
  flat = dict(partition_lib.leaves_with_names(tree))
  return {m.torch_name: m.to_torch(flat[m.flax_name]) for m in matches}


def params_to_torch(
    params_or_model: Any, torch_module: Any, *, name_map: Mapping[str, str] | None = None
) -> None:
  """Copies Flax weights into the PyTorch module's parameters, in place."""
  torch = _torch()
  values = tree_to_torch(
      flax_params(params_or_model), torch_module, name_map=name_map, target=params_or_model
  )
  with torch.no_grad():
    for name, param in torch_module.named_parameters():
      param.copy_(torch.from_numpy(np.array(values[name], copy=True)).to(param.dtype))

