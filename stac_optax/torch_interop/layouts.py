"""How a PyTorch parameter's layout becomes a Flax leaf's, and back.

A rule is chosen by the PyTorch module's class with ``isinstance``, so a
subclass (``nn.MultiheadAttention``'s ``NonDynamicallyQuantizableLinear``
``out_proj``, a user's ``Linear`` with extra behaviour) follows its base:

=====================================  ===============  ===============
PyTorch module                         ``weight`` is    layout
=====================================  ===============  ===============
``Linear``                             ``kernel``       ``transpose``
``Conv1d``, ``Conv2d``, ``Conv3d``     ``kernel``       ``conv``
``Embedding``                          ``embedding``    ``identity``
``LayerNorm``, ``RMSNorm``,            ``scale``        ``identity``
``GroupNorm``, ``BatchNorm*``,
``InstanceNorm*``
=====================================  ===============  ===============

A :class:`ModuleConverter` handles a module whose parameters do not map one
to one: :class:`MultiheadAttentionConverter` splits ``nn.MultiheadAttention``'s
fused ``in_proj_weight`` into the ``query``, ``key`` and ``value`` kernels
of ``nnx.MultiHeadAttention`` or linen's ``MultiHeadDotProductAttention``,
each reshaped to ``(in, heads, head_dim)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from stac_optax.torch_interop._common import import_torch

# Flax leaf names by role: what a PyTorch ``weight`` is called in Flax.
WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.dtype == import_torch().bfloat16:
      value = value.float()
    value = value.numpy()
  # a copy: a zero-copy view would let later in-place PyTorch steps change
  # the JAX arrays made from it
  return np.array(value, copy=True)


@dataclasses.dataclass(frozen=True)
class StackedLayer:
  """Where one layer of a stacked (scanned) Flax array lies.

  Attributes:
    stacked_module: the stacked module's path (``blocks``).
    array_name: the stacked array's path in the params tree
      (``blocks/up/kernel``).
    axis: its layer axis.
    index: the layer.
    layers: how many layers the array holds.
  """

  stacked_module: str
  array_name: str
  axis: int
  index: int
  layers: int


@dataclasses.dataclass(frozen=True)
class ParameterMatch:
  """One PyTorch parameter (or a block of its rows) and its Flax leaf.

  Attributes:
    torch_name: e.g. ``blocks.5.fc2.weight``.
    flax_name: e.g. ``blocks/5/fc2/kernel`` (the path in the params tree).
    layout: ``"identity"``, ``"transpose"`` (linear), ``"conv"`` or
      ``"heads"`` (transposed if 2-D, then reshaped to the Flax shape, as
      attention kernels are).
    torch_shape: shape in PyTorch (of the whole parameter).
    flax_shape: shape in Flax.
    rows: ``(start, stop)`` when the leaf is a block of rows of the PyTorch
      parameter (``in_proj_weight``'s query, key or value third); ``None``
      for the whole parameter.
    layer: for a layer of a stacked array, where it lies; ``flax_name`` is
      then the per-layer name (``blocks/3/up/kernel``, layer 3 of
      ``blocks/up/kernel``) and ``flax_shape`` the shape of one layer.
  """

  torch_name: str
  flax_name: str
  layout: str
  torch_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]
  rows: tuple[int, int] | None = None
  layer: StackedLayer | None = None

  @property
  def array_name(self) -> str:
    """The path of the array this leaf is (or is a layer of) in the params tree."""
    return self.flax_name if self.layer is None else self.layer.array_name

  @property
  def piece_shape(self) -> tuple[int, ...]:
    """The shape of the PyTorch block this leaf holds."""
    if self.rows is None:
      return self.torch_shape
    return (self.rows[1] - self.rows[0], *self.torch_shape[1:])

  def to_flax(self, value: Any) -> np.ndarray:
    """A PyTorch-layout array (tensor or numpy, the whole parameter) in this
    leaf's Flax layout."""
    value = _to_numpy(value)
    if self.rows is not None:
      value = value[self.rows[0] : self.rows[1]]
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (0, 1), (-1, -2))
    if self.layout == "heads":
      return (value.T if value.ndim == 2 else value).reshape(self.flax_shape)
    return value

  def to_torch(self, value: Any) -> np.ndarray:
    """A Flax-layout array as the PyTorch block it came from (numpy); the
    whole parameter unless ``rows`` is set (see ``assemble`` in this module)."""
    value = np.asarray(jax.device_get(value), dtype=np.float32)
    if self.layout == "transpose":
      return value.T
    if self.layout == "conv":
      return np.moveaxis(value, (-1, -2), (0, 1))
    if self.layout == "heads":
      shape = self.piece_shape
      return value.reshape(shape[::-1]).T if len(shape) == 2 else value.reshape(shape)
    return value


def assemble(matches: Sequence[ParameterMatch], values: Any) -> dict[str, np.ndarray]:
  """``{torch_name: array}`` in PyTorch layout from Flax leaves.

  Args:
    matches: the pairs, as :func:`match_parameters` gives them.
    values: ``{flax_name: array}``, or a callable giving the array of a match.

  Returns:
    One array per PyTorch parameter; a parameter split over several leaves
    (a fused attention projection) is put back together from its blocks.
  """
  get = values if callable(values) else (lambda m: values[m.flax_name])
  pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
  for m in matches:
    pieces.setdefault(m.torch_name, []).append((m.rows[0] if m.rows else 0, m.to_torch(get(m))))
  out = {}
  for name, blocks in pieces.items():
    blocks.sort(key=lambda b: b[0])
    out[name] = blocks[0][1] if len(blocks) == 1 else np.concatenate([b for _, b in blocks], axis=0)
  return out


# --------------------------------------------------------------------------
# One-to-one rules, by module class
# --------------------------------------------------------------------------


_BATCH_NORMS = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
)
_INSTANCE_NORMS = (
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
)


def batch_norms() -> tuple[type, ...]:
  """PyTorch's batch norm classes: the modules with running statistics."""
  nn = import_torch().nn
  return tuple(getattr(nn, n) for n in _BATCH_NORMS)


def weight_rule(owner: Any) -> tuple[str, str] | None:
  """``(Flax leaf name, layout)`` of the ``weight`` of a PyTorch module;
  ``None`` for a class without a rule (the name is kept, as is)."""
  nn = import_torch().nn
  if isinstance(owner, nn.Linear):
    return "kernel", "transpose"
  if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
    return "kernel", "conv"
  if isinstance(owner, nn.Embedding):
    return "embedding", "identity"
  norms = (nn.LayerNorm, nn.GroupNorm, *batch_norms(), *(getattr(nn, n) for n in _INSTANCE_NORMS))
  if isinstance(owner, norms) or type(owner).__name__ == "RMSNorm":
    return "scale", "identity"
  return None


def leaf_rule(owner: Any, leaf: str) -> tuple[str, str]:
  """``(Flax leaf name, layout)`` of one parameter of ``owner``."""
  if leaf == "weight":
    rule = weight_rule(owner)
    if rule is not None:
      return rule
  return leaf, "identity"


def layout_for(flax_name: str, torch_ndim: int) -> str:
  """The layout a Flax leaf name implies (for names given by hand)."""
  leaf = flax_name.rsplit("/", 1)[-1]
  if leaf == "kernel" and torch_ndim == 2:
    return "transpose"
  if leaf == "kernel" and torch_ndim >= 3:
    return "conv"
  return "identity"


def role(leaf: str) -> str:
  """What a parameter is for, in either framework: ``weight`` for a PyTorch
  ``weight`` and a Flax ``kernel``/``scale``/``embedding``; else its name."""
  return "weight" if leaf in ("weight", *WEIGHT_LEAVES) else leaf


# --------------------------------------------------------------------------
# Many-to-one: converters
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Piece:
  """One Flax leaf made from (a block of) one PyTorch parameter.

  Attributes:
    torch_name: the parameter, relative to the converted module
      (``in_proj_weight``, ``out_proj.weight``).
    flax_name: the leaf, relative to the converted module's Flax modules
      (``query/kernel``); its parent path is the Flax module.
    layout: one of ``identity``, ``transpose``, ``conv``, ``heads``.
    rows: ``(start, stop)`` of the PyTorch parameter's first axis, or
      ``None`` for all of it.
  """

  torch_name: str
  flax_name: str
  layout: str = "identity"
  rows: tuple[int, int] | None = None


class ModuleConverter:
  """How one PyTorch module (with its sub-modules) becomes Flax modules.

  Subclass it for a module whose parameters do not map one to one, and pass
  an instance in ``converters=`` to :func:`match_parameters` (and every
  function that takes ``match=``). A converter takes the module and all of
  its sub-modules; the Flax modules it names (the parent paths of its
  pieces' ``flax_name``, in order of first appearance) are looked up under
  the module's Flax path when matching by name, and taken as the next Flax
  modules in registration order when matching by order.

  Example, a fused ``qkv`` ``Linear`` to three Flax ``Linear``\\ s:

    >>> import torch
    >>> from flax import nnx
    >>> from stac_optax import torch_interop
    >>> class FusedQKV(torch_interop.ModuleConverter):
    ...   def applies(self, module):
    ...     return isinstance(module, torch.nn.Linear) and module.out_features == 3 * module.in_features
    ...   def pieces(self, module):
    ...     d = module.in_features
    ...     return [torch_interop.Piece(p, f'{q}/{leaf}', layout, (i * d, (i + 1) * d))
    ...             for i, q in enumerate(('q', 'k', 'v'))
    ...             for p, leaf, layout in (('weight', 'kernel', 'transpose'), ('bias', 'bias', 'identity'))]
    >>> class Three(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.q, self.k, self.v = (nnx.Linear(4, 4, rngs=rngs) for _ in range(3))
    >>> for m in torch_interop.match_parameters(torch.nn.Linear(4, 12), Three(nnx.Rngs(0)), match='order', converters=[FusedQKV()]):
    ...   print(m.torch_name, m.rows, '->', m.flax_name, m.flax_shape)
    weight (0, 4) -> q/kernel (4, 4)
    weight (4, 8) -> k/kernel (4, 4)
    weight (8, 12) -> v/kernel (4, 4)
    bias (0, 4) -> q/bias (4,)
    bias (4, 8) -> k/bias (4,)
    bias (8, 12) -> v/bias (4,)
  """

  def applies(self, module: Any) -> bool:
    """Whether this converter handles ``module``."""
    raise NotImplementedError

  def pieces(self, module: Any) -> Sequence[Piece]:
    """The Flax leaves of ``module``, each from (a block of) one parameter;
    together they must cover every parameter of the module and its
    sub-modules, row for row."""
    raise NotImplementedError

  def flax_modules(self, module: Any) -> tuple[str, ...]:
    """The Flax modules the pieces fill, relative, in registration order."""
    return tuple(dict.fromkeys(p.flax_name.rpartition("/")[0] for p in self.pieces(module)))


class MultiheadAttentionConverter(ModuleConverter):
  """``torch.nn.MultiheadAttention`` <-> ``nnx.MultiHeadAttention`` and
  linen ``MultiHeadDotProductAttention``.

  ==============================================  =========================================
  PyTorch (``E`` = embed_dim = heads x head_dim)  Flax
  ==============================================  =========================================
  ``in_proj_weight`` rows ``[0, E)``              ``query/kernel`` ``(d, heads, head_dim)``
  rows ``[E, 2E)``, ``[2E, 3E)``                  ``key/kernel``, ``value/kernel``
  ``in_proj_bias`` (thirds)                       ``query/bias`` ... ``(heads, head_dim)``
  ``q_proj_weight`` ... (``kdim``/``vdim`` set)   ``query/kernel`` ...
  ``out_proj.weight`` ``(d, E)``                  ``out/kernel`` ``(heads, head_dim, d)``
  ``out_proj.bias``                               ``out/bias``
  ==============================================  =========================================

  One PyTorch module with its ``out_proj`` (2 counted modules) becomes 4
  Flax modules. ``add_bias_kv`` (``bias_k``, ``bias_v``) has no Flax
  counterpart and is refused.
  """

  def applies(self, module: Any) -> bool:
    return isinstance(module, import_torch().nn.MultiheadAttention)

  def pieces(self, module: Any) -> Sequence[Piece]:
    if getattr(module, "bias_k", None) is not None or getattr(module, "bias_v", None) is not None:
      raise ValueError(
          "nn.MultiheadAttention with add_bias_kv=True (bias_k, bias_v) has no Flax "
          "counterpart; write a ModuleConverter for your Flax module."
      )
    e = module.embed_dim
    out = []
    for i, name in enumerate(("query", "key", "value")):
      rows = (i * e, (i + 1) * e)
      if module.in_proj_weight is not None:
        out.append(Piece("in_proj_weight", f"{name}/kernel", "heads", rows))
      else:
        out.append(Piece(f"{'qkv'[i]}_proj_weight", f"{name}/kernel", "heads"))
      if module.in_proj_bias is not None:
        out.append(Piece("in_proj_bias", f"{name}/bias", "heads", rows))
    out.append(Piece("out_proj.weight", "out/kernel", "heads"))
    if module.out_proj.bias is not None:
      out.append(Piece("out_proj.bias", "out/bias", "identity"))
    return out


DEFAULT_CONVERTERS: tuple[ModuleConverter, ...] = (MultiheadAttentionConverter(),)


def converter_for(module: Any, converters: Sequence[ModuleConverter]) -> ModuleConverter | None:
  """The first of ``converters`` (then the defaults) that handles ``module``."""
  for c in (*converters, *DEFAULT_CONVERTERS):
    if c.applies(module):
      return c
  return None
