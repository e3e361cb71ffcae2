"""The matching options that every function of ``torch_interop`` takes, as
one value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from stac_optax.torch_interop.layouts import ModuleConverter

MATCH_MODES = ("names", "order")


@dataclasses.dataclass(frozen=True)
class MatchOptions:
  """How the parameters of a PyTorch module are paired with a Flax model's.

  The public functions take these as keyword arguments (see
  :func:`~stac_optax.torch_interop.match_parameters`) and pass them on
  packed in one value.

  Attributes:
    name_map: ``{torch_name: flax_path}`` (or ``{torch module: flax
      module}`` for a converted module), a dict whatever mapping was given.
    match: ``"names"`` or ``"order"``.
    converters: extra ``ModuleConverter`` objects, tried before the
      built-in ones.
    stacked_modules: the stacked (scanned) modules of the Flax side.
    module_order: the Flax side's registration order, where it cannot be read.
  """

  name_map: Mapping[str, str] | None = None
  match: str = "names"
  converters: Sequence[ModuleConverter] = ()
  stacked_modules: Any = None
  module_order: Sequence[str] | None = None

  def __post_init__(self):
    object.__setattr__(self, "name_map", dict(self.name_map or {}))

  def check_match(self) -> None:
    """Raises a ``ValueError`` for a ``match`` other than the two modes."""
    if self.match not in MATCH_MODES:
      raise ValueError(f"match must be 'names' or 'order', got {self.match!r}.")
