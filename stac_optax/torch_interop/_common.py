"""The PyTorch module, lazily imported."""

from __future__ import annotations


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - exercised without torch only
    raise ImportError(
        "stac_optax.torch_interop needs PyTorch: pip install torch"
    ) from e
  return torch
