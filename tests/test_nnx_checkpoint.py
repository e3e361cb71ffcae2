"""nnx.Optimizer runs saved and restored with stac_optax.checkpoint resume bit for bit.

Flax's recommended NNX loop keeps a model and an ``nnx.Optimizer``; its
checkpoint recipe saves ``nnx.state`` of each (or their pure dicts) and
restores into a model built again, abstractly with ``nnx.eval_shape`` or with
new weights, through ``nnx.merge`` or ``nnx.update``. Each combination here,
with ``checkpoint.save`` and with an ``ocp.CheckpointManager`` given
``checkpoint.save_args``, resumes a run that skipped a non-finite step, and
the resumed run equals the straight one bit for bit, skip counter included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import stac_optax
from stac_optax import _tree, checkpoint

STEPS = 4
NAN_STEPS = (1, 6)  # one skipped step before the checkpoint, one after


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Linear(3, 8, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(10)])
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.head(self.norm(x))


PARTITION = stac_optax.partition_modules(lambda: Net(nnx.Rngs(0)))  # cap: norm, head
TX = stac_optax.stac(PARTITION, 1e-2, weight_decay=1e-2)  # one tx: nnx.jit compiles once


def make_optimizer(model):
  return nnx.Optimizer(model, TX, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def train(model, optimizer, start, steps):
  for t in range(start, start + steps):  # batch t is the same in every run
    x = jax.random.normal(jax.random.key(t), (16, 3))
    y = jnp.full((16, 1), jnp.nan) if t in NAN_STEPS else jnp.sin(x.sum(-1, keepdims=True))
    train_step(model, optimizer, x, y)


def values(model, optimizer):
  return {
      name: np.asarray(_tree.unbox(leaf))
      for tree, prefix in ((nnx.state(model), "model/"), (nnx.state(optimizer), "optimizer/"))
      for name, leaf in _tree.leaves_with_names(tree)
      for name in [prefix + name]
  }


@pytest.fixture(scope="module")
def straight():
  model = Net(nnx.Rngs(0))
  optimizer = make_optimizer(model)
  train(model, optimizer, 0, 2 * STEPS)
  assert stac_optax.nonfinite_skipped_steps(optimizer.opt_state) == len(NAN_STEPS)
  return values(model, optimizer)


def _from_pure_dict(abstract, restored):
  nnx.replace_by_pure_dict(abstract, restored)  # in place, as Flax's recipe uses it
  return abstract


FORMS = {  # (what is saved, how the restored tree becomes an nnx.State)
    "nnx.State": (lambda state: state, lambda abstract, restored: restored),
    "pure dict": (nnx.to_pure_dict, _from_pure_dict),
}


def _save(form, writer, directory, model, optimizer):
  to_saved = FORMS[form][0]
  tree = {"model": to_saved(nnx.state(model)), "optimizer": to_saved(nnx.state(optimizer))}
  if writer == "save":
    path = directory / "ckpt"
    checkpoint.save(path, tree, PARTITION)
    return path
  with ocp.CheckpointManager(directory / "run") as manager:
    manager.save(STEPS, args=checkpoint.save_args(tree, PARTITION))
    manager.wait_until_finished()
  return directory / "run" / str(STEPS)


def _restore_into_eval_shape(form, path):
  """Flax's recipe: abstract model and optimizer, restore, nnx.merge."""
  partition = checkpoint.load_partition(path)
  assert partition == PARTITION
  model_def, model_state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
  opt_def, opt_state = nnx.split(nnx.eval_shape(lambda: make_optimizer(Net(nnx.Rngs(0)))))
  to_saved, from_saved = FORMS[form]
  restored = checkpoint.restore(path, {"model": to_saved(model_state), "optimizer": to_saved(opt_state)})
  model = nnx.merge(model_def, from_saved(model_state, restored["model"]))
  optimizer = nnx.merge(opt_def, from_saved(opt_state, restored["optimizer"]))
  return model, optimizer


def _restore_into_new_weights(form, path):
  """A model and optimizer built again with other weights, then nnx.update."""
  model = Net(nnx.Rngs(1))
  optimizer = make_optimizer(model)
  to_saved, from_saved = FORMS[form]
  template = {"model": to_saved(nnx.state(model)), "optimizer": to_saved(nnx.state(optimizer))}
  restored = checkpoint.restore(path, template)
  nnx.update(model, from_saved(nnx.state(model), restored["model"]))
  nnx.update(optimizer, from_saved(nnx.state(optimizer), restored["optimizer"]))
  return model, optimizer


@pytest.mark.parametrize("writer", ["save", "CheckpointManager"])
@pytest.mark.parametrize("form", list(FORMS))
def test_a_resumed_nnx_optimizer_run_equals_the_straight_run_bit_for_bit(form, writer, straight, tmp_path):
  model = Net(nnx.Rngs(0))
  optimizer = make_optimizer(model)
  train(model, optimizer, 0, STEPS)
  path = _save(form, writer, tmp_path, model, optimizer)
  for restore in (_restore_into_eval_shape, _restore_into_new_weights):
    model, optimizer = restore(form, path)
    assert stac_optax.nonfinite_skipped_steps(optimizer.opt_state) == 1
    train(model, optimizer, STEPS, STEPS)
    got = values(model, optimizer)
    assert got.keys() == straight.keys()
    for name, want in straight.items():
      np.testing.assert_array_equal(got[name], want, err_msg=f"{restore.__name__}: {name}")


def test_restoring_for_an_optimizer_with_another_cap_is_refused(tmp_path):
  model = Net(nnx.Rngs(0))
  optimizer = make_optimizer(model)
  path = _save("nnx.State", "save", tmp_path, model, optimizer)
  template = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
  with pytest.raises(ValueError, match=r"trained with another STAC partition .* module 'layers/9' moved"):
    checkpoint.restore(path, template, model, last_n_modules=3)
  other = nnx.Optimizer(model, stac_optax.stac(model, last_n_modules=3), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"the template to restore into does not fit the checkpoint's "
                                       r"STAC partition .* module 'layers/9' \(#10 of 13\) is in this "
                                       r"partition's trunk but the state's cap"):
    checkpoint.restore(path, {"model": nnx.state(model), "optimizer": nnx.state(other)})
