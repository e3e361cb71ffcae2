"""Pairing the parameters of a PyTorch module with the leaves of a Flax model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from stac_optax import order as order_lib
from stac_optax import partition as partition_lib
from stac_optax.torch_interop.layouts import ParameterMatch, _default_flax_name, _layout_for


def flax_params(target: Any) -> Any:
  """The params tree of a target: an NNX module's ``nnx.Param`` state (plain
  arrays), a linen variables dict's ``params``, or the tree itself; for a
  builder (``lambda: Net(...)``), that of what it builds, as
  ``jax.ShapeDtypeStruct`` leaves (it is traced, not run)."""
  if order_lib.is_builder(target):
    return jax.eval_shape(lambda: flax_params(target()))
  if partition_lib._is_nnx_module(target):  # pylint: disable=protected-access
    from flax import nnx  # pylint: disable=import-outside-toplevel

    return nnx.as_pure(nnx.state(target, nnx.Param))
  if partition_lib._looks_like_linen_variables(target):  # pylint: disable=protected-access
    return target["params"]
  return target




def match_parameters(
    torch_module: Any,
    target: Any,
    *,
    name_map: Mapping[str, str] | None = None,
) -> tuple[ParameterMatch, ...]:
  """Matches every trainable PyTorch parameter with a Flax params leaf.

  Args:
    torch_module: the ``torch.nn.Module``.
    target: the Flax side: an NNX module, a linen params or variables dict,
      or a params tree.
    name_map: ``{torch_name: flax_path}`` for parameters the rules do not
      match.

  Returns:
    One :class:`ParameterMatch` per PyTorch parameter, in registration order.

  Raises:
    ValueError: a parameter without a Flax leaf, a Flax leaf without a
      parameter, or shapes that do not agree; the message lists them all.

  Example:
    >>> import torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> conv = torch.nn.Conv2d(1, 4, 3)
    >>> for m in torch_interop.match_parameters(conv, nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))):
    ...   print(m.torch_name, m.torch_shape, '->', m.flax_name, m.flax_shape, m.layout)
    weight (4, 1, 3, 3) -> kernel (3, 3, 1, 4) conv
    bias (4,) -> bias (4,) identity
  """
  name_map = dict(name_map or {})
  leaves = dict(partition_lib.leaves_with_names(flax_params(target)))
  aliases = {}
  if partition_lib._is_nnx_module(target) or order_lib.is_builder(target):  # pylint: disable=protected-access
    # a tied NNX variable shows in the state under its sorted-first path
    part = partition_lib.partition_modules(target, last_n_modules=0)
    aliases = {owner: alias for alias, owner in part.parameter_aliases}
  known = {n for n, _ in torch_module.named_parameters()}
  stray = sorted(set(name_map) - known)
  matches, problems, used = [], [], set()
  for torch_name, param in torch_module.named_parameters():
    if torch_name in name_map:
      flax_name = name_map[torch_name]
      layout = _layout_for(flax_name, param.ndim)
    else:
      flax_name, layout = _default_flax_name(torch_module, torch_name)
    flax_name = aliases.get(flax_name, flax_name)
    if flax_name not in leaves:
      problems.append(f"{torch_name!r} -> {flax_name!r}: no such Flax leaf")
      continue
    match = ParameterMatch(
        torch_name, flax_name, layout, tuple(param.shape), tuple(np.shape(leaves[flax_name]))
    )
    converted = match.to_flax(np.zeros(match.torch_shape, np.float32)).shape
    if converted != match.flax_shape:
      problems.append(
          f"{torch_name!r} {match.torch_shape} -> {flax_name!r} {match.flax_shape}: "
          f"shapes differ ({layout} layout gives {converted})"
      )
      continue
    used.add(flax_name)
    matches.append(match)
  unmatched = sorted(set(leaves) - used)
  if problems or unmatched or stray:
    raise ValueError(
        "PyTorch and Flax parameters do not match"
        + "".join(f"\n  {p}" for p in problems)
        + (f"\n  Flax leaves without a PyTorch parameter: {unmatched}" if unmatched else "")
        + (f"\n  name_map names unknown PyTorch parameters: {stray}" if stray else "")
        + "\nPass name_map={torch_name: flax_path} for the names the rules miss."
    )
  return tuple(matches)

