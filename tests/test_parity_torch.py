"""Update-by-update parity with the PyTorch package ``stac-optimizer`` 0.3.0.

The same model is built in PyTorch and as a Flax-style params dict (Linear
weights transposed into kernels); both optimizers get identical gradients for
many steps and every parameter and AdamW moment is compared after each one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stac_optimizer
import torch
from torch import nn

import stac_optax

RTOL, ATOL = 1e-5, 1e-6
STEPS = 20


class TorchBlock(nn.Module):
  def __init__(self, width, norm):
    super().__init__()
    self.fc1 = nn.Linear(width, width)
    self.fc2 = nn.Linear(width, width)
    self.norm = nn.LayerNorm(width) if norm else None


class TorchNet(nn.Module):
  """stem, residual blocks, optional final norm, head: like the benchmark students."""

  def __init__(self, d_in=6, width=8, d_out=3, n_blocks=6, norm=False, final_norm=False):
    super().__init__()
    self.stem = nn.Linear(d_in, width)
    self.blocks = nn.ModuleList(TorchBlock(width, norm) for _ in range(n_blocks))
    self.final_norm = nn.LayerNorm(width) if final_norm else None
    self.head = nn.Linear(width, d_out)


def to_jax_name(torch_name: str) -> str:
  module, leaf = torch_name.rsplit(".", 1) if "." in torch_name else ("", torch_name)
  jax_module = module.replace(".", "/")
  return jax_module, leaf


def jax_params_from_torch(model: nn.Module) -> dict:
  """Nested dict in registration order; Linear weight (out, in) -> kernel (in, out)."""
  params: dict = {}
  for name, p in model.named_parameters():
    module, leaf = to_jax_name(name)
    node = params
    for key in module.split("/"):
      node = node.setdefault(key, {})
    value = p.detach().numpy()
    is_norm = isinstance(model.get_submodule(module.replace("/", ".")), nn.LayerNorm)
    if leaf == "weight":
      leaf, value = ("scale", value) if is_norm else ("kernel", value.T)
    node[leaf] = jnp.asarray(value)
  return params


def torch_layout(model: nn.Module, tree: dict) -> dict:
  """Inverse of jax_params_from_torch, for any tree with the params' paths."""
  flat = dict(stac_optax.partition.leaves_with_names(tree))
  out = {}
  for name, _ in model.named_parameters():
    module, leaf = to_jax_name(name)
    is_norm = isinstance(model.get_submodule(module.replace("/", ".")), nn.LayerNorm)
    if leaf == "weight":
      value = np.asarray(flat[f"{module}/{'scale' if is_norm else 'kernel'}"])
      out[name] = value if is_norm else value.T
    else:
      out[name] = np.asarray(flat[f"{module}/{leaf}"])
  return out


def cap_moments(state):
  """(mu, nu) trees of the cap's Adam state."""
  adam = state.inner_state.inner_states["adamw"].inner_state[0]
  return adam.mu, adam.nu, getattr(adam, "nu_max", None)


def run_pair(torch_kwargs, jax_kwargs, *, nan_at=None, model_kwargs=None, seed=0):
  torch.manual_seed(seed)
  model = TorchNet(**(model_kwargs or {}))
  params = jax_params_from_torch(model)
  opt = stac_optimizer.STAC(model, **torch_kwargs)
  tx = stac_optax.stac(params, **jax_kwargs)
  state = tx.init(params)
  step = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  worst = 0.0
  for t in range(STEPS):
    grads_t = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in model.named_parameters()}
    if nan_at is not None and t == nan_at:
      grads_t["stem.weight"][0, 0] = np.nan
    for n, p in model.named_parameters():
      p.grad = torch.from_numpy(grads_t[n].copy())
    opt.step()
    # the same gradients in the JAX layout
    grads = jax.tree.map(lambda x: x, params)
    flat = {}
    for n, g in grads_t.items():
      module, leaf = to_jax_name(n)
      is_norm = isinstance(model.get_submodule(module.replace("/", ".")), nn.LayerNorm)
      key = leaf if leaf != "weight" else ("scale" if is_norm else "kernel")
      flat[f"{module}/{key}"] = g if (leaf != "weight" or is_norm) else g.T
    grads = jax.tree_util.tree_map_with_path(
        lambda path, _, flat=flat: jnp.asarray(flat[stac_optax.partition.path_name(path)]), params
    )
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)

    got = torch_layout(model, params)
    for n, p in model.named_parameters():
      want = p.detach().numpy()
      np.testing.assert_allclose(got[n], want, rtol=RTOL, atol=ATOL, err_msg=f"step {t} {n}")
      worst = max(worst, float(np.max(np.abs(got[n] - want))))
    mu, nu, nu_max = cap_moments(state)
    mus = torch_layout_partial(model, mu)
    nus = torch_layout_partial(model, nu)
    maxs = torch_layout_partial(model, nu_max) if nu_max is not None else {}
    for n, p in model.named_parameters():
      torch_state = opt.state.get(p, {})
      if n in mus:
        np.testing.assert_allclose(mus[n], torch_state["exp_avg"].numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(nus[n], torch_state["exp_avg_sq"].numpy(), rtol=RTOL, atol=ATOL)
        if maxs:
          np.testing.assert_allclose(maxs[n], torch_state["max_exp_avg_sq"].numpy(), rtol=RTOL, atol=ATOL)
      else:
        assert not torch_state, f"torch keeps state for trunk parameter {n}"
  return opt, state, worst


def torch_layout_partial(model, tree):
  """Like torch_layout for a masked state tree (trunk leaves are MaskedNode)."""
  names = dict(stac_optax.partition.leaves_with_names(tree))
  out = {}
  for name, _ in model.named_parameters():
    module, leaf = to_jax_name(name)
    is_norm = isinstance(model.get_submodule(module.replace("/", ".")), nn.LayerNorm)
    key = leaf if leaf != "weight" else ("scale" if is_norm else "kernel")
    full = f"{module}/{key}"
    if full in names:
      value = np.asarray(names[full])
      out[name] = value.T if (leaf == "weight" and not is_norm) else value
  return out


CONFIGS = {
    "default": ({}, {}),
    "weight_decay": ({"weight_decay": 1e-2}, {"weight_decay": 1e-2}),
    "explicit_decays": (
        {"weight_decay": 1e-2, "sign_weight_decay": 0.03, "adamw_weight_decay": 0.2},
        {"weight_decay": 1e-2, "sign_weight_decay": 0.03, "adamw_weight_decay": 0.2},
    ),
    "exemptions_off": (
        {"weight_decay": 0.1, "exclude_bias_from_weight_decay": False, "exclude_1d_from_weight_decay": False},
        {"weight_decay": 0.1, "exclude_bias_from_weight_decay": False, "exclude_1d_from_weight_decay": False},
    ),
    "scaled_trunk_wider_cap": (
        {"sign_lr_scale": 0.5, "last_n_ratio": 0.25, "weight_decay": 0.05},
        {"sign_lr_scale": 0.5, "last_n_ratio": 0.25, "weight_decay": 0.05},
    ),
    "amsgrad": ({"amsgrad": True, "weight_decay": 1e-2}, {"amsgrad": True, "weight_decay": 1e-2}),
    "maximize": ({"maximize": True, "weight_decay": 1e-2}, {"maximize": True, "weight_decay": 1e-2}),
    "all_trunk": ({"last_n_modules": 0, "weight_decay": 0.1}, {"last_n_modules": 0, "weight_decay": 0.1}),
    "all_cap": ({"last_n_ratio": 1.0, "weight_decay": 0.1}, {"last_n_ratio": 1.0, "weight_decay": 0.1}),
    "betas_eps": (
        {"betas": (0.8, 0.99), "eps": 1e-6, "lr": 3e-3},
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "learning_rate": 3e-3},
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_updates_match_stac_optimizer(name):
  torch_kwargs, jax_kwargs = CONFIGS[name]
  torch_kwargs = {"lr": 1e-2, **torch_kwargs}
  jax_kwargs = {"learning_rate": 1e-2, **jax_kwargs}
  _, _, worst = run_pair(torch_kwargs, jax_kwargs, model_kwargs={"norm": True, "final_norm": True})
  assert worst < 1e-4


def test_nonfinite_step_is_skipped_in_both():
  opt, state, _ = run_pair({"lr": 1e-2}, {"learning_rate": 1e-2}, nan_at=7)
  assert opt.nonfinite_skipped_steps == 1
  assert stac_optax.nonfinite_skipped_steps(state) == 1
  adam = state.inner_state.inner_states["adamw"].inner_state[0]
  assert int(adam.count) == STEPS - 1


def test_error_if_nonfinite_raises_in_both():
  torch.manual_seed(0)
  model = TorchNet()
  params = jax_params_from_torch(model)
  opt = stac_optimizer.STAC(model, error_if_nonfinite=True)
  for p in model.parameters():
    p.grad = torch.ones_like(p)
  model.head.bias.grad[0] = float("inf")
  with pytest.raises(RuntimeError, match="non-finite gradients in the STAC adamw"):
    opt.step()
  tx = stac_optax.stac(params, error_if_nonfinite=True)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["head"]["bias"] = grads["head"]["bias"].at[0].set(jnp.inf)
  with pytest.raises(RuntimeError, match=r"non-finite gradients in the STAC cap \(adamw section\), first at 'head/bias'"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.125, 0.18, 0.25, 0.5, 1.0])
def test_partition_matches_for_ratios(ratio):
  model = TorchNet(norm=True, final_norm=True)  # stem + 6 * (fc1, fc2, norm) + final_norm + head = 21
  ours = stac_optax.partition_modules(jax_params_from_torch(model), last_n_ratio=ratio)
  theirs = stac_optimizer.partition_trainable_modules(model, last_n_ratio=ratio)
  assert ours.adamw_module_names == tuple(n.replace(".", "/") for n in theirs.adamw_module_names)
  assert ours.sign_module_names == tuple(n.replace(".", "/") for n in theirs.sign_module_names)
  assert ours.resolved_last_n_modules == theirs.resolved_last_n_modules == (
      0 if ratio == 0 else min(max(math.ceil(21 * ratio), 1), 21)
  )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 21, 26])
def test_partition_matches_for_explicit_cap_sizes(n):
  model = TorchNet(norm=True, final_norm=True)
  ours = stac_optax.partition_modules(jax_params_from_torch(model), last_n_modules=n)
  theirs = stac_optimizer.partition_trainable_modules(model, last_n_modules=n)
  assert ours.adamw_module_names == tuple(m.replace(".", "/") for m in theirs.adamw_module_names)
