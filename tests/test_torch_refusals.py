"""from_torch and to_torch refuse what stac-optimizer refuses, and more.

Every refused state dict is also handed to the PyTorch package's own
``STAC.load_state_dict`` (and, where that accepts it, to one ``step``), so
each case records what PyTorch does with the same dict. Where PyTorch
accepts a dict that stac_optax refuses, the case says why.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import pytest
import stac_optimizer
import torch
from flax import nnx
from torch import nn

import stac_optax
from stac_optax import torch_interop

# -- a tiny twin pair: a -> n -> b (3 counted modules) ---------------------------


class TorchNet(nn.Module):
  def __init__(self, d_out=2, reverse=False):
    super().__init__()
    layers = [("a", nn.Linear(3, 4)), ("n", nn.LayerNorm(4)), ("b", nn.Linear(4, d_out))]
    for name, layer in reversed(layers) if reverse else layers:
      setattr(self, name, layer)


class FlaxNet(nnx.Module):
  def __init__(self, d_out=2):
    rngs = nnx.Rngs(0)
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.n = nnx.LayerNorm(4, rngs=rngs)
    self.b = nnx.Linear(4, d_out, rngs=rngs)


def _step(module, opt, seed=0):
  gen = torch.Generator().manual_seed(seed)
  for p in module.parameters():
    p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
  opt.step()


def trained(config=None, d_out=2, reverse=False, steps=2):
  """A TorchNet after ``steps`` STAC steps, its optimizer and a Flax twin."""
  config = {"lr": 1e-2, "last_n_modules": 1, **(config or {})}
  torch.manual_seed(0)
  tm = TorchNet(d_out, reverse)
  fm = FlaxNet(d_out)
  nnx.update(fm, torch_interop.params_from_torch(tm, fm))
  opt = stac_optimizer.STAC(tm, **config)
  for t in range(steps):
    _step(tm, opt, t)
  return tm, fm, opt


def snapshot(x):
  return copy.deepcopy(x)


def assert_same(a, b):
  """Nested dicts / lists / tensors are equal (tensors by value)."""
  if isinstance(a, torch.Tensor):
    assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
  elif isinstance(a, dict):
    assert isinstance(b, dict) and list(a) == list(b)
    for k in a:
      assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
      assert_same(x, y)
  else:
    assert a == b or (a != a and b != b), (a, b)


def torch_verdict(tm, bad, config) -> str:
  """What stac-optimizer does with ``bad`` on a copy of ``tm``:
  ``"load: ValueError"``, ``"step: KeyError"`` (loads, then fails at the
  next step) or ``"accepts"`` (loads and steps)."""
  module = copy.deepcopy(tm)
  opt = stac_optimizer.STAC(module, **{"lr": 1e-2, "last_n_modules": 1, **(config or {})})
  try:
    opt.load_state_dict(copy.deepcopy(bad))
  except Exception as e:  # noqa: BLE001 - the verdict names the type
    return f"load: {type(e).__name__}"
  try:
    _step(module, opt, 7)
  except Exception as e:  # noqa: BLE001
    return f"step: {type(e).__name__}"
  return "accepts"


# -- from_torch: one case per refusal -------------------------------------------


def _sd(opt):
  return copy.deepcopy(opt.state_dict())


def _group(sd, role):
  return next(g for g in sd["param_groups"] if g["stac_role"] == role)


def _other_widths(tm, fm, opt):
  _, _, other = trained(d_out=3)
  return tm, fm, _sd(other)


def _wrong_name(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "adamw")["param_names"] = ("b.weight", "wrong_name")
  return tm, fm, sd


def _adam_state_on_trunk(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][0] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(4, 3), "exp_avg_sq": torch.zeros(4, 3)}
  return tm, fm, sd


def _legacy_buffer_of_other_shape(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][0] = {"sign_momentum_buffer": torch.zeros(7)}
  return tm, fm, sd


def _other_registration_order(tm, fm, opt):
  _, _, other = trained(reverse=True)  # same names; its cap is 'a', not 'b'
  return tm, fm, _sd(other)


def _indices_and_names_disagree(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "adamw")["params"] = _group(sd, "adamw")["params"][:1]
  return tm, fm, sd


def _frozen_since_saved(tm, fm, opt):
  sd = _sd(opt)
  tm = copy.deepcopy(tm)
  tm.a.weight.requires_grad_(False)
  return tm, fm, sd


def _no_stac_role(tm, fm, opt):
  sd = _sd(opt)
  for g in sd["param_groups"]:
    del g["stac_role"]
  return tm, fm, sd


def _cap_count_beyond_the_model(tm, fm, opt):
  sd = _sd(opt)
  for g in sd["param_groups"]:
    g["resolved_last_n_modules"] = 5
  return tm, fm, sd


def _stray_state_entry(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][9] = copy.deepcopy(sd["state"][4])
  return tm, fm, sd


def _index_listed_twice(tm, fm, opt):
  sd = _sd(opt)
  cap = _group(sd, "adamw")
  cap["params"] = [cap["params"][0], cap["params"][0]]
  return tm, fm, sd


def _some_cap_state_missing(tm, fm, opt):
  sd = _sd(opt)
  del sd["state"][5]
  return tm, fm, sd


def _different_step_counts(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][5]["step"] = torch.tensor(1.0)
  return tm, fm, sd


def _fractional_step(tm, fm, opt):
  sd = _sd(opt)
  for i in (4, 5):
    sd["state"][i]["step"] = torch.tensor(2.5)
  return tm, fm, sd


def _moment_missing(tm, fm, opt):
  sd = _sd(opt)
  del sd["state"][4]["exp_avg_sq"]
  return tm, fm, sd


def _amsgrad_max_missing(tm, fm, opt):
  sd = _sd(opt)
  del sd["state"][4]["max_exp_avg_sq"]
  return tm, fm, sd


def _max_without_amsgrad(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][4]["max_exp_avg_sq"] = sd["state"][4]["exp_avg_sq"].clone()
  return tm, fm, sd


def _integer_moment(tm, fm, opt):
  sd = _sd(opt)
  sd["state"][4]["exp_avg"] = torch.zeros(2, 4, dtype=torch.int64)
  return tm, fm, sd


def _hyperparameter_missing(tm, fm, opt):
  sd = _sd(opt)
  del _group(sd, "adamw")["betas"]
  return tm, fm, sd


def _beta_out_of_range(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "adamw")["betas"] = (0.9, 1.5)
  return tm, fm, sd


def _negative_lr(tm, fm, opt):
  sd = _sd(opt)
  for g in sd["param_groups"]:
    g["lr"] = -1e-2
  return tm, fm, sd


def _sections_disagree_on_maximize(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "sign")["maximize"] = True
  return tm, fm, sd


def _trunk_rate_apart(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "sign")["lr"] *= 2
  return tm, fm, sd


def _decay_mask_against_the_flags(tm, fm, opt):
  sd = _sd(opt)
  _group(sd, "adamw")["decay_param_mask"] = (True, True)  # decays b.bias
  return tm, fm, sd


@dataclasses.dataclass(frozen=True)
class Case:
  make: Callable
  torch_does: str
  message: str
  config: dict | None = None
  why: str = ""  # where PyTorch accepts: why stac_optax refuses


CASES = {
    "state of other shapes": Case(
        _other_widths, "load: ValueError",
        r"'b.weight' \(Flax 'b/kernel'\) in param group 1 \(adamw, the cap\): state 'exp_avg' "
        r"has shape \(3, 4\), but the parameter's shape is \(2, 4\) in PyTorch \(\(4, 2\) in "
        r"Flax, transpose layout\)"),
    "unknown parameter name": Case(
        _wrong_name, "load: ValueError",
        r"param group 1 \(adamw, the cap\) names parameters that torch_module does not have: "
        r"\['wrong_name'\]"),
    "AdamW state on a trunk parameter": Case(
        _adam_state_on_trunk, "load: ValueError",
        r"'a.weight' \(Flax 'a/kernel'\) in param group 0 \(sign, the trunk\) is in the trunk, "
        r"which keeps no optimizer state, but the state dict holds \['exp_avg', 'exp_avg_sq', 'step'\]"),
    "0.1.x trunk buffer of another shape": Case(
        _legacy_buffer_of_other_shape, "load: ValueError",
        r"'a.weight' \(Flax 'a/kernel'\) .*state 'sign_momentum_buffer' has shape \(7,\), but "
        r"the parameter's shape is \(4, 3\) in PyTorch"),
    "saved from another registration order": Case(
        _other_registration_order, "load: ValueError",
        r"param group 0 \(sign, the trunk\) does not hold the parameters stac-optimizer puts in "
        r"the trunk of torch_module with last_n_modules=1: missing \['a.weight' \(Flax 'a/kernel'\), "
        r"'a.bias' \(Flax 'a/bias'\)\]; not expected there \['b.weight' \(Flax 'b/kernel'\)"),
    "indices and names disagree": Case(
        _indices_and_names_disagree, "load: ValueError",
        r"param group 1 \(adamw, the cap\) lists 1 parameter indices under 'params' but 2 names"),
    "a parameter frozen since": Case(
        _frozen_since_saved, "load: ValueError",
        r"param group 0 \(sign, the trunk\) holds \['a.weight' \(Flax 'a/kernel'\)\], frozen in "
        r"torch_module \(requires_grad=False\)"),
    "not a STAC state": Case(_no_stac_role, "load: ValueError", r"not a stac-optimizer STAC state"),
    "cap size beyond the model": Case(
        _cap_count_beyond_the_model, "accepts",
        r"resolved_last_n_modules is 5 but torch_module has 3 counted modules",
        why="torch compares names, not this count, which it only stores; stac_optax builds "
            "its split from it, and no STAC on this model writes 5"),
    "state under an index no group lists": Case(
        _stray_state_entry, "accepts", r"entries under the indices \[9\], which no param group lists",
        why="torch keeps the entry, unused; it is not from this model's optimizer"),
    "an index listed twice": Case(
        _index_listed_twice, "load: ValueError", r"parameter index 4 is listed twice"),
    "cap state for some parameters only": Case(
        _some_cap_state_missing, "accepts",
        r"only some cap parameters have AdamW state: \['b.bias' \(Flax 'b/bias'\)\] have none",
        why="torch restarts b.bias at step 0 beside b.weight at step 2; stac_optax has one "
            "step count for the cap"),
    "different step counts": Case(
        _different_step_counts, "accepts",
        r"different step counts: 'b.weight' \(Flax 'b/kernel'\): 2, 'b.bias' \(Flax 'b/bias'\): 1",
        why="torch keeps a count per parameter; stac_optax one for the cap"),
    "a fractional step": Case(
        _fractional_step, "accepts", r"'step' must be a whole number in \[0, 2\*\*31 - 1\], found tensor\(2.5000\)",
        why="torch uses 2.5 in the bias correction; no run of steps gives it"),
    "a moment missing": Case(
        _moment_missing, "step: KeyError",
        r"'b.weight' \(Flax 'b/kernel'\) in param group 1 \(adamw, the cap\): AdamW state must hold "
        r"\['exp_avg', 'exp_avg_sq', 'step'\]; missing \['exp_avg_sq'\]"),
    "AMSGrad maximum missing": Case(
        _amsgrad_max_missing, "step: KeyError", r"missing \['max_exp_avg_sq'\]", config={"amsgrad": True}),
    "AMSGrad maximum without amsgrad": Case(
        _max_without_amsgrad, "accepts", r"unexpected \['max_exp_avg_sq'\] \(amsgrad is False\)",
        why="torch ignores it; a maximum is only written with amsgrad=True, so the dict "
            "does not belong to this optimizer"),
    "an integer moment": Case(
        _integer_moment, "accepts", r"state 'exp_avg' must be a floating-point tensor, found Tensor of dtype torch.int64",
        why="torch casts it to the parameter's dtype; moments are never integers"),
    "a hyper-parameter missing": Case(
        _hyperparameter_missing, "accepts", r"param group 1 \(adamw, the cap\) lacks \['betas'\]",
        why="torch fills in the default (0.9, 0.999), which need not be what the run used"),
    "a beta out of range": Case(
        _beta_out_of_range, "step: RuntimeError", r"'betas' must be two numbers in \[0, 1\), found \(0.9, 1.5\)"),
    "a negative learning rate": Case(
        _negative_lr, "accepts", r"param group 0 \(sign, the trunk\): 'lr' must be a number >= 0, found -0.01",
        why="torch checks lr when the optimizer is built, not when a state is loaded"),
    "sections disagree on maximize": Case(
        _sections_disagree_on_maximize, "accepts",
        r"'maximize' is True in param group 0 \(sign, the trunk\) but False in param group 1 "
        r"\(adamw, the cap\); stac_optax has one value for both sections",
        why="torch reads maximize per group; stac_optax has one flag"),
    "trunk rate not sign_lr_scale times the cap's": Case(
        _trunk_rate_apart, "accepts", r"the trunk's lr \(0.02, .*\) is not sign_lr_scale times the cap's lr",
        why="torch steps each group with its own lr; stac_optax derives the trunk's"),
    "decay mask against the exemption flags": Case(
        _decay_mask_against_the_flags, "accepts",
        r"'b.bias' \(Flax 'b/bias'\) is decayed in the state dict \('decay_param_mask'\), but "
        r"stac_optax exempts it", config={"weight_decay": 0.1},
        why="torch decays by the stored mask; stac_optax by the flags, which exempt biases"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_from_torch_refuses(name):
  case = CASES[name]
  tm, fm, opt = trained(case.config)
  module, target, bad = case.make(tm, fm, opt)
  assert torch_verdict(module, bad, case.config) == case.torch_does
  if case.torch_does == "accepts":
    assert case.why  # stac_optax is stricter here: the case says why
  before_dict, before_module = snapshot(bad), snapshot(module.state_dict())
  before_flax = jax.tree.map(np.asarray, torch_interop.flax_params(target))
  with pytest.raises(ValueError, match=case.message):
    torch_interop.from_torch(module, bad, target)
  assert_same(bad, before_dict)  # nothing given is changed
  assert_same(module.state_dict(), before_module)
  jax.tree.map(np.testing.assert_array_equal, torch_interop.flax_params(target), before_flax)


def test_a_0_1_x_trunk_buffer_is_dropped_as_pytorch_drops_it():
  tm, fm, opt = trained()
  sd = _sd(opt)
  sd["state"][0] = {"sign_momentum_buffer": torch.ones(4, 3)}
  assert torch_verdict(tm, sd, None) == "accepts"
  tx, params, state = torch_interop.from_torch(tm, sd, fm)
  ref_tx, ref_params, ref_state = torch_interop.from_torch(tm, opt, fm)
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert 0 in sd["state"]  # the caller's dict keeps its entry


def test_from_torch_refuses_an_optimizer_of_another_module():
  tm, fm, opt = trained()
  with pytest.raises(ValueError, match=r"param group 0 holds a tensor under the name 'a.weight' that "
                                       r"is not torch_module's parameter 'a.weight' \(Flax 'a/kernel'\)"):
    torch_interop.from_torch(copy.deepcopy(tm), opt, fm)


def test_from_torch_refuses_a_negative_skip_counter():
  tm, fm, opt = trained()
  with pytest.raises(ValueError, match=r"nonfinite_skipped_steps must be a whole number .* found -1"):
    torch_interop.from_torch(tm, opt, fm, nonfinite_skipped_steps=-1)


def test_stac_kwargs_from_torch_checks_the_hyperparameters():
  _, _, opt = trained({"betas": (0.8, 0.99), "eps": 1e-7})
  sd = _sd(opt)
  _group(sd, "sign")["betas"] = (0.0, 0.0)  # unused by the trunk, in torch too
  kwargs = torch_interop.stac_kwargs_from_torch(sd)
  assert (kwargs["b1"], kwargs["b2"], kwargs["eps"]) == (0.8, 0.99, 1e-7)
  _group(sd, "adamw")["eps"] = -1.0
  with pytest.raises(ValueError, match=r"param group 1 \(adamw, the cap\): 'eps' must be a number >= 0"):
    torch_interop.stac_kwargs_from_torch(sd)


# -- to_torch -------------------------------------------------------------------


def jax_run(fm, steps=2, **kwargs):
  params = torch_interop.flax_params(fm)
  tx = stac_optax.stac(fm, 1e-2, last_n_modules=1, **kwargs)
  state = tx.init(params)
  grads = jax.tree.map(np.ones_like, params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, state


def _assert_refused_and_unchanged(params, state, tm, opt, message):
  before_module, before_opt = snapshot(tm.state_dict()), snapshot(opt.state_dict())
  before_steps = opt.nonfinite_skipped_steps
  with pytest.raises(ValueError, match=message):
    torch_interop.to_torch(params, state, tm, opt)
  assert_same(tm.state_dict(), before_module)
  assert_same(opt.state_dict(), before_opt)
  assert opt.nonfinite_skipped_steps == before_steps


def test_to_torch_refuses_moments_of_other_shapes():
  tm, fm, opt = trained()
  params, _ = jax_run(fm)
  _, other_state = jax_run(FlaxNet(d_out=3))
  # the torch package refuses the dict such moments make
  _, _, other_opt = trained(d_out=3)
  assert torch_verdict(tm, _sd(other_opt), None) == "load: ValueError"
  _assert_refused_and_unchanged(
      params, other_state, tm, opt,
      r"'b.weight' \(Flax 'b/kernel'\): the cap's 'mu' has shape \(4, 3\) and dtype float32; "
      r"expected a floating array of the parameter's shape \(4, 2\) \(PyTorch \(2, 4\)\)")


def test_to_torch_refuses_another_cap():
  tm, fm, opt = trained()
  params, state = jax_run(fm)
  opt2 = stac_optimizer.STAC(tm, lr=1e-2, last_n_modules=2)
  _assert_refused_and_unchanged(params, state, tm, opt2, r"different caps")


def test_to_torch_refuses_a_trunk_with_momentum():
  tm, fm, opt = trained()
  params, state = jax_run(fm, sign_momentum=0.9)
  _assert_refused_and_unchanged(params, state, tm, opt, r"the stac_optax trunk carries state")


@pytest.mark.parametrize("jax_amsgrad", [True, False])
def test_to_torch_refuses_amsgrad_on_one_side_only(jax_amsgrad):
  tm, fm, opt = trained({"amsgrad": not jax_amsgrad})
  params, state = jax_run(fm, amsgrad=jax_amsgrad)
  _assert_refused_and_unchanged(
      params, state, tm, opt, rf"the stac_optax state (uses|does not use) AMSGrad but the PyTorch "
      rf"optimizer has amsgrad={not jax_amsgrad}")


def test_to_torch_refuses_an_optimizer_of_another_module():
  tm, fm, opt = trained()
  params, state = jax_run(fm)
  _assert_refused_and_unchanged(params, state, copy.deepcopy(tm), opt, r"the STAC was built on another module")


def test_to_torch_refuses_an_edited_optimizer():
  tm, fm, opt = trained()
  params, state = jax_run(fm)
  opt.param_groups[0]["maximize"] = True
  _assert_refused_and_unchanged(params, state, tm, opt, r"'maximize' is True in param group 0")
