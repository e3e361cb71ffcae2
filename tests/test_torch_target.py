"""The Flax side of a torch_interop call is read once: a builder is traced
for each part it gives (params, counted modules, stacked layers) once per
call, however many steps of the call use that part."""

import pytest
import stac_optimizer
import torch
from flax import nnx

from stac_optax import torch_interop
from stac_optax.torch_interop.options import MatchOptions
from stac_optax.torch_interop.target import FlaxTarget


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 2, rngs=rngs)


class _Counted:
  """A builder of ``_Net`` that counts its calls (each a trace)."""

  def __init__(self):
    self.calls = 0

  def __call__(self):
    self.calls += 1
    return _Net(nnx.Rngs(0))


def _torch_net():
  net = torch.nn.Sequential()
  net.add_module("a", torch.nn.Linear(3, 4))
  net.add_module("b", torch.nn.Linear(4, 2))
  return net


def test_each_part_of_a_target_is_read_once():
  build = _Counted()
  target = FlaxTarget.of(lambda: build(), MatchOptions())
  reads = []
  for part in ("params", "leaves", "counted"):
    value = getattr(target, part)
    reads.append(build.calls)
    assert getattr(target, part) is value
  assert reads[0] == 1 and build.calls == reads[-1]
  assert target.aliases == {} and target.partition().trainable_module_count == 2
  assert build.calls == reads[-1]


@pytest.mark.parametrize("match", ["names", "order"])
def test_a_whole_run_reads_a_builder_no_more_often_than_matching_it_does(match):
  tm = _torch_net()
  matching, run, parity = _Counted(), _Counted(), _Counted()
  torch_interop.match_parameters(tm, lambda: matching(), match=match)
  torch_interop.from_torch(tm, stac_optimizer.STAC(tm, lr=1e-2), lambda: run(), match=match)
  torch_interop.check_parity(tm, lambda: parity(), steps=1, match=match)
  assert run.calls == matching.calls and parity.calls == matching.calls


def test_match_options_keep_every_argument_and_check_the_mode():
  options = MatchOptions(None, "order", (), {"blocks": 0}, ["a", "b"])
  assert options.name_map == {} and options.stacked_modules == {"blocks": 0}
  options.check_match()
  with pytest.raises(ValueError, match=r"match must be 'names' or 'order', got 'sorted'"):
    MatchOptions(match="sorted").check_match()
