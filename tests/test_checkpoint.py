"""validate_state and Orbax checkpoints."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import stac_optax
from stac_optax import checkpoint
from tests.conftest import mlp_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_matching_state_passes_typed_nested_and_as_restored(tmp_path):
  params = mlp_params(8)
  tx = stac_optax.stac(params, last_n_ratio=0.25)
  state = tx.init(params)
  stac_optax.validate_state(state, params, last_n_ratio=0.25)
  stac_optax.validate_state(optax.chain(optax.clip(1.0), tx).init(params), params, last_n_ratio=0.25)
  stac_optax.validate_state(optax.MultiSteps(tx, 2).init(params), stac_optax.partition_modules(params, last_n_ratio=0.25))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "c", {"opt_state": state})
  ckptr.wait_until_finished()
  raw = ckptr.restore(tmp_path / "c")["opt_state"]
  assert isinstance(raw, dict)  # Orbax without a template: plain dicts
  stac_optax.validate_state(raw, params, last_n_ratio=0.25)


@pytest.mark.parametrize(
    "other, kwargs, match",
    [
        (mlp_params(9), {}, r"lacks entries for: 'Dense_8/bias', 'Dense_8/kernel'"),  # another model
        (mlp_params(8), {"last_n_ratio": 0.5}, r"lacks entries for: 'Dense_4/bias'"),  # another ratio
        (mlp_params(8), {"last_n_modules": 2}, r"lacks entries for: 'Dense_6/bias'"),  # another cap size
        ({f"layer_{i}": v for i, v in enumerate(mlp_params(8).values())}, {}, r"outside it: 'Dense_7/bias'"),  # other names
        (mlp_params(8, width=4), {}, r"'Dense_7/kernel' has shape \(3, 3\), the parameter \(4, 4\)"),  # other shapes
    ],
)
def test_a_state_for_another_partition_is_refused(other, kwargs, match):
  params = mlp_params(8)
  state = stac_optax.stac(params).init(params)  # cap: Dense_7
  with pytest.raises(ValueError, match=match):
    stac_optax.validate_state(state, other, **kwargs)


def test_a_state_that_is_not_a_stac_state_is_refused():
  params = mlp_params(4)
  with pytest.raises(ValueError, match="not a STAC optimizer state"):
    stac_optax.validate_state(optax.adamw(1e-3).init(params), params)
  with pytest.raises(ValueError, match="not a STAC optimizer state"):
    stac_optax.validate_state({"inner_state": {"inner_states": {"a": 1}}, "nonfinite_skipped_steps": 0}, params)


def test_trunk_state_where_none_should_be_is_refused():
  params = mlp_params(4)
  state = stac_optax.stac(params, sign_momentum=0.9).init(params)
  with pytest.raises(ValueError, match="the trunk holds per-parameter state"):
    stac_optax.validate_state(state, params)
  stac_optax.validate_state(state, params, sign_momentum=0.9)
  with pytest.raises(ValueError, match="trunk momentum lacks entries"):
    stac_optax.validate_state(stac_optax.stac(params).init(params), params, sign_momentum=0.9)


def test_orbax_alone_restores_into_a_wrong_template_but_restore_refuses(tmp_path):
  params = mlp_params(6)
  state = stac_optax.stac(params, last_n_modules=1).init(params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "c", {"params": params, "opt_state": state})
  ckptr.wait_until_finished()
  wrong = {"params": params, "opt_state": stac_optax.stac(params, last_n_modules=2).init(params)}
  ckptr.restore(tmp_path / "c", jax.tree.map(ocp.utils.to_shape_dtype_struct, wrong))  # no complaint
  with pytest.raises(ValueError, match=r"lacks entries for: 'Dense_4/bias', 'Dense_4/kernel'"):
    checkpoint.restore(tmp_path / "c", wrong, params, last_n_modules=2)
  right = {"params": params, "opt_state": state}
  restored = checkpoint.restore(tmp_path / "c", right, params, last_n_modules=1)
  assert isinstance(restored["opt_state"], stac_optax.STACState)


def test_resuming_in_a_fresh_process_is_exact(tmp_path):
  """N steps, save, restore in another process, M steps == N + M straight, bit for bit.

  The straight run is the process that saved: it goes on for M steps without
  restoring anything."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  script = os.path.join(ROOT, "tests", "scripts", "resume.py")
  for args in (["train", str(tmp_path), "6", "8"], ["resume", str(tmp_path), "8"]):
    subprocess.run([sys.executable, script, *args], check=True, env=env, capture_output=True)
  want = np.load(tmp_path / "straight.npz")
  got = np.load(tmp_path / "resume.npz")
  assert sorted(want.files) == sorted(got.files)
  for name in want.files:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert int(got["skipped"]) == 3  # steps 3, 8, 13 had a NaN
  assert not np.array_equal(np.load(tmp_path / "train.npz")["layer_0/kernel"], got["layer_0/kernel"])
  assert jnp.asarray(got["layer_11/kernel"]).dtype == jnp.float32


def test_the_trunk_is_checked_through_the_params_saved_beside_the_state(tmp_path):
  params = mlp_params(8)
  part = stac_optax.partition_modules(params)  # cap: Dense_7; Dense_0 .. Dense_6 hold no state
  tx = stac_optax.stac(part)
  state = tx.init(params)
  checkpoint.save(tmp_path / "c", {"params": params, "opt_state": state}, part)

  renamed = {("layer_0" if k == "Dense_0" else k): v for k, v in params.items()}
  with pytest.raises(ValueError, match=r"the params lack trunk parameter\(s\) 'Dense_0/kernel'"):
    checkpoint.restore(tmp_path / "c", {"params": renamed, "opt_state": state})
  reshaped = {**params, "Dense_3": {"kernel": jnp.ones((3, 4)), "bias": params["Dense_3"]["bias"]}}
  with pytest.raises(ValueError, match=r"trunk parameter 'Dense_3/kernel' has shape \(3, 4\) in the params"):
    checkpoint.restore(tmp_path / "c", {"params": reshaped, "opt_state": state})
  # the state alone cannot see either: the trunk keeps nothing in it
  stac_optax.validate_state(state, part)
  with pytest.raises(ValueError, match=r"trunk parameter 'Dense_3/kernel' has shape \(3, 4\)"):
    stac_optax.validate_state(state, part, params=reshaped)
  restored = checkpoint.restore(tmp_path / "c", {"params": params, "opt_state": state})
  chex.assert_trees_all_equal(restored["params"], params)


def test_a_checkpoint_without_params_says_the_trunk_was_not_checked(tmp_path):
  params = mlp_params(4)
  tx = stac_optax.stac(params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "c", {"opt_state": tx.init(params)})
  ckptr.wait_until_finished()
  with pytest.warns(UserWarning, match="trunk's parameter names and shapes could not be checked"):
    checkpoint.restore(tmp_path / "c", {"opt_state": tx.init(params)}, params)


def test_saving_a_partition_other_than_the_optimizers_is_refused_before_writing(tmp_path):
  params = {f"layer_{i}": {"w": jnp.ones((2, 2))} for i in range(6)}
  part = stac_optax.partition_modules(params)  # cap: layer_5
  tx = stac_optax.stac(part, last_n_modules=2)  # resolves another cap: layer_4, layer_5
  state = tx.init(params)
  with pytest.raises(ValueError, match="not saving a checkpoint that could not be restored: .*'layer_4'"):
    checkpoint.save(tmp_path / "c", {"params": params, "opt_state": state}, part)
  assert not (tmp_path / "c").exists()
  right = stac_optax.partition_modules(part, last_n_modules=2)
  checkpoint.save(tmp_path / "c", {"params": params, "opt_state": state}, right)
  momentum = stac_optax.stac(part, sign_momentum=0.9)  # a trunk buffer is fine when it is there
  checkpoint.save(tmp_path / "m", {"params": params, "opt_state": momentum.init(params)}, part)


def test_a_stacked_model_cut_at_the_cap_checkpoints_and_resumes_bit_for_bit(tmp_path):
  from tests import stacked_models

  params = stacked_models.linen_scan_params()
  part = stac_optax.partition_modules(
      params, stacked_modules={"blocks": 0}, module_order=stacked_models.ORDER,
      last_n_ratio=0.25)
  assert part.splits_layers  # the cap ends inside the stacked block
  tx = stac_optax.stac(part, 1e-2, amsgrad=True)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  grads = [jax.tree.map(lambda x, i=i: jnp.full_like(x, (-1.0) ** i * (i + 1)), params)
           for i in range(4)]
  state = tx.init(params)
  for g in grads[:2]:
    params, state = step(params, state, g)
  checkpoint.save(tmp_path / "c", {"params": params, "opt_state": state}, part)
  template = {"params": params, "opt_state": tx.init(params)}
  restored = checkpoint.restore(tmp_path / "c", template, checkpoint.load_partition(tmp_path / "c"))
  chex.assert_trees_all_equal(restored, {"params": params, "opt_state": state})
  resumed_params, resumed_state = restored["params"], restored["opt_state"]
  for g in grads[2:]:
    params, state = step(params, state, g)
    resumed_params, resumed_state = step(resumed_params, resumed_state, g)
  chex.assert_trees_all_equal((resumed_params, resumed_state), (params, state))
