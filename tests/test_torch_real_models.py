"""PyTorch interop on model definitions neither side of this project wrote:
torchvision's ResNet-18 against a linen ResNet-18 written the way the Flax
ImageNet example writes it, and ``torch.nn.TransformerEncoder`` against an
NNX encoder built from ``nnx.MultiHeadAttention``. Names differ between
the frameworks, so the parameters are paired by order.
"""

from __future__ import annotations

import copy
import enum
import functools
import importlib.util
import os
import pathlib
import sys
import types

import chex
import flax.linen as nn
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

# -- torchvision's ResNet, loaded without torchvision's compiled operators ------


def _stub(name: str, **attrs) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__path__ = []  # a package, so relative imports below it resolve
  module.__dict__.update(attrs)
  sys.modules[name] = module
  return module


class _WeightsEnum(enum.Enum):
  @classmethod
  def verify(cls, obj):
    return obj


@pytest.fixture(scope="module")
def torchvision_resnet():
  """``torchvision/models/resnet.py`` from the torchvision wheel, with its
  parent packages replaced by stubs (``import torchvision`` loads compiled
  operators built for another torch). scripts/test.sh installs the wheel."""
  root = pathlib.Path(os.environ.get(
      "STAC_TORCHVISION", pathlib.Path(__file__).resolve().parents[1] / ".venv" / "torchvision-0.29.1"
  ))
  source = root / "torchvision" / "models" / "resnet.py"
  assert source.exists(), (
      f"torchvision's resnet.py not found under {root}; scripts/test.sh installs the wheel "
      "(or set STAC_TORCHVISION to a `pip install --no-deps --target` folder)."
  )
  pkg = "_torchvision_stub"
  _stub(pkg)
  _stub(f"{pkg}.transforms")
  _stub(f"{pkg}.transforms._presets", ImageClassification=lambda **_: None)
  _stub(f"{pkg}.utils", _log_api_usage_once=lambda _: None)
  _stub(f"{pkg}.models")
  _stub(
      f"{pkg}.models._api",
      register_model=lambda name=None: (lambda fn: fn),
      Weights=lambda **kw: types.SimpleNamespace(**kw),
      WeightsEnum=_WeightsEnum,
  )
  _stub(f"{pkg}.models._meta", _IMAGENET_CATEGORIES=[])
  _stub(
      f"{pkg}.models._utils",
      _ovewrite_named_param=lambda kwargs, name, value: kwargs.__setitem__(name, value),
      handle_legacy_interface=lambda **_: (lambda fn: fn),
  )
  spec = importlib.util.spec_from_file_location(f"{pkg}.models.resnet", source)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


# -- the Flax ImageNet example's ResNet-18, in linen ----------------------------
# As the example builds it (ResNetBlock with conv_proj/norm_proj, BatchNorm with
# momentum 0.9 and epsilon 1e-5), with one change: explicit symmetric padding,
# as PyTorch pads. The example's "SAME" pads a strided 3x3 convolution and the
# stem's max-pool by (0, 1), PyTorch by (1, 1): the weights fit, the outputs
# do not.


class ResNetBlock(nn.Module):
  filters: int
  conv: nn.Module
  norm: nn.Module
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, padding=0, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: tuple[int, ...]
  num_classes: int
  num_filters: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
IMAGE, CLASSES = 32, 10


def _images(rng, n=4):
  return rng.standard_normal((n, 3, IMAGE, IMAGE)).astype(np.float32)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def resnet_pair(torchvision_resnet):
  """torchvision's resnet18 with running statistics away from their initial
  values, and a builder of the linen ResNet18's variables: traced, not run
  (the weights come from PyTorch; initializing them eagerly costs ~18 s on
  2 cores)."""
  torch.manual_seed(0)
  tm = torchvision_resnet.resnet18(num_classes=CLASSES)
  with torch.no_grad():  # a few batches in train mode move the running statistics
    for seed in range(3):
      tm(torch.from_numpy(_images(np.random.default_rng(seed), 8)))
  tm.eval()
  def build():
    return ResNet18(num_classes=CLASSES).init(jax.random.key(0), jnp.ones((1, IMAGE, IMAGE, 3)), train=False)

  return tm, build


def test_resnet18_names_differ_and_order_pairs_every_module(resnet_pair):
  tm, variables = resnet_pair
  with pytest.raises(ValueError, match="no such Flax leaf"):
    torch_interop.match_parameters(tm, variables)
  matches = torch_interop.match_parameters(tm, variables, match="order")
  pairs = {m.torch_name: m.flax_name for m in matches}
  assert pairs["layer2.0.downsample.0.weight"] == "ResNetBlock_2/conv_proj/kernel"
  assert pairs["layer2.0.downsample.1.weight"] == "ResNetBlock_2/norm_proj/scale"
  assert pairs["fc.weight"] == "Dense_0/kernel" and len(matches) == len(list(tm.parameters())) == 62
  buffers = torch_interop.match_buffers(tm, variables, matches)
  assert {(b.torch_name, b.flax_name) for b in buffers} >= {("bn1.running_var", "bn_init/var")}
  assert len(buffers) == 2 * 20  # mean and var of 20 BatchNorms; num_batches_tracked stays


def test_resnet18_by_order_carries_weights_and_running_stats_forwards_agree(resnet_pair, torchvision_resnet):
  tm, variables = resnet_pair
  converted = torch_interop.variables_from_torch(tm, variables, match="order")
  np.testing.assert_array_equal(converted["batch_stats"]["ResNetBlock_7"]["BatchNorm_1"]["var"],
                                tm.layer4[1].bn2.running_var.numpy())
  x = _images(np.random.default_rng(10))
  logits = ResNet18(num_classes=CLASSES).apply(converted, _nhwc(x), train=False)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)

  # and back: weights and running statistics, bit for bit
  fresh = torchvision_resnet.resnet18(num_classes=CLASSES)
  torch_interop.params_to_torch(converted, fresh, match="order", target=variables)  # the order
  for (name, a), (_, b) in zip(tm.state_dict().items(), fresh.state_dict().items(), strict=True):
    if not name.endswith("num_batches_tracked"):
      assert torch.equal(a, b), name


def test_resnet18_check_parity_by_order_with_a_real_batch(resnet_pair):
  tm, variables = resnet_pair
  converted = torch_interop.variables_from_torch(tm, variables, match="order")
  model = ResNet18(num_classes=CLASSES)
  rng = np.random.default_rng(3)
  batch = (_images(rng), rng.integers(0, CLASSES, 4))

  def torch_loss(module, b):
    module.train()
    return torch.nn.functional.cross_entropy(module(b[0]), b[1].long())

  def flax_loss(params, b):
    logits, _ = model.apply({"params": params, "batch_stats": converted["batch_stats"]},
                            jnp.transpose(b[0], (0, 2, 3, 1)), train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  report = torch_interop.check_parity(
      tm, variables, match="order", steps=2, batch=batch, torch_loss=torch_loss, flax_loss=flax_loss,
      learning_rate=1e-3, weight_decay=1e-2, loss_rtol=1e-5, grad_rtol=1e-3,
  )
  print(report)
  assert report.ok, str(report)
  # ceil(41 * 0.125) = 6 modules in the cap, on both sides
  assert report.partition_matches and report.flax_cap[0] == "ResNetBlock_6/norm_proj"
  assert report.torch_cap == ("layer4.0.downsample.1", "layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2",
                              "layer4.1.bn2", "fc")
  assert report.torch_module_count == report.flax_module_count == 41
  assert report.batch.loss_max_rel_diff < 1e-5 and report.batch.sign_mismatch_fraction < 1e-2
  assert tm.training is False  # the model given was not touched


# -- torch.nn.TransformerEncoder against an NNX encoder ------------------------------

VOCAB, D, HEADS, FF, LAYERS, OUT = 32, 16, 2, 32, 2, 4


class TorchTextClassifier(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.embedding = torch.nn.Embedding(VOCAB, D)
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    self.head = torch.nn.Linear(D, OUT)

  def forward(self, tokens):
    return self.head(self.encoder(self.embedding(tokens)).mean(1))


class EncoderBlock(nnx.Module):
  """A post-norm block, as ``nn.TransformerEncoderLayer`` computes it."""

  def __init__(self, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
    self.mlp_in = nnx.Linear(D, FF, rngs=rngs)
    self.mlp_out = nnx.Linear(FF, D, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(D, epsilon=1e-5, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(D, epsilon=1e-5, rngs=rngs)

  def __call__(self, x):
    x = self.attention_norm(x + self.attention(x))
    return self.mlp_norm(x + self.mlp_out(jax.nn.relu(self.mlp_in(x))))


class NNXTextClassifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([EncoderBlock(rngs) for _ in range(LAYERS)])
    self.classifier = nnx.Linear(D, OUT, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.classifier(x.mean(1))


def _tokens(rng):
  return rng.integers(0, VOCAB, (3, 7))


@pytest.fixture(scope="module")
def encoder_pair():
  torch.manual_seed(1)
  tm = TorchTextClassifier().eval()
  fm = NNXTextClassifier(nnx.Rngs(0))
  nnx.update(fm, torch_interop.params_from_torch(tm, fm, match="order"))
  return tm, fm


def test_transformer_by_order_splits_fused_attention_and_forwards_agree(encoder_pair):
  tm, fm = encoder_pair
  matches = torch_interop.match_parameters(tm, fm, match="order")
  kernel = {m.flax_name: m for m in matches}["blocks/1/attention/key/kernel"]
  assert (kernel.torch_name, kernel.rows, kernel.flax_shape) == (
      "encoder.layers.1.self_attn.in_proj_weight", (D, 2 * D), (D, HEADS, D // HEADS))
  # out_proj is a NonDynamicallyQuantizableLinear: a Linear subclass, transposed
  out = {m.torch_name: m for m in matches}["encoder.layers.0.self_attn.out_proj.weight"]
  assert (out.flax_name, out.layout) == ("blocks/0/attention/out/kernel", "heads")
  x = _tokens(np.random.default_rng(0))
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


def test_fused_attention_round_trips_bit_for_bit(encoder_pair):
  tm, fm = encoder_pair
  fresh = TorchTextClassifier()
  torch_interop.params_to_torch(fm, fresh, match="order")
  for (name, a), (_, b) in zip(tm.named_parameters(), fresh.named_parameters(), strict=True):
    assert torch.equal(a, b), name


def test_transformer_check_parity_counts_attention_as_four_flax_modules(encoder_pair):
  tm, fm = encoder_pair
  # 14 PyTorch modules (attention and out_proj are 2), 18 in Flax (query, key, value, out);
  # PyTorch's last 7 (the last layer and the head) are Flax's last 9
  report = torch_interop.check_parity(tm, fm, match="order", steps=1, last_n_modules=7, weight_decay=1e-2)
  assert (report.torch_module_count, report.flax_module_count) == (14, 18)
  assert not report.partition_matches and report.flax_last_n_modules_for_torch_cap == 9
  assert "flax_last_n_modules=9" in str(report) and "<- differs" in str(report)
  report = torch_interop.check_parity(tm, fm, match="order", steps=2, last_n_modules=7, weight_decay=1e-2,
                                      flax_last_n_modules=9)
  assert report.ok, str(report)
  assert report.flax_cap[:4] == tuple(f"blocks/1/attention/{p}" for p in ("query", "key", "value", "out"))


def test_transformer_check_parity_with_a_real_batch(encoder_pair):
  tm, fm = encoder_pair
  rng = np.random.default_rng(5)
  batches = [(_tokens(rng), rng.integers(0, OUT, 3)) for _ in range(3)]

  def torch_loss(module, b):
    return torch.nn.functional.cross_entropy(module(b[0].long()), b[1].long())

  def flax_loss(model, b):
    return optax.softmax_cross_entropy_with_integer_labels(model(b[0]), b[1]).mean()

  report = torch_interop.check_parity(tm, fm, match="order", batch=batches, torch_loss=torch_loss,
                                      flax_loss=flax_loss, learning_rate=1e-2, last_n_modules=1)
  print(report)
  assert report.ok, str(report)
  assert report.steps == 3 and report.batch.grad_max_scaled_diff < 1e-4


def _grads(tm, rng):
  return {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in tm.named_parameters()}


def test_transformer_from_torch_ten_steps_to_torch_equals_ten_torch_steps(encoder_pair):
  tm, fm = encoder_pair
  kwargs = {"lr": 1e-2, "last_n_ratio": 0.5, "weight_decay": 1e-2, "amsgrad": True}
  start = copy.deepcopy(tm)
  reference = copy.deepcopy(tm)
  ref_opt = stac_optimizer.STAC(reference, **kwargs)
  rng = np.random.default_rng(7)
  grads = [_grads(tm, rng) for _ in range(10)]
  for g in grads:
    for n, p in reference.named_parameters():
      p.grad = torch.from_numpy(g[n].copy())
    ref_opt.step()

  tx, params, state = torch_interop.from_torch(start, stac_optimizer.STAC(start, **kwargs), fm, match="order")
  mu = state.inner_state.inner_states["adamw"].inner_state[0].mu
  cap = stac_optax.partition_modules(fm, last_n_modules=9).adamw_parameter_names  # 7 in PyTorch
  assert sorted(n for n, _ in stac_optax._tree.leaves_with_names(mu)) == sorted(cap)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(nnx.as_pure(torch_interop.tree_from_torch(start, g, fm, match="order")), state, params)
    params = optax.apply_updates(params, updates)

  back = copy.deepcopy(start)
  back_opt = stac_optimizer.STAC(back, **kwargs)
  torch_interop.to_torch(params, state, back, back_opt, match="order", target=fm)
  for (name, a), (_, b) in zip(reference.named_parameters(), back.named_parameters(), strict=True):
    np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    sa, sb = ref_opt.state.get(a, {}), back_opt.state.get(b, {})
    assert sa.keys() == sb.keys(), name
    for key in sa:
      np.testing.assert_allclose(sb[key].numpy(), sa[key].numpy(), rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")


def test_nnx_optimizer_takes_gradients_from_torch_and_refuses_plain_arrays():
  torch.manual_seed(4)
  mha = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
  model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=nnx.Rngs(0))
  nnx.update(model, torch_interop.params_from_torch(mha, model))
  reference = copy.deepcopy(mha)
  ref_opt = stac_optimizer.STAC(reference, lr=1e-2, last_n_modules=1)
  # PyTorch's cap, out_proj, is Flax's `out`: 1 module on both sides here
  optimizer = nnx.Optimizer(model, stac_optax.stac(model, 1e-2, last_n_modules=1), wrt=nnx.Param)
  grads = _grads(mha, np.random.default_rng(2))
  for n, p in reference.named_parameters():
    p.grad = torch.from_numpy(grads[n].copy())
  ref_opt.step()

  state = torch_interop.tree_from_torch(mha, grads, model)
  assert isinstance(state, nnx.State) and type(state["query"]["kernel"]) is nnx.Param
  optimizer.update(model, state)
  moved = torch_interop.tree_to_torch(nnx.state(model, nnx.Param), mha, target=model)
  np.testing.assert_allclose(moved["out_proj.weight"], reference.out_proj.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(moved["in_proj_weight"], reference.in_proj_weight.detach().numpy(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no leaves at all.*nnx.Param by default"):
    optimizer.update(model, nnx.as_pure(state))


def test_order_mismatch_shows_the_modules_side_by_side(encoder_pair):
  tm, _ = encoder_pair

  class Shorter(NNXTextClassifier):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.blocks[1].mlp_in = nnx.Linear(D, FF + 1, rngs=rngs)

  with pytest.raises(ValueError) as info:
    torch_interop.match_parameters(tm, Shorter(nnx.Rngs(0)), match="order")
  text = str(info.value)
  assert "modules paired by order" in text and "<- differs" in text
  assert "encoder.layers.1.linear1 (Linear)" in text and "blocks/1/mlp_in" in text


# -- linen MultiHeadDotProductAttention ------------------------------------------


@pytest.mark.parametrize("match", ["names", "order"])
def test_linen_attention_converts_both_ways(match):
  torch.manual_seed(3)
  mha = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
  module = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, out_features=D)
  x = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
  variables = module.init(jax.random.key(0), jnp.asarray(x))
  params = torch_interop.params_from_torch(mha, variables, match=match)
  assert params["query"]["kernel"].shape == (D, HEADS, D // HEADS)
  with torch.no_grad():
    want = mha(*(torch.from_numpy(x),) * 3, need_weights=False)[0].numpy()
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  fresh = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
  torch_interop.params_to_torch({"params": params}, fresh, match=match)
  chex.assert_trees_all_equal(dict(mha.state_dict()), dict(fresh.state_dict()))


def test_a_linear_subclass_follows_the_linear_rule():
  class Scaled(torch.nn.Linear):
    pass

  matches = torch_interop.match_parameters(Scaled(3, 2), nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  assert [(m.flax_name, m.layout) for m in matches] == [("kernel", "transpose"), ("bias", "identity")]
