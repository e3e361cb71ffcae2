"""Interop where the order matters: linen ``blocks.0`` names, split mismatches.

Linen names the modules of a list ``blocks.0`` (one key with a dot) where the
PyTorch twin has two path parts; ``match="names"`` reads the dot as a
separator. A split that differs between the two frameworks is reported by
its first differing modules, with the fix.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stac_optimizer
import torch

from stac_optax import torch_interop
from stac_optax.torch_interop.pairing import dotted_key_names
from tests import corpus
from tests.test_corpus import _griffin, _griffin_config

KEY = jax.random.key(0)
WIDTH, LAYERS = 4, 8


class Block(nn.Module):
  def setup(self):
    self.norm = nn.LayerNorm()
    self.gate = nn.Dense(WIDTH)
    self.out = nn.Dense(WIDTH)

  def __call__(self, x):
    return x + self.out(self.norm(x) * nn.sigmoid(self.gate(x)))


class DottedNet(nn.Module):
  """Blocks named ``blocks.<i>``, as recurrentgemma names them."""

  def setup(self):
    self.stem = nn.Dense(WIDTH)
    self.blocks = [Block(name=f"blocks.{i}") for i in range(LAYERS)]
    self.head = nn.Dense(2)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.norm = torch.nn.LayerNorm(WIDTH)
    self.gate = torch.nn.Linear(WIDTH, WIDTH)
    self.out = torch.nn.Linear(WIDTH, WIDTH)


class TorchNet(torch.nn.Module):
  def __init__(self, reorder=False):
    super().__init__()
    self.stem = torch.nn.Linear(3, WIDTH)
    self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
    self.head = torch.nn.Linear(WIDTH, 2)
    if reorder:  # the same modules, gate registered after out in every block
      for block in self.blocks:
        gate = block.gate
        del block.gate
        block.gate = gate


def _build():
  return DottedNet().init(KEY, jnp.ones((1, 3)))


def _stepped(torch_model):
  optimizer = stac_optimizer.STAC(torch_model, lr=1e-2, last_n_modules=2)
  for p in torch_model.parameters():
    p.grad = torch.ones_like(p)
  optimizer.step()
  return optimizer


def test_dotted_linen_keys_resolve_as_paths():
  assert dotted_key_names({"blocks.0/norm/scale": 0, "head/kernel": 0}) == {
      "blocks/0/norm/scale": "blocks.0/norm/scale"
  }
  # a name that two leaves would share, or that exists as it is, is left alone
  assert dotted_key_names({"a.b/w": 0, "a/b.w": 0, "x.y": 0, "x/y": 0}) == {}


def test_a_blocks_dot_n_linen_model_matches_by_names_and_by_order_without_a_name_map():
  twin = TorchNet()
  by_names = torch_interop.match_parameters(twin, _build, match="names")
  by_order = torch_interop.match_parameters(twin, _build, match="order")
  assert by_names == by_order
  pairs = {m.torch_name: m.flax_name for m in by_names}
  assert pairs["blocks.7.gate.weight"] == "blocks.7/gate/kernel"
  assert pairs["blocks.0.norm.weight"] == "blocks.0/norm/scale"


@pytest.mark.parametrize("match", ["names", "order"])
def test_from_torch_continues_a_run_on_a_blocks_dot_n_linen_model(match):
  twin = TorchNet()
  optimizer = _stepped(twin)
  tx, params, state = torch_interop.from_torch(twin, optimizer, _build, match=match)
  np.testing.assert_array_equal(
      params["blocks.7"]["gate"]["kernel"], twin.blocks[7].gate.weight.detach().numpy().T
  )
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_recurrentgemma_matches_its_pytorch_twin_by_names_and_by_order():
  twin = corpus.recurrentgemma("torch").Griffin(_griffin_config())
  build = _griffin(True).build  # with gradient checkpointing, its default
  by_names = torch_interop.match_parameters(twin, build, match="names")
  assert by_names == torch_interop.match_parameters(twin, build, match="order")
  assert {m.torch_name: m.flax_name for m in by_names}["blocks.2.mlp_block.ffw_down.weight"] == (
      "blocks.2/mlp_block/ffw_down/kernel"
  )


def test_a_split_mismatch_names_the_first_modules_and_the_fix():
  twin = TorchNet(reorder=True)  # PyTorch: ... blocks.7.norm, blocks.7.out, blocks.7.gate, head
  optimizer = _stepped(twin)
  with pytest.raises(ValueError, match="partitions differ") as error:
    torch_interop.from_torch(twin, optimizer, _build, match="names")
  message = str(error.value)
  assert "in PyTorch only: 'blocks.7.out' (Flax 'blocks.7/out')" in message
  assert "in stac_optax only: 'blocks.7.gate' (Flax 'blocks.7/gate')" in message
  assert "module_order=" in message and len(message) < 800
  assert "blocks.0" not in message  # not the whole trunk


def test_check_parity_names_the_modules_in_one_cap_only_and_the_fix():
  twin = TorchNet(reorder=True)
  report = torch_interop.check_parity(twin, _build, steps=1, last_n_modules=2)
  assert not report.partition_matches
  text = str(report)
  assert "modules in one cap only: in PyTorch only: 'blocks.7.gate' (Flax 'blocks.7/gate')" in text
  assert "module_order=" in text
