"""An unrolled PyTorch model and a scanned Flax model through ``torch_interop``.

PyTorch's ``blocks.3.up.weight`` is layer 3 of the stacked Flax array
``blocks/up/kernel``: weights, gradients, cap moments and whole STAC runs
move between the two with ``stacked_modules=``.
"""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stac_optimizer
import torch
from flax import linen as nn
from flax import nnx

import stac_optax
from stac_optax import torch_interop
from tests import stacked_models as sm
from tests.test_stacked import _PartitionedBlock
from tests.test_stacked_parity import TorchNet

STACKED = {"blocks": 0}
RUN = {"last_n_modules": 3, "weight_decay": 0.1}  # cap: blocks.5.down, blocks.5.norm, head
LR = 1e-2
STEPS = 5


@pytest.fixture(scope="module")
def torch_net():
  torch.manual_seed(0)
  return TorchNet()


def _hand_twin(torch_net) -> dict:
  """The torch weights as the unrolled Flax twin, converted by hand."""
  named = {n: p.detach().numpy() for n, p in torch_net.named_parameters()}

  def linear(prefix):
    return {"kernel": named[f"{prefix}.weight"].T, "bias": named[f"{prefix}.bias"]}

  return {
      "stem": linear("stem"),
      "blocks": {
          str(i): {
              "up": linear(f"blocks.{i}.up"),
              "down": linear(f"blocks.{i}.down"),
              "norm": {"scale": named[f"blocks.{i}.norm.weight"], "bias": named[f"blocks.{i}.norm.bias"]},
          }
          for i in range(sm.LAYERS)
      },
      "head": linear("head"),
  }


def _assert_same_weights(a, b):
  for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
    assert torch.equal(x, y), name


@pytest.mark.parametrize("axis", [0, 1])
def test_params_from_torch_stacks_unrolled_layers_along_the_layer_axis(torch_net, axis):
  target = sm.linen_scan_params() if axis == 0 else sm.stack(sm.unrolled(sm.linen_scan_params()), axis=1)
  params = torch_interop.params_from_torch(torch_net, target, stacked_modules={"blocks": axis})
  chex.assert_trees_all_equal(params, sm.stack(_hand_twin(torch_net), axis=axis))

  back = TorchNet()
  torch_interop.params_to_torch(params, back, stacked_modules={"blocks": axis})
  _assert_same_weights(back, torch_net)  # bit for bit


def test_match_parameters_names_each_layer_of_a_stacked_array(torch_net):
  params = sm.linen_scan_params()
  by_names = torch_interop.match_parameters(torch_net, params, stacked_modules=STACKED)
  m = next(m for m in by_names if m.torch_name == "blocks.3.up.weight")
  assert (m.flax_name, m.array_name, m.layer.index, m.layer.axis) == (
      "blocks/3/up/kernel", "blocks/up/kernel", 3, 0
  )
  assert (m.torch_shape, m.flax_shape, m.layout) == ((sm.HIDDEN, sm.WIDTH), (sm.WIDTH, sm.HIDDEN), "transpose")
  by_order = torch_interop.match_parameters(
      torch_net, params, match="order", stacked_modules=STACKED, module_order=sm.ORDER
  )
  assert by_order == by_names


def test_a_torch_model_with_another_layer_count_is_refused_with_both_counts():
  deeper = TorchNet()
  deeper.blocks.append(copy.deepcopy(deeper.blocks[0]))
  with pytest.raises(ValueError, match=r"'blocks' holds 6 layers \(layer axis 0\) but PyTorch has 7"):
    torch_interop.params_from_torch(deeper, sm.linen_scan_params(), stacked_modules=STACKED)


class _PartitionedNet(nn.Module):
  """The scanned net with the logical axis name 'layers' on its stacked params."""

  axis: int = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(sm.WIDTH, name="stem")(x)
    x, _ = nn.scan(
        _PartitionedBlock, variable_axes={"params": self.axis}, split_rngs={"params": True},
        length=sm.LAYERS, metadata_params={nn.PARTITION_NAME: "layers"},
    )(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


@pytest.mark.parametrize("axis", [0, 1])
def test_the_layer_axis_is_read_from_logical_axis_names_by_default(torch_net, axis):
  def build():
    return _PartitionedNet(axis).init(jax.random.key(0), jnp.ones((1, sm.WIDTH)))

  # stacked_modules=None: read from the axis name; nn.scan sorts the block's sub-modules
  variables = torch_interop.variables_from_torch(torch_net, build, module_order=sm.ORDER)
  chex.assert_trees_all_equal(nn.unbox(variables["params"]), sm.stack(_hand_twin(torch_net), axis=axis))
  back = TorchNet()
  torch_interop.params_to_torch(variables, back)
  _assert_same_weights(back, torch_net)


def test_a_scanned_target_without_stacked_modules_gets_a_hint(torch_net):
  with pytest.raises(ValueError, match=r"Pass stacked_modules=\{'blocks': <layer axis>\}"):
    torch_interop.params_from_torch(torch_net, sm.linen_scan_params(), stacked_modules={})


def test_freezing_some_layers_of_a_stacked_array_is_refused(torch_net):
  module = copy.deepcopy(torch_net)
  module.blocks[2].up.weight.requires_grad_(False)
  matches = torch_interop.match_parameters(module, sm.linen_scan_params(), stacked_modules=STACKED)
  with pytest.raises(ValueError, match="'blocks/up/kernel' are frozen in PyTorch for some"):
    torch_interop.trainable_from_torch(module, matches)
  for block in module.blocks:  # all layers frozen: the whole array is
    block.up.weight.requires_grad_(False)
  trainable = torch_interop.trainable_from_torch(module, matches)
  assert not trainable("blocks/up/kernel", None) and trainable("blocks/up/bias", None)


def _grads(seed: int, torch_net) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [
      {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in torch_net.named_parameters()}
      for _ in range(2 * STEPS)
  ]


def _torch_steps(module, optimizer, grads):
  for g in grads:
    for n, p in module.named_parameters():
      p.grad = torch.from_numpy(g[n].copy())
    optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_a_run_moves_from_unrolled_torch_to_scanned_jax_and_back(torch_net, amsgrad):
  kwargs = {**RUN, "amsgrad": amsgrad}
  grads = _grads(1, torch_net)
  reference = copy.deepcopy(torch_net)
  reference_opt = stac_optimizer.STAC(reference, lr=LR, **kwargs)
  _torch_steps(reference, reference_opt, grads)

  module = copy.deepcopy(torch_net)
  optimizer = stac_optimizer.STAC(module, lr=LR, **kwargs)
  _torch_steps(module, optimizer, grads[:STEPS])
  how = {"stacked_modules": STACKED, "module_order": sm.ORDER}
  tx, params, state = torch_interop.from_torch(module, optimizer, sm.linen_scan_params(), **how)

  # the cut array's cap moments are those of its cap layer (the last) in torch
  adam = state.inner_state.inner_states["adamw"].inner_state[0]
  cut = adam.mu["blocks"]["down"]["kernel"]
  assert isinstance(cut.trunk, optax.MaskedNode) and cut.cap.shape == (1, sm.HIDDEN, sm.WIDTH)
  torch_mu = optimizer.state[module.blocks[5].down.weight]["exp_avg"].numpy()
  np.testing.assert_array_equal(np.asarray(cut.cap[0]), torch_mu.T)

  @jax.jit
  def step(g, state, params):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads[STEPS:]:
    params, state = step(torch_interop.tree_from_torch(module, g, params, **how), state, params)
  torch_interop.to_torch(params, state, module, optimizer, **how)

  for name, p in module.named_parameters():
    want = dict(reference.named_parameters())[name]
    np.testing.assert_allclose(p.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
  keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
  cap = [n for g in optimizer.param_groups if g["stac_role"] == "adamw" for n in g["param_names"]]
  assert cap[:2] == ["blocks.5.down.weight", "blocks.5.down.bias"]
  named, reference_named = dict(module.named_parameters()), dict(reference.named_parameters())
  for name in cap:
    got, want = optimizer.state[named[name]], reference_opt.state[reference_named[name]]
    assert float(got["step"]) == float(want["step"]) == 2 * STEPS
    for key in keys:
      np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


def test_an_nnx_vmap_model_takes_the_same_layers(torch_net):
  model = sm.NNXVmapNet(nnx.Rngs(0))  # NNX keeps the block's creation order
  params = torch_interop.params_from_torch(torch_net, model, stacked_modules=STACKED)
  chex.assert_trees_all_equal(nnx.to_pure_dict(params), sm.stack(_hand_twin(torch_net)))
  nnx.update(model, params)
  back = TorchNet()
  torch_interop.params_to_torch(model, back, stacked_modules=STACKED)
  _assert_same_weights(back, torch_net)


def test_check_parity_of_an_unrolled_torch_model_and_its_scanned_twin(torch_net):
  report = torch_interop.check_parity(
      torch_net, sm.linen_scan_params(), steps=3, learning_rate=LR,
      stacked_modules=STACKED, module_order=sm.ORDER, **RUN,
  )
  assert report.ok, str(report)
  assert report.flax_cap == ("blocks/5/down", "blocks/5/norm", "head")
  assert stac_optax.partition_modules(
      sm.linen_scan_params(), stacked_modules=STACKED, module_order=sm.ORDER, last_n_modules=3
  ).splits_layers
