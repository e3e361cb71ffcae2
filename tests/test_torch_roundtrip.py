"""A run carried PyTorch -> JAX -> PyTorch is the run PyTorch makes alone.

Hypothesis draws small models (a few Linear layers of random widths, maybe a
LayerNorm) and STAC configurations; N torch steps, then ``from_torch`` and M
JAX steps must equal N + M torch steps, and after ``to_torch`` K more torch
steps must equal both K more JAX steps and N + M + K torch steps.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import stac_optimizer
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stac_optax
from stac_optax import torch_interop

RTOL, ATOL = 1e-5, 1e-6


class TorchNet(nn.Module):
  def __init__(self, layers):
    super().__init__()
    for name, kind, n_in, n_out in layers:
      setattr(self, name, nn.Linear(n_in, n_out) if kind == "linear" else nn.LayerNorm(n_in))


def flax_target(layers):
  """The Flax side as a params tree in creation order, as ``Module.init``
  returns it (the weights come from PyTorch; only names and shapes count)."""
  return {
      name: {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}
      if kind == "linear" else
      {"scale": np.zeros(n_in, np.float32), "bias": np.zeros(n_in, np.float32)}
      for name, kind, n_in, n_out in layers
  }


@st.composite
def runs(draw):
  widths = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
  layers = [(f"fc{i}", "linear", a, b) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))]
  norm_at = draw(st.none() | st.integers(0, len(layers)))
  if norm_at is not None:
    width = widths[norm_at] if norm_at < len(layers) else widths[-1]
    layers.insert(norm_at, ("norm", "norm", width, width))
  cap = draw(st.one_of(
      st.builds(lambda n: {"last_n_modules": n}, st.integers(0, len(layers) + 1)),
      st.builds(lambda r: {"last_n_ratio": r}, st.sampled_from([0.0, 0.25, 0.5, 1.0])),
  ))
  config = {
      "lr": 1e-2,
      **cap,
      "amsgrad": draw(st.booleans()),
      "maximize": draw(st.booleans()),
      "weight_decay": draw(st.sampled_from([0.0, 0.1])),
      "sign_lr_scale": draw(st.sampled_from([1.0, 0.5])),
  }
  steps = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2)))
  return layers, config, steps


def _grads(module, rng):
  return {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in module.named_parameters()}


def _torch_steps(module, opt, grads):
  for g in grads:
    for n, p in module.named_parameters():
      p.grad = torch.from_numpy(g[n].copy())
    opt.step()


def _jax_steps(step, params, state, module, target, grads):
  for g in grads:
    params, state = step(torch_interop.tree_from_torch(module, g, target), state, params)
  return params, state


def _assert_same(module, opt, params, state, target):
  """Weights, moments and step count of a torch run and a JAX run agree."""
  got = torch_interop.tree_to_torch(params, module, target=target)
  adam = state.inner_state.inner_states["adamw"].inner_state[0]
  fields = {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}
  moments = {k: dict(stac_optax._tree.leaves_with_names(getattr(adam, f)))
             for k, f in fields.items() if hasattr(adam, f)}
  for m in torch_interop.match_parameters(module, target):
    p = dict(module.named_parameters())[m.torch_name]
    np.testing.assert_allclose(got[m.torch_name], p.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=m.torch_name)
    s = opt.state.get(p, {})
    assert set(s) - {"step"} == {k for k in moments if m.flax_name in moments[k]}, m.torch_name
    for key in set(s) - {"step"}:
      np.testing.assert_allclose(m.to_torch(moments[key][m.flax_name]), s[key].numpy(), rtol=RTOL, atol=ATOL,
                                 err_msg=f"{m.torch_name} {key}")
      assert int(adam.count) == int(s["step"])


@settings(max_examples=10, derandomize=True, deadline=None)
@given(runs())
def test_a_run_carried_to_jax_and_back_is_the_torch_run(run):
  layers, config, (n, m, k) = run
  torch.manual_seed(0)
  module = TorchNet(layers)
  reference = copy.deepcopy(module)
  target = flax_target(layers)
  rng = np.random.default_rng(0)
  grads = [_grads(module, rng) for _ in range(n + m + k)]

  ref_opt = stac_optimizer.STAC(reference, **config)
  opt = stac_optimizer.STAC(module, **config)
  _torch_steps(module, opt, grads[:n])
  _torch_steps(reference, ref_opt, grads[: n + m])

  tx, params, state = torch_interop.from_torch(module, opt, target)

  @jax.jit
  def step(g, state, params):  # one compilation per example, not one per eager op
    updates, state = tx.update(g, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  params, state = _jax_steps(step, params, state, module, target, grads[n : n + m])
  _assert_same(reference, ref_opt, params, state, target)

  torch_interop.to_torch(params, state, module, opt)
  _torch_steps(module, opt, grads[n + m :])
  _torch_steps(reference, ref_opt, grads[n + m :])
  params, state = _jax_steps(step, params, state, module, target, grads[n + m :])
  _assert_same(module, opt, params, state, target)
  _assert_same(reference, ref_opt, params, state, target)
