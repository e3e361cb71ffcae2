"""The PyTorch module, imported when first needed."""

from __future__ import annotations

from typing import Any


def import_torch() -> Any:
  """``torch``; an ``ImportError`` naming the install command without it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - exercised without torch only
    raise ImportError(
        "stac_optax.torch_interop needs PyTorch: pip install torch"
    ) from e
  return torch
