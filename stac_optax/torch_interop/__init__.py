"""Moving STAC runs between PyTorch (``stac-optimizer``) and stac_optax.

PyTorch is imported only when a function here is called. The functions match
the parameters of a ``torch.nn.Module`` with those of a Flax model by module
path (``blocks.5.fc2`` is ``blocks/5/fc2``) and convert layouts:

=================================  =========================  ======================
PyTorch module, parameter          Flax leaf                  layout
=================================  =========================  ======================
``Linear.weight`` (out, in)        ``kernel`` (in, out)       transposed
``Conv{1,2,3}d.weight`` (O, I, k)  ``kernel`` (k, I, O)       axes moved
``Embedding.weight``               ``embedding``              as is
norm ``weight`` (LayerNorm, ...)   ``scale``                  as is
any ``bias``                       ``bias``                   as is
any other parameter ``name``       ``name``                   as is
=================================  =========================  ======================

``name_map={torch_name: flax_path}`` overrides the names where the rules do
not fit; the layout then follows the Flax leaf (a 2-D ``kernel`` is
transposed, a conv ``kernel`` has its axes moved). ``stacked_modules=``
(as in :func:`stac_optax.stac`) matches an unrolled PyTorch model with a
scanned Flax model: ``blocks.3.up.weight`` is layer 3 of ``blocks/up/kernel``.

* :func:`params_from_torch` / :func:`params_to_torch`: weights.
* :func:`from_torch`: a torch ``STAC`` run (module + optimizer) to the
  stac_optax transformation, params and state that continue it exactly.
* :func:`to_torch`: the reverse, into a torch module and its ``STAC``.
* :func:`check_parity`: a report of how a torch model and a Flax model
  partition and update under both implementations.
"""

from stac_optax.torch_interop.convert import (
    buffers_from_torch,
    params_from_torch,
    params_to_torch,
    tree_from_torch,
    tree_to_torch,
    variables_from_torch,
)
from stac_optax.torch_interop.layouts import (
    ModuleConverter,
    MultiheadAttentionConverter,
    ParameterMatch,
    Piece,
    StackedLayer,
)
from stac_optax.torch_interop.matching import match_buffers, match_parameters
from stac_optax.torch_interop.parity import check_parity
from stac_optax.torch_interop.report import BatchParity, ParameterDiff, ParityReport
from stac_optax.torch_interop.runs import (
    flax_cap_size,
    from_torch,
    stac_kwargs_from_torch,
    to_torch,
    trainable_from_torch,
)
from stac_optax.torch_interop.target import flax_batch_stats, flax_params

__all__ = (
    "BatchParity",
    "ModuleConverter",
    "MultiheadAttentionConverter",
    "ParameterDiff",
    "ParameterMatch",
    "ParityReport",
    "Piece",
    "StackedLayer",
    "buffers_from_torch",
    "check_parity",
    "flax_batch_stats",
    "flax_cap_size",
    "flax_params",
    "from_torch",
    "match_buffers",
    "match_parameters",
    "params_from_torch",
    "params_to_torch",
    "stac_kwargs_from_torch",
    "to_torch",
    "trainable_from_torch",
    "tree_from_torch",
    "tree_to_torch",
    "variables_from_torch",
)
