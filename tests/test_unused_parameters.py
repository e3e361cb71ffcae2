"""Zero gradient is not no gradient: a parameter a step does not use.

PyTorch leaves ``.grad`` at None for a parameter the loss does not reach, and
stac-optimizer skips it (no decay, no moment update). ``jax.grad`` gives it a
zero gradient, and STAC treats a zero gradient like any other: the trunk's
sign step is zero but its decay is not, and the cap decays it too. Freezing
the parameter (``trainable=`` / ``wrt=``) gives PyTorch's result.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import stac_optimizer
import torch
from flax import nnx
from torch import nn

import stac_optax
from stac_optax import torch_interop

LR, WD, STEPS = 0.1, 0.1, 3


class TorchNet(nn.Module):
  def __init__(self):
    super().__init__()
    self.a = nn.Linear(3, 4)
    self.unused = nn.Linear(4, 4)       # in the trunk
    self.b = nn.Linear(4, 2)
    self.unused_head = nn.Linear(2, 2)  # in the cap

  def forward(self, x):
    return self.b(self.a(x))  # neither unused layer is reached


class FlaxNet(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.unused = nnx.Linear(4, 4, rngs=rngs)
    self.b = nnx.Linear(4, 2, rngs=rngs)
    self.unused_head = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    return self.b(self.a(x))


UNUSED = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("unused", exact=False)))


def _batches():
  rng = np.random.default_rng(0)
  return [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(STEPS)]


def _torch_run(tm):
  opt = stac_optimizer.STAC(tm, lr=LR, weight_decay=WD, last_n_modules=2)
  for x in _batches():
    opt.zero_grad(set_to_none=True)
    (tm(torch.from_numpy(x)) ** 2).mean().backward()
    assert tm.unused.weight.grad is None and tm.unused_head.weight.grad is None
    opt.step()
  return {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}


def _jax_run(fm, tm, **kwargs):
  """STAC on ``fm`` over the same batches; the weights after, by PyTorch name."""
  tx = stac_optax.stac(fm, LR, weight_decay=WD, **kwargs)
  wrt = kwargs.get("wrt", nnx.Param)
  params = nnx.as_pure(nnx.state(fm, wrt))
  state = tx.init(params)
  for x in _batches():
    grads = nnx.as_pure(nnx.grad(lambda m, x=x: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(fm))
    flat = dict(stac_optax._tree.leaves_with_names(grads))
    if "unused/kernel" in flat:
      assert not np.any(flat["unused/kernel"])  # a zero gradient, not none
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    nnx.update(fm, params)
  return torch_interop.tree_to_torch(nnx.as_pure(nnx.state(fm, nnx.Param)), tm, target=fm)


def _pair():
  torch.manual_seed(0)
  tm = TorchNet()
  fm = FlaxNet(nnx.Rngs(0))
  nnx.update(fm, torch_interop.params_from_torch(tm, fm))
  start = {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}
  return tm, fm, start


def test_zero_gradient_is_not_no_gradient():
  tm, fm, start = _pair()
  torch_after = _torch_run(tm)
  # PyTorch: the unused layers are untouched
  for name in ("unused.weight", "unused.bias", "unused_head.weight", "unused_head.bias"):
    np.testing.assert_array_equal(torch_after[name], start[name])

  # stac_optax, default: the same split, but the zero gradients still decay
  assert stac_optax.partition_modules(fm, last_n_modules=2).adamw_module_names == ("b", "unused_head")
  default = _jax_run(fm, tm, last_n_modules=2)
  np.testing.assert_allclose(default["unused.weight"], start["unused.weight"] * (1 - LR * WD / 2) ** STEPS,
                             rtol=1e-6)  # the trunk decays at 0.5 * weight_decay in hybrid mode
  np.testing.assert_allclose(default["unused_head.weight"], start["unused_head.weight"] * (1 - LR * WD) ** STEPS,
                             rtol=1e-6)  # the cap: decay, and a zero AdamW step
  np.testing.assert_array_equal(default["unused.bias"], start["unused.bias"])  # biases are exempt
  for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
    np.testing.assert_allclose(default[name], torch_after[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_freezing_what_a_step_does_not_use_gives_pytorchs_result():
  tm, _, start = _pair()
  torch_after = _torch_run(tm)
  _, fm, _ = _pair()
  # frozen layers are not counted: the cap of 1 is 'b', as PyTorch's cap of 2 holds 'b'
  # and the unused head
  part = stac_optax.partition_modules(fm, last_n_modules=1, wrt=UNUSED)
  assert part.sign_module_names == ("a",) and part.adamw_module_names == ("b",)
  frozen = _jax_run(fm, tm, last_n_modules=1, wrt=UNUSED)
  for name, want in torch_after.items():
    np.testing.assert_allclose(frozen[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  for name in ("unused.weight", "unused_head.weight"):
    np.testing.assert_array_equal(frozen[name], start[name])
