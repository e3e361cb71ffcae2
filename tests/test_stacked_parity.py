"""An unrolled PyTorch model under ``stac-optimizer`` and its scanned JAX twin.

PyTorch has no stacked layers: its ``nn.ModuleList`` of blocks is the
reference. The JAX twin is the linen ``nn.scan`` net of
``tests/stacked_models.py``; both hold the same weights, get the same
gradients, and every parameter and cap moment is compared after every step.
Weights and gradients cross with ``torch_interop`` (``stacked_modules=``),
whose layer-by-layer mapping ``tests/test_stacked_interop.py`` checks
against a conversion by hand.
"""

import chex
import jax
import numpy as np
import optax
import pytest
import stac_optimizer
import torch

import stac_optax
from stac_optax import torch_interop
from tests import stacked_models as sm

STEPS = 10


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.up = torch.nn.Linear(sm.WIDTH, sm.HIDDEN)
    self.down = torch.nn.Linear(sm.HIDDEN, sm.WIDTH)
    self.norm = torch.nn.LayerNorm(sm.WIDTH)


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Linear(sm.WIDTH, sm.WIDTH)
    self.blocks = torch.nn.ModuleList(TorchBlock() for _ in range(sm.LAYERS))
    self.head = torch.nn.Linear(sm.WIDTH, 2)


STACKED = {"blocks": 0}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"last_n_modules": 3, "weight_decay": 0.1},  # cap: blocks.5.down, blocks.5.norm, head
        {"last_n_ratio": 0.5, "weight_decay": 0.1, "lr": 3e-3},  # cap from blocks.3.up
        {"last_n_modules": 8, "amsgrad": True},
    ],
    ids=["cut_in_last_layer", "half", "amsgrad"],
)
def test_scanned_jax_model_matches_unrolled_torch_model(kwargs):
  kwargs = dict(kwargs)
  lr = kwargs.pop("lr", 1e-2)
  params = sm.linen_scan_params()
  torch.manual_seed(0)
  tm = TorchNet()
  torch_interop.params_to_torch(params, tm, stacked_modules=STACKED)  # the JAX weights
  opt = stac_optimizer.STAC(tm, lr=lr, **kwargs)
  tx = stac_optax.stac(params, lr, stacked_modules=STACKED, module_order=sm.ORDER, **kwargs)
  (torch_cap,) = [g["module_names"] for g in opt.param_groups if g["stac_role"] == "adamw"]
  part = stac_optax.partition_modules(
      params, stacked_modules=STACKED, module_order=sm.ORDER,
      **{k: v for k, v in kwargs.items() if k in ("last_n_modules", "last_n_ratio")},
  )
  assert part.adamw_module_names == tuple(c.replace(".", "/") for c in torch_cap)
  assert part.splits_layers

  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    grads = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in tm.named_parameters()}
    for n, p in tm.named_parameters():
      p.grad = torch.from_numpy(grads[n])
    opt.step()
    stacked_grads = torch_interop.tree_from_torch(tm, grads, params, stacked_modules=STACKED)
    updates, state = update(stacked_grads, state, params)
    params = optax.apply_updates(params, updates)

    want = torch_interop.params_from_torch(tm, params, stacked_modules=STACKED)
    chex.assert_trees_all_close(params, want, rtol=1e-5, atol=1e-6)
  # the cap moments of the cut arrays are those of the cap layers in torch
  mu = state.inner_state.inner_states["adamw"].inner_state[0].mu
  cut = mu["blocks"]["down"]["kernel"]
  layers = cut.cap.shape[0]
  named = dict(tm.named_parameters())
  for i in range(layers):
    layer = sm.LAYERS - layers + i
    torch_mu = opt.state[named[f"blocks.{layer}.down.weight"]]["exp_avg"].numpy()
    np.testing.assert_allclose(np.asarray(cut.cap[i]).T, torch_mu, rtol=1e-5, atol=1e-7)
