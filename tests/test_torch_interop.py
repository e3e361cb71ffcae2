"""Carrying runs between stac-optimizer and stac_optax, and users' parity checks."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stac_optimizer
import torch
from flax import nnx

import stac_optax
from stac_optax import torch_interop
from tests import models
from tests.test_parity_torch import make_pair

RTOL, ATOL = 1e-5, 1e-6


def _grads(tm, rng):
  return {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in tm.named_parameters()}


def _torch_steps(tm, opt, rng, steps, nan_at=()):
  for t in range(steps):
    grads = _grads(tm, rng)
    if t in nan_at:
      grads["head.bias"][0] = np.nan
    for n, p in tm.named_parameters():
      p.grad = torch.from_numpy(grads[n])
    opt.step()


def _jax_steps(tx, params, state, tm, fm, rng, steps):
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(nnx.as_pure(torch_interop.tree_from_torch(tm, _grads(tm, rng), fm)), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_same_run(tm, opt, params, state, fm):
  got = torch_interop.tree_to_torch(params, tm, target=fm)
  adam = state.inner_state.inner_states["adamw"].inner_state[0]
  mu = dict(stac_optax._tree.leaves_with_names(adam.mu))
  nu = dict(stac_optax._tree.leaves_with_names(adam.nu))
  for m in torch_interop.match_parameters(tm, fm):
    p = dict(tm.named_parameters())[m.torch_name]
    np.testing.assert_allclose(got[m.torch_name], p.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=m.torch_name)
    s = opt.state.get(p, {})
    if "exp_avg" in s:
      np.testing.assert_allclose(m.to_torch(mu[m.flax_name]), s["exp_avg"].numpy(), rtol=RTOL, atol=ATOL)
      np.testing.assert_allclose(m.to_torch(nu[m.flax_name]), s["exp_avg_sq"].numpy(), rtol=RTOL, atol=ATOL)
      assert int(adam.count) == int(s["step"])


@pytest.mark.parametrize("kwargs", [{"weight_decay": 1e-2}, {"amsgrad": True, "last_n_ratio": 0.25, "sign_lr_scale": 0.5}])
def test_ten_torch_steps_then_ten_jax_steps_equal_twenty_torch_steps(kwargs):
  tm, fm, _ = make_pair("deep_classification")
  reference = copy.deepcopy(tm)
  opt = stac_optimizer.STAC(tm, lr=1e-2, **kwargs)
  ref_opt = stac_optimizer.STAC(reference, lr=1e-2, **kwargs)
  _torch_steps(tm, opt, np.random.default_rng(0), 10, nan_at=(4,))
  rng = np.random.default_rng(0)
  _torch_steps(reference, ref_opt, rng, 20, nan_at=(4,))

  tx, params, state = torch_interop.from_torch(tm, opt, fm)
  assert stac_optax.nonfinite_skipped_steps(state) == 1
  rng = np.random.default_rng(0)
  _torch_steps(copy.deepcopy(tm), stac_optimizer.STAC(copy.deepcopy(tm)), rng, 10)  # advance rng
  params, state = _jax_steps(tx, params, state, tm, fm, rng, 10)
  _assert_same_run(reference, ref_opt, params, state, fm)
  assert ref_opt.nonfinite_skipped_steps == stac_optax.nonfinite_skipped_steps(state)


def test_ten_jax_steps_then_ten_torch_steps_equal_twenty_jax_steps():
  tm, fm, _ = make_pair("deep_classification")
  tx = stac_optax.stac(fm, 1e-2, weight_decay=1e-2)
  params = torch_interop.flax_params(fm)
  rng = np.random.default_rng(1)
  params, state = _jax_steps(tx, params, tx.init(params), tm, fm, rng, 10)
  rng_after_10 = copy.deepcopy(rng)
  ref_params, ref_state = _jax_steps(tx, params, state, tm, fm, rng, 10)

  opt = stac_optimizer.STAC(tm, lr=1e-2, weight_decay=1e-2)
  torch_interop.to_torch(params, state, tm, opt)
  _torch_steps(tm, opt, rng_after_10, 10)
  _assert_same_run(tm, opt, ref_params, ref_state, fm)


def test_from_torch_reads_the_hyperparameters():
  tm, fm, _ = make_pair("residual_mlp")
  opt = stac_optimizer.STAC(tm, lr=3e-3, last_n_ratio=0.25, sign_lr_scale=0.5, weight_decay=0.1,
                            betas=(0.8, 0.95), eps=1e-7, amsgrad=True)
  kwargs = torch_interop.stac_kwargs_from_torch(opt)
  assert kwargs["learning_rate"] == 3e-3 and kwargs["last_n_modules"] == 4
  assert kwargs["sign_weight_decay"] == pytest.approx(0.05) and kwargs["adamw_weight_decay"] == 0.1
  assert (kwargs["b1"], kwargs["b2"], kwargs["eps"], kwargs["amsgrad"]) == (0.8, 0.95, 1e-7, True)
  assert kwargs == torch_interop.stac_kwargs_from_torch(opt.state_dict())


def test_from_torch_refuses_a_different_partition():
  tm, fm, _ = make_pair("siblings")
  opt = stac_optimizer.STAC(tm)

  class Reordered(nnx.Module):  # the same layers registered in reverse order
    def __init__(self, rngs):
      for i in reversed(range(models.N_SIBLINGS)):
        setattr(self, f"layer_{i}", nnx.Linear(6, 6, rngs=rngs))
      self.frozen_proj = nnx.Linear(6, 6, rngs=rngs)
      self.temperature = nnx.Param(jnp.asarray(1.5))

  with pytest.raises(ValueError, match="partitions differ in the sign section"):
    torch_interop.from_torch(tm, opt, Reordered(nnx.Rngs(0)))


def test_check_parity_reports_agreement_and_disagreement():
  tm, fm, _ = make_pair("encoder")
  report = torch_interop.check_parity(tm, fm, steps=4, weight_decay=1e-2)
  assert report.ok and report.partition_matches
  assert report.flax_cap == ("layers/1/ff2", "final_norm", "head")  # ceil(20 * 0.125) = 3
  assert report.worst_abs_diff < 1e-5
  text = str(report)
  assert "OK" in text and "layers.1.ff2.weight" in text and "cap in PyTorch: layers.1.ff2, final_norm, head" in text

  # a Flax model whose layers are registered in another order partitions differently
  tm2, _, _ = make_pair("residual_mlp")

  class Swapped(nnx.Module):
    def __init__(self, rngs):
      self.head = nnx.Linear(16, 4, rngs=rngs)
      self.stem = nnx.Linear(12, 16, rngs=rngs)
      self.blocks = nnx.List([models.NNXBlock(16, False, rngs) for _ in range(6)])

  bad = torch_interop.check_parity(tm2, Swapped(nnx.Rngs(0)), steps=2)
  assert not bad.partition_matches and not bad.ok
  assert "MISMATCH" in str(bad) and "<- differs" in str(bad)


def test_check_parity_and_from_torch_take_a_builder_and_a_rebuilt_model():
  tm, fm, _ = make_pair("encoder")
  build = lambda: models.NNXEncoder(rngs=nnx.Rngs(0))  # noqa: E731
  assert type(fm) is models.NNXEncoder
  report = torch_interop.check_parity(tm, build, steps=2, weight_decay=1e-2)
  assert report.ok and report.partition_matches
  assert report.flax_cap == ("layers/1/ff2", "final_norm", "head")
  rebuilt = nnx.merge(*nnx.split(fm))  # attributes now in sorted order
  assert torch_interop.check_parity(tm, rebuilt, steps=2).flax_cap == report.flax_cap


def test_check_parity_leaves_both_models_untouched():
  tm, fm, _ = make_pair("residual_mlp")
  before_t = {n: p.detach().clone() for n, p in tm.named_parameters()}
  before_f = jax.tree.map(np.asarray, torch_interop.flax_params(fm))
  torch_interop.check_parity(tm, fm, steps=2)
  assert all(torch.equal(before_t[n], p) for n, p in tm.named_parameters())
  jax.tree.map(np.testing.assert_array_equal, torch_interop.flax_params(fm), before_f)


def test_names_and_shapes_that_do_not_match_are_reported():
  tm, fm, _ = make_pair("residual_mlp")
  with pytest.raises(ValueError, match=r"'head.weight' -> 'head/kernel': no such Flax leaf"):
    torch_interop.match_parameters(tm, {k: v for k, v in torch_interop.flax_params(fm).items() if k != "head"})
  other = models.NNXResidualMLP(width=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'stem.weight' \(16, 12\) -> 'stem/kernel' \(12, 8\): shapes differ"):
    torch_interop.match_parameters(tm, other)
  with pytest.raises(ValueError, match="name_map names unknown PyTorch parameters"):
    torch_interop.match_parameters(tm, fm, name_map={"nope.weight": "stem/kernel"})


def test_name_map_matches_a_linen_twin():
  tm = models.TorchResidualMLP(block_norm=True, final_norm=True)
  variables = models.LinenResidualMLP(block_norm=True, final_norm=True).init(jax.random.key(0), jnp.ones((1, 12)))
  name_map = {}
  for name, _ in tm.named_parameters():
    if name.startswith("blocks."):
      _, i, layer, leaf = name.split(".")
      leaf = {"weight": "scale" if layer == "norm" else "kernel", "bias": "bias"}[leaf]
      name_map[name] = f"blocks_{i}/{layer}/{leaf}"
  with pytest.raises(ValueError, match="Pass name_map"):
    torch_interop.params_from_torch(tm, variables)
  params = torch_interop.params_from_torch(tm, variables, name_map=name_map)
  x = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
  out = models.LinenResidualMLP(block_norm=True, final_norm=True).apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), tm(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
  report = torch_interop.check_parity(tm, variables, steps=3, name_map=name_map, last_n_ratio=0.25)
  assert report.ok, str(report)


def test_params_round_trip_and_conv_layout():
  conv_t = torch.nn.Conv2d(3, 5, kernel_size=(2, 4))
  conv_f = nnx.Conv(3, 5, kernel_size=(2, 4), padding="VALID", rngs=nnx.Rngs(0))
  nnx.update(conv_f, torch_interop.params_from_torch(conv_t, conv_f))
  x = np.random.default_rng(0).standard_normal((1, 3, 6, 7)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(conv_f(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2),
      conv_t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5,
  )
  fresh = torch.nn.Conv2d(3, 5, kernel_size=(2, 4))
  torch_interop.params_to_torch(conv_f, fresh)
  assert torch.equal(fresh.weight, conv_t.weight) and torch.equal(fresh.bias, conv_t.bias)


def test_running_statistics_carry_into_nnx_batch_stats_and_back():
  torch.manual_seed(0)
  tm = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.1))
  with torch.no_grad():
    tm(torch.randn(16, 3))  # train mode: running statistics move
  tm.eval()

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  fm = Net(nnx.Rngs(0))
  state = torch_interop.variables_from_torch(tm, fm, match="order")
  assert type(state["norm"]["var"]) is nnx.BatchStat
  nnx.update(fm, state)
  np.testing.assert_array_equal(np.asarray(fm.norm.mean[...]), tm[1].running_mean.numpy())
  x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x))), tm(torch.from_numpy(x)).detach().numpy(),
                             rtol=1e-5, atol=1e-5)
  fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
  torch_interop.params_to_torch(fm, fresh, match="order")
  assert torch.equal(fresh[1].running_var, tm[1].running_var) and torch.equal(fresh[0].weight, tm[0].weight)
  assert int(fresh[1].num_batches_tracked) == 0  # not carried: Flax counts no batches
