"""Parity with the PyTorch package ``stac-optimizer`` (0.3.0, and 0.1.5 for the
momentum variant), on twin models built in both frameworks.

Every comparison runs the real package: the same weights, the same gradients,
and every parameter and AdamW moment compared after every step.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pathlib
import sys
from typing import Any, NamedTuple

import chex
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
from stac_optax._tree import path_name
from stac_optax.torch_interop.layouts import assemble
from stac_optax.torch_interop.parity import torch_stac_kwargs
from tests import models

RTOL, ATOL = 1e-5, 1e-6
STEPS = 20


# -- twins --------------------------------------------------------------------


def _encoder_input(rng):
  return rng.integers(0, 32, size=(4, 8))


def _dense_input(d):
  return lambda rng: rng.standard_normal((5, d)).astype(np.float32)


PAIRS = {
    # StateMemoryNet's shape, scaled down: stem, 6 residual blocks without norm, head.
    "residual_mlp": (lambda: models.TorchResidualMLP(), lambda r: models.NNXResidualMLP(rngs=r), _dense_input(12)),
    # the deep-classification student: LayerNorm in each block and a final LayerNorm.
    "deep_classification": (
        lambda: models.TorchResidualMLP(block_norm=True, final_norm=True),
        lambda r: models.NNXResidualMLP(block_norm=True, final_norm=True, rngs=r),
        _dense_input(12),
    ),
    # the same at width 32: every trunk tensor fills whole AVX-512 bfloat16
    # vectors (see test_momentum_variant_matches_0_1_5_with_bfloat16_state).
    "deep_classification_32": (
        lambda: models.TorchResidualMLP(d_in=32, width=32, block_norm=True, final_norm=True),
        lambda r: models.NNXResidualMLP(d_in=32, width=32, block_norm=True, final_norm=True, rngs=r),
        _dense_input(32),
    ),
    # tail-norm: no block norm, then bridge / final_norm / head.
    "tail_norm": (
        lambda: models.TorchResidualMLP(bridge=True, final_norm=True),
        lambda r: models.NNXResidualMLP(bridge=True, final_norm=True, rngs=r),
        _dense_input(12),
    ),
    # the sequence task's student, scaled down.
    "encoder": (lambda: models.TorchEncoder(), lambda r: models.NNXEncoder(rngs=r), _encoder_input),
    # a frozen module, a root-owned parameter and 12 sibling layers.
    "siblings": (lambda: models.TorchSiblings(), lambda r: models.NNXSiblings(rngs=r), _dense_input(6)),
}


def make_pair(name: str, seed: int = 0):
  """The torch model and its Flax twin holding the same weights."""
  make_torch, make_flax, make_input = PAIRS[name]
  torch.manual_seed(seed)
  tm = make_torch()
  fm = make_flax(nnx.Rngs(seed))
  nnx.update(fm, torch_interop.params_from_torch(tm, fm))
  return tm, fm, make_input


def trainable_of(tm, fm):
  """The Flax ``trainable`` mask equivalent to the torch requires_grad flags."""
  flags = {m.flax_name: dict(tm.named_parameters())[m.torch_name].requires_grad
           for m in torch_interop.match_parameters(tm, fm)}
  if all(flags.values()):
    return None
  return lambda name, _: flags[name]


def _as_torch_input(x):
  return torch.from_numpy(x) if x.dtype != np.int64 else torch.from_numpy(x).long()


# -- the model pairs compute the same function ------------------------------------


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_twins_have_the_same_forward_pass_and_gradients(name):
  tm, fm, make_input = make_pair(name)
  x = make_input(np.random.default_rng(0))
  out_t = tm(_as_torch_input(x))

  def loss_fn(model):
    out = model(jnp.asarray(x))
    return jnp.mean(out**2), out

  # one compiled forward and backward pass, not op by op (where each operation compiles on its own)
  grads_f, out_f = nnx.jit(nnx.grad(loss_fn, has_aux=True))(fm)
  np.testing.assert_allclose(np.asarray(out_f), out_t.detach().numpy(), rtol=1e-5, atol=1e-5)

  (out_t**2).mean().backward()
  grads_t = {n: p.grad for n, p in tm.named_parameters() if p.requires_grad}
  grads_f = nnx.as_pure(grads_f)
  flat = dict(stac_optax._tree.leaves_with_names(grads_f))
  matches = {m.torch_name: m for m in torch_interop.match_parameters(tm, fm)}
  for torch_name, g in grads_t.items():
    m = matches[torch_name]
    np.testing.assert_allclose(
        m.to_torch(flat[m.flax_name]), g.numpy(), rtol=1e-4, atol=1e-6, err_msg=torch_name
    )


# -- the same modules in the cap ---------------------------------------------------


@functools.cache
def _pair_to_partition(name):
  """:func:`make_pair`, built once per twin for the partition cases (which only read it)."""
  return make_pair(name)


def _flax_modules(names):
  return tuple(n.replace(".", "/") if n != "<root>" else n for n in names)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize(
    "kwargs",
    [{"last_n_ratio": r} for r in (0.0, 0.05, 0.125, 0.18, 0.25, 0.5, 1.0)]
    + [{"last_n_modules": n} for n in (0, 1, 2, 3, "all", "all+5")],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_partition_matches_the_reference(name, kwargs):
  tm, fm, _ = _pair_to_partition(name)
  count = stac_optimizer.partition_trainable_modules(tm).trainable_module_count
  if kwargs.get("last_n_modules") == "all":
    kwargs = {"last_n_modules": count}
  elif kwargs.get("last_n_modules") == "all+5":
    kwargs = {"last_n_modules": count + 5}
  theirs = stac_optimizer.partition_trainable_modules(tm, **kwargs)
  ours = stac_optax.partition_modules(fm, trainable=trainable_of(tm, fm), **kwargs)
  assert ours.sign_module_names == _flax_modules(theirs.sign_module_names)
  assert ours.adamw_module_names == _flax_modules(theirs.adamw_module_names)
  assert ours.trainable_module_count == theirs.trainable_module_count


def test_expected_cap_of_the_state_memory_net_shape():
  tm, fm, _ = make_pair("residual_mlp")
  part = stac_optax.partition_modules(fm)
  assert part.trainable_module_count == 14 == math.ceil(14 / 0.125) // 8
  assert part.adamw_module_names == ("blocks/5/fc2", "head")
  assert stac_optimizer.partition_trainable_modules(tm).adamw_module_names == ("blocks.5.fc2", "head")


def test_siblings_partition_has_root_module_and_creation_order():
  tm, fm, _ = make_pair("siblings")
  part = stac_optax.partition_modules(fm, trainable=models.siblings_trainable, last_n_modules=3)
  assert part.modules[0].name == "<root>"
  assert part.adamw_module_names == ("layer_9", "layer_10", "layer_11")
  assert part.frozen_parameter_names == ("frozen_proj/kernel", "frozen_proj/bias")
  theirs = stac_optimizer.partition_trainable_modules(tm, last_n_modules=3)
  assert theirs.sign_module_names[0] == "<root>"
  assert theirs.adamw_module_names == ("layer_9", "layer_10", "layer_11")


def test_linen_twin_partitions_like_the_reference():
  tm = models.TorchResidualMLP(block_norm=True, final_norm=True)
  variables = models.LinenResidualMLP(block_norm=True, final_norm=True).init(
      jax.random.key(0), jnp.ones((1, 12))
  )
  to_linen = {f"blocks/{i}": f"blocks_{i}" for i in range(6)}
  for ratio in (0.125, 0.25, 0.5):
    theirs = stac_optimizer.partition_trainable_modules(tm, last_n_ratio=ratio)
    ours = stac_optax.partition_modules(variables, last_n_ratio=ratio)
    expected = tuple(
        "/".join([to_linen.get("/".join(n.split(".")[:2]), n.split(".")[0])] + n.split(".")[2:])
        if n.startswith("blocks.") else n
        for n in theirs.adamw_module_names
    )
    assert ours.adamw_module_names == expected


# -- update by update --------------------------------------------------------------


def _cap_adam(state):
  return state.inner_state.inner_states["adamw"].inner_state[0]


class UpdateRun(NamedTuple):
  """What :func:`run_updates` leaves: both optimizers, the JAX params, and
  the worst parameter difference over the steps."""

  opt: Any
  model: Any
  state: Any
  params: Any
  worst: float


def _grads_tree(params, matches, grads):
  """:func:`torch_interop.tree_from_torch` of ``grads`` into the plain ``params``
  tree, with the matches made once (the public function matches on every call)."""
  values = {m.flax_name: m.to_flax(grads[m.torch_name]) for m in matches}
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(values[path_name(path)], x.dtype), params)


def _params_dict(params, matches):
  """:func:`torch_interop.tree_to_torch` of ``params``, with the matches made once."""
  flat = dict(stac_optax._tree.leaves_with_names(params))
  return assemble(matches, lambda m: flat[m.flax_name])


def _converted(tm, fm, matches, grads, params, check):
  """The gradients as a JAX tree and a function giving the params in PyTorch's
  layout; with ``check`` (the first step) both are checked equal to the public
  conversions."""
  flax_grads = _grads_tree(params, matches, grads)
  if not check:
    return flax_grads, functools.partial(_params_dict, matches=matches)
  chex.assert_trees_all_equal(flax_grads, nnx.as_pure(torch_interop.tree_from_torch(tm, grads, fm)))

  def to_torch(new_params):
    got = _params_dict(new_params, matches)
    chex.assert_trees_all_equal(got, torch_interop.tree_to_torch(new_params, tm, target=fm))
    return got

  return flax_grads, to_torch


def run_updates(name, torch_kwargs, jax_kwargs, *, steps=STEPS, nan_at=None, seed=0, device="cpu"):
  """Both optimizers, identical gradients; every parameter and moment compared.

  The PyTorch model steps on ``device``; JAX on its default device.
  """
  tm, fm, _ = make_pair(name, seed)
  matches = torch_interop.match_parameters(tm, fm)
  params = torch_interop.flax_params(fm)
  tm.to(device)
  opt = stac_optimizer.STAC(tm, **torch_kwargs)
  tx = stac_optax.stac(fm, trainable=trainable_of(tm, fm), **jax_kwargs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  worst = 0.0
  torch_params = dict(tm.named_parameters())
  for t in range(steps):
    grads = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in torch_params.items()}
    if nan_at == t:
      first = next(n for n, p in torch_params.items() if p.requires_grad)
      grads[first].flat[0] = np.nan
    for n, p in torch_params.items():
      p.grad = torch.from_numpy(grads[n].copy()).to(device) if p.requires_grad else None
    opt.step()
    flax_grads, to_torch = _converted(tm, fm, matches, grads, params, check=t == 0)
    updates, state = update(flax_grads, state, params)
    params = optax.apply_updates(params, updates)

    got = to_torch(params)
    adam = _cap_adam(state)
    moments = {
        key: dict(stac_optax._tree.leaves_with_names(getattr(adam, field)))
        for key, field in (("exp_avg", "mu"), ("exp_avg_sq", "nu"), ("max_exp_avg_sq", "nu_max"))
        if hasattr(adam, field)
    }
    for m in matches:
      want = torch_params[m.torch_name].detach().cpu().numpy()
      np.testing.assert_allclose(got[m.torch_name], want, rtol=RTOL, atol=ATOL, err_msg=f"step {t} {m.torch_name}")
      worst = max(worst, float(np.abs(got[m.torch_name] - want).max()))
      torch_state = opt.state.get(torch_params[m.torch_name], {})
      in_cap = m.flax_name in moments["exp_avg"]
      assert in_cap == ("exp_avg" in torch_state), m.torch_name
      for key, values in moments.items():
        if in_cap:
          np.testing.assert_allclose(
              m.to_torch(values[m.flax_name]), torch_state[key].cpu().numpy(), rtol=RTOL, atol=ATOL,
              err_msg=f"step {t} {key} {m.torch_name}",
          )
  return UpdateRun(opt, tm, state, params, worst)


CONFIGS = {
    "default": {},
    "weight_decay": {"weight_decay": 1e-2},
    "explicit_decays": {"weight_decay": 1e-2, "sign_weight_decay": 0.03, "adamw_weight_decay": 0.2},
    "exemptions_off": {"weight_decay": 0.1, "exclude_bias_from_weight_decay": False,
                       "exclude_1d_from_weight_decay": False},
    "scaled_trunk_wider_cap": {"sign_lr_scale": 0.5, "last_n_ratio": 0.25, "weight_decay": 0.05},
    "amsgrad": {"amsgrad": True, "weight_decay": 1e-2},
    "maximize": {"maximize": True, "weight_decay": 1e-2},
    "all_trunk": {"last_n_modules": 0, "weight_decay": 0.1},
    "all_cap": {"last_n_ratio": 1.0, "weight_decay": 0.1},
    "betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-6},
}


def _split_kwargs(config):
  torch_kwargs = torch_stac_kwargs(config)
  return {"lr": 1e-2, **torch_kwargs}, {"learning_rate": 1e-2, **config}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_updates_match_on_the_deep_classification_twin(config):
  torch_kwargs, jax_kwargs = _split_kwargs(CONFIGS[config])
  worst = run_updates("deep_classification", torch_kwargs, jax_kwargs).worst
  print(f"{config}: worst |diff| over {STEPS} steps = {worst:.2e}")


@pytest.mark.parametrize("name", ["residual_mlp", "tail_norm", "encoder", "siblings"])
@pytest.mark.parametrize("config", ["default", "weight_decay"])
def test_updates_match_on_every_twin(name, config):
  torch_kwargs, jax_kwargs = _split_kwargs(CONFIGS[config])
  run_updates(name, torch_kwargs, jax_kwargs)


def test_nonfinite_step_is_skipped_by_both():
  opt, _, state, _, _ = run_updates("deep_classification", {"lr": 1e-2}, {"learning_rate": 1e-2}, nan_at=7)
  assert opt.nonfinite_skipped_steps == stac_optax.nonfinite_skipped_steps(state) == 1
  assert int(_cap_adam(state).count) == STEPS - 1


@pytest.mark.parametrize("section, param", [("sign", "stem.weight"), ("adamw", "head.bias")])
def test_error_if_nonfinite_raises_in_both(section, param):
  tm, fm, _ = make_pair("deep_classification")
  opt = stac_optimizer.STAC(tm, error_if_nonfinite=True)
  grads = {n: np.ones(tuple(p.shape), np.float32) for n, p in tm.named_parameters()}
  grads[param].flat[0] = np.inf
  for n, p in tm.named_parameters():
    p.grad = torch.from_numpy(grads[n].copy())
  before = {n: p.detach().clone() for n, p in tm.named_parameters()}
  with pytest.raises(RuntimeError, match=f"non-finite gradients in the STAC {section}"):
    opt.step()
  assert all(torch.equal(before[n], p) for n, p in tm.named_parameters())

  params = torch_interop.flax_params(fm)
  tx = stac_optax.stac(fm, error_if_nonfinite=True)
  section_name = {"sign": r"trunk \(sign section\)", "adamw": r"cap \(adamw section\)"}[section]
  with pytest.raises(RuntimeError, match=f"non-finite gradients in the STAC {section_name}"):
    jax.block_until_ready(jax.jit(tx.update)(nnx.as_pure(torch_interop.tree_from_torch(tm, grads, fm)), tx.init(params), params))


# -- the 0.1.x momentum variant against stac-optimizer 0.1.5 -------------------------


def load_stac015():
  """stac-optimizer 0.1.5, installed beside 0.3.0 by scripts/test.sh (``pip
  install --target``; the folder is ``$STAC_OPTIMIZER_015``)."""
  root = pathlib.Path(os.environ.get(
      "STAC_OPTIMIZER_015",
      pathlib.Path(__file__).resolve().parents[1] / ".venv" / "stac-optimizer-0.1.5",
  ))
  init = root / "stac_optimizer" / "__init__.py"
  assert init.exists(), (
      f"stac-optimizer 0.1.5 not found at {root}; scripts/test.sh installs it "
      "(or set STAC_OPTIMIZER_015 to a `pip install --target` folder)."
  )
  if "stac_optimizer_015" in sys.modules:
    return sys.modules["stac_optimizer_015"]
  spec = importlib.util.spec_from_file_location(
      "stac_optimizer_015", init, submodule_search_locations=[str(init.parent)]
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its own relative imports resolve through it
  spec.loader.exec_module(module)
  assert module.STAC.__init__.__kwdefaults__["sign_momentum"] == 0.9
  return module


@pytest.fixture(scope="module")
def stac015():
  return load_stac015()


def run_momentum_variant(stac015, state_dtype, pair="deep_classification", steps=STEPS, wd=1e-2, lr=1e-2,
                         device="cpu"):
  """stac-optimizer 0.1.5 (on ``device``) and the 0.1.x variant of stac_optax
  on identical gradients: per step, ``(name, jax param, torch param,
  (jax buffer, torch buffer) or None)`` for every parameter."""
  tm, fm, _ = make_pair(pair)
  matches = torch_interop.match_parameters(tm, fm)
  params = torch_interop.flax_params(fm)
  tm.to(device)
  opt = stac015.STAC(tm, lr=lr, last_n_layers=1, sign_momentum=0.9, weight_decay=wd,
                     sign_state_dtype=None if state_dtype is None else torch.bfloat16)
  tx = stac_optax.stac(
      fm, lr, sign_momentum=0.9, sign_lr_scale=0.75, last_n_modules=1, weight_decay=wd,
      sign_weight_decay=wd, exclude_bias_from_weight_decay=False, exclude_1d_from_weight_decay=False,
      sign_state_dtype=state_dtype,
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  torch_params = dict(tm.named_parameters())
  history = []
  for t in range(steps):
    grads = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in torch_params.items()}
    for n, p in torch_params.items():
      p.grad = torch.from_numpy(grads[n].copy()).to(device)
    opt.step()
    flax_grads, to_torch = _converted(tm, fm, matches, grads, params, check=t == 0)
    updates, state = update(flax_grads, state, params)
    params = optax.apply_updates(params, updates)
    got = to_torch(params)
    buffers = dict(stac_optax._tree.leaves_with_names(
        state.inner_state.inner_states["sign"].inner_state[0].momentum
    ))
    step_record = []
    for m in matches:
      want = torch_params[m.torch_name].detach().cpu().numpy().copy()  # torch steps in place
      torch_state = opt.state.get(torch_params[m.torch_name], {})
      buf = torch_state.get("sign_momentum_buffer")
      step_record.append((
          m.torch_name, got[m.torch_name], want,
          None if buf is None else (m.to_torch(np.asarray(buffers[m.flax_name], np.float32)),
                                    buf.float().cpu().numpy().copy()),
      ))
    history.append(step_record)
  assert opt.partition.adamw_layer_names == ("head",)
  return history


def test_momentum_variant_matches_0_1_5_in_float32(stac015):
  history = run_momentum_variant(stac015, None)
  for t, record in enumerate(history):
    for name, got, want, buffers in record:
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"step {t} {name}")
      if buffers is not None:
        np.testing.assert_allclose(*buffers, rtol=RTOL, atol=ATOL, err_msg=f"step {t} buffer {name}")


def test_momentum_variant_matches_0_1_5_with_bfloat16_state(stac015):
  """PyTorch's CPU kernels round a bfloat16 buffer's ``mul_``/``add_``
  coefficients to bfloat16 in their vectorized loop and differently in the
  scalar loop that handles a tensor's last ``numel % vector_width`` elements
  (32 bfloat16 values with AVX-512), a property of the kernels, not of STAC.
  stac_optax follows the vectorized rule, so this twin uses width 32."""
  history = run_momentum_variant(stac015, jnp.bfloat16, pair="deep_classification_32")
  same = total = buf_same = buf_total = 0
  worst = 0.0
  for record in history:
    for _, got, want, buffers in record:
      same += int(np.sum(np.isclose(got, want, rtol=RTOL, atol=ATOL)))
      total += got.size
      worst = max(worst, float(np.abs(got - want).max()))
      if buffers is not None:
        buf_same += int(np.sum(buffers[0] == buffers[1]))
        buf_total += buffers[0].size
  param_fraction, buffer_fraction = same / total, buf_same / buf_total
  print(f"bfloat16 state: {param_fraction:.5%} of parameter elements within tolerance, "
        f"{buffer_fraction:.5%} of buffer elements identical, worst |diff| {worst:.2e}")
  assert param_fraction >= 0.999
  assert buffer_fraction >= 0.999


# -- a real training run in both frameworks ------------------------------------------


def test_training_curves_agree():
  """30 steps of STAC on a teacher-student regression, same weights and batches."""
  tm, fm, _ = make_pair("deep_classification", seed=3)
  rng = np.random.default_rng(3)
  teacher = rng.standard_normal((12, 4)).astype(np.float32)
  x_all = rng.standard_normal((30, 32, 12)).astype(np.float32)
  y_all = np.tanh(x_all @ teacher)
  opt = stac_optimizer.STAC(tm, lr=3e-3, weight_decay=1e-2)
  tx = stac_optax.stac(fm, 3e-3, weight_decay=1e-2)
  optimizer = nnx.Optimizer(fm, tx, wrt=nnx.Param)

  @nnx.jit
  def jax_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  torch_losses, jax_losses = [], []
  for x, y in zip(x_all, y_all, strict=True):
    opt.zero_grad()
    loss = torch.mean((tm(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
    loss.backward()
    opt.step()
    torch_losses.append(loss.item())
    jax_losses.append(float(jax_step(fm, optimizer, jnp.asarray(x), jnp.asarray(y))))
  torch_losses, jax_losses = np.array(torch_losses), np.array(jax_losses)
  assert torch_losses[-1] < 0.5 * torch_losses[0]
  rel = np.abs(jax_losses - torch_losses) / torch_losses
  print(f"training parity: worst relative loss difference over 30 steps {rel.max():.2e}")
  np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)
