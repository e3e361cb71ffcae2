"""The shapes Flax's own layers give their parameters.

A layer built under ``nnx.vmap`` or ``nn.scan`` holds its parameters with one
more axis than the layer makes: the layers. Discovery records, for each Flax
layer it meets (an NNX module of the model, a linen module run by a
builder), the shape each of its parameters has in one layer;
:mod:`stac_optax.find_stacked` compares them with the parameters' real
shapes to find stacked blocks that nobody declared.

Only layers whose parameter shapes follow from their own attributes are
known here: ``Linear``/``Dense``, ``Embed``, ``Conv``, and the norms over
the last axis. A dimension the layer does not fix (a linen ``Dense``
kernel's input size) is ``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

Shape = tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One Flax layer's parameter shapes, in one layer.

  Attributes:
    kind: the layer's class as users write it (``'nnx.Linear'``).
    params: parameter name -> its shape (``None`` for a free dimension).
  """

  kind: str
  params: dict[str, Shape]

  def fits(self, name: str, shape: Sequence[int]) -> bool:
    """Whether a parameter ``name`` of ``shape`` is what the layer makes."""
    want = self.params[name]
    return len(shape) == len(want) and all(w is None or w == s for w, s in zip(want, shape, strict=True))

  def extra_axes(self, name: str, shape: Sequence[int]) -> set[int]:
    """The axes of ``shape`` whose removal leaves what the layer makes."""
    shape = tuple(shape)
    return {a for a in range(len(shape)) if self.fits(name, shape[:a] + shape[a + 1:])}


def _last_axis(feature_axes: Any) -> bool:
  return feature_axes in (-1, (-1,), [-1])


def _nnx(module: Any) -> LayerShape | None:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if isinstance(module, nnx.Linear):
    out = module.out_features
    return LayerShape("nnx.Linear", {"kernel": (module.in_features, out), "bias": (out,)})
  if isinstance(module, nnx.Embed):
    return LayerShape("nnx.Embed", {"embedding": (module.num_embeddings, module.features)})
  if isinstance(module, nnx.Conv) and isinstance(getattr(module, "kernel_shape", None), tuple):
    return LayerShape("nnx.Conv", {"kernel": module.kernel_shape, "bias": (module.out_features,)})
  for norm in (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm):
    if isinstance(module, norm) and _last_axis(getattr(module, "feature_axes", -1)):
      n = module.num_features
      return LayerShape(f"nnx.{norm.__name__}", {"scale": (n,), "bias": (n,)})
  return None


def _linen(module: Any) -> LayerShape | None:
  # A lifted layer (nn.vmap(nn.Dense)) is a subclass of the layer it lifts.
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  if isinstance(module, nn.Dense):
    return LayerShape("nn.Dense", {"kernel": (None, module.features), "bias": (module.features,)})
  if isinstance(module, nn.Embed):
    return LayerShape("nn.Embed", {"embedding": (module.num_embeddings, module.features)})
  if isinstance(module, nn.Conv):
    size = module.kernel_size
    size = (size,) if isinstance(size, int) else tuple(size)
    return LayerShape("nn.Conv", {"kernel": (*size, None, module.features), "bias": (module.features,)})
  for norm, axes in ((nn.LayerNorm, "feature_axes"), (nn.RMSNorm, "feature_axes"), (nn.BatchNorm, "axis")):
    if isinstance(module, norm) and _last_axis(getattr(module, axes, -1)):
      return LayerShape(f"nn.{norm.__name__}", {"scale": (None,), "bias": (None,)})
  return None


def of(module: Any) -> LayerShape | None:
  """The parameter shapes of one Flax layer (NNX or linen), or ``None``
  for a module whose shapes this module does not know."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - flax is a dependency
    return None
  if isinstance(module, nnx.Module):
    return _nnx(module)
  return _linen(module)
