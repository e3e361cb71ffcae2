"""Registration order on a corpus of model definitions this project did not write.

Each model is used as its authors wrote it (see ``tests/corpus.py`` for where
each comes from), in a small configuration. Its registration order is stated
below from its source: ``setup`` assignment order, ``@nn.compact`` creation
order. For each one:

* the builder's module order, and so every cap, is that order (no warning);
* the dict ``jax.jit(model.init)`` returns is refused or warned about, never
  silent (``jax.eval_shape`` returns the same sorted dicts without compiling);
* the dict a fresh, unjitted ``model.init`` returns is measured: it is in
  first-use order, sorted inside lifted transforms; the docs quote what this
  test pins (``docs/optimizer.md``, "Where the order comes from").

Where a PyTorch twin exists (recurrentgemma's Griffin; torchvision's
ResNet-18 for Flax's ImageNet ResNet-18) the order is compared with
``stac_optimizer``'s own partition of the twin.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stac_optimizer
import torch

import stac_optax
from tests import corpus
from tests.conftest import no_stac_warning
from tests.test_torch_real_models import torchvision_resnet  # noqa: F401  (a fixture)

KEY = jax.random.key(0)
LSTM_GATES = ("ii", "hi", "if", "hf", "ig", "hg", "io", "ho")  # flax LSTMCell's creation order
ATTENTION = ("query", "key", "value", "out")  # nn.MultiHeadDotProductAttention's


@dataclasses.dataclass(frozen=True)
class Case:
  build: Callable[[], Any]  # a zero-argument builder, as a user writes it
  order: tuple[str, ...]  # the registration order, read from the source
  fresh: str  # what the fresh init's dict gives: "same", "warns" or "use order"


def _lm1b() -> Case:
  models = corpus.flax_example("lm1b")
  config = models.TransformerConfig(
      vocab_size=32, output_vocab_size=32, emb_dim=8, num_heads=2, num_layers=2, qkv_dim=8,
      mlp_dim=16, max_len=16, deterministic=True,
  )
  # Decoder (compact): the output Embed, sinusoidal positions (no parameter),
  # blocks of LayerNorm, self-attention, LayerNorm, MlpBlock; the final norm; logitdense
  block = lambda i: [  # noqa: E731
      f"decoder/encoderdecoderblock_{i}/{m}"
      for m in ("LayerNorm_0", *(f"MultiHeadDotProductAttention_0/{p}" for p in ATTENTION),
                "LayerNorm_1", "MlpBlock_0/Dense_0", "MlpBlock_0/Dense_1")
  ]
  order = ("decoder/Embed_0", *block(0), *block(1), "decoder/encoderdecoder_norm", "decoder/logitdense")
  return Case(
      lambda: models.TransformerLM(config).init(KEY, jnp.zeros((1, 8), jnp.int32)), order, "same"
  )


def _wmt() -> Case:
  models = corpus.flax_example("wmt")
  config = models.TransformerConfig(
      vocab_size=32, output_vocab_size=32, share_embeddings=True, logits_via_embedding=True,
      emb_dim=8, num_heads=2, num_layers=2, qkv_dim=8, mlp_dim=16, max_len=16, deterministic=True,
  )
  # setup: shared_embedding, encoder, decoder; the logits use the shared embedding
  mlp = ("MlpBlock_0/Dense_0", "MlpBlock_0/Dense_1")
  attention = lambda n: tuple(f"MultiHeadDotProductAttention_{n}/{p}" for p in ATTENTION)  # noqa: E731
  encoder = [f"encoder/encoderblock_{i}/{m}" for i in range(2)
             for m in ("LayerNorm_0", *attention(0), "LayerNorm_1", *mlp)]
  decoder = [f"decoder/encoderdecoderblock_{i}/{m}" for i in range(2)
             for m in ("LayerNorm_0", *attention(0), "LayerNorm_1", *attention(1), "LayerNorm_2", *mlp)]
  order = ("shared_embedding", *encoder, "encoder/encoder_norm", *decoder,
           "decoder/encoderdecoder_norm")
  tokens = jnp.zeros((1, 8), jnp.int32)
  return Case(lambda: models.Transformer(config).init(KEY, tokens, tokens), order, "same")


def _nlp_seq() -> Case:
  models = corpus.flax_example("nlp_seq")
  config = models.TransformerConfig(
      vocab_size=32, output_vocab_size=5, emb_dim=8, num_heads=2, num_layers=2, qkv_dim=8,
      mlp_dim=16, max_len=16,
  )
  # compact: embed, sinusoidal positions, Encoder1DBlock_i, the final LayerNorm, the logits Dense
  order = ("embed", *(f"Encoder1DBlock_{i}/{m}" for i in range(2) for m in (
      "LayerNorm_0", *(f"MultiHeadDotProductAttention_0/{p}" for p in ATTENTION),
      "LayerNorm_1", "MlpBlock_0/Dense_0", "MlpBlock_0/Dense_1")), "LayerNorm_0", "Dense_0")
  tokens = jnp.zeros((1, 8), jnp.int32)
  return Case(lambda: models.Transformer(config).init(KEY, inputs=tokens, train=False), order, "same")


def _sst2() -> Case:
  models = corpus.flax_example("sst2")
  model = models.TextClassifier(
      embedding_size=8, hidden_size=8, vocab_size=32, output_size=2, dropout_rate=0.0,
      word_dropout_rate=0.0, deterministic=True,
  )
  # setup: embedder, encoder (forward_lstm, backward_lstm: an OptimizedLSTMCell
  # under nn.scan each), classifier (keys_only_mlp_attention: keys, energy;
  # mlp: intermediate_layer, output_layer)
  order = ("embedder",
           *(f"encoder/{d}_lstm/OptimizedLSTMCell_0/{g}" for d in ("forward", "backward")
             for g in LSTM_GATES),
           "classifier/keys_only_mlp_attention/keys", "classifier/keys_only_mlp_attention/energy",
           "classifier/mlp/intermediate_layer", "classifier/mlp/output_layer")
  return Case(
      lambda: model.init(KEY, jnp.zeros((2, 5), jnp.int32), jnp.array([5, 3])), order, "warns"
  )


def _vae() -> Case:
  models = corpus.flax_example("vae")
  # setup: encoder (fc1, fc2_mean, fc2_logvar), decoder (fc1, fc2)
  order = ("encoder/fc1", "encoder/fc2_mean", "encoder/fc2_logvar", "decoder/fc1", "decoder/fc2")
  return Case(lambda: models.VAE(latents=4).init(KEY, jnp.ones((1, 784)), KEY), order, "same")


def _seq2seq() -> Case:
  models = corpus.flax_example("seq2seq")
  model = models.Seq2seq(teacher_force=True, hidden_size=8, vocab_size=6)
  # compact: the encoder's LSTMCell, then the DecoderLSTMCell (its LSTMCell, then
  # its Dense), both handed to nn.RNN (a scan), which owns no parameter itself
  order = (*(f"LSTMCell_0/{g}" for g in LSTM_GATES),
           *(f"DecoderLSTMCell_0/LSTMCell_0/{g}" for g in LSTM_GATES), "DecoderLSTMCell_0/Dense_0")
  rngs = {"params": KEY, "lstm": KEY}
  return Case(
      lambda: model.init(rngs, jnp.zeros((1, 5, 6)), jnp.zeros((1, 4, 6))), order, "warns"
  )


def _ppo() -> Case:
  models = corpus.flax_example("ppo")
  order = ("conv1", "conv2", "conv3", "hidden", "logits", "value")  # compact, named
  return Case(
      lambda: models.ActorCritic(num_outputs=4).init(KEY, jnp.zeros((1, 84, 84, 4))), order, "same"
  )


def _imagenet_resnet18() -> Case:
  models = corpus.flax_example("imagenet")
  # compact: conv_init, bn_init; each ResNetBlock Conv_0, BatchNorm_0, Conv_1,
  # BatchNorm_1 and, where the shape changes (blocks 2, 4, 6), conv_proj,
  # norm_proj; then Dense_0
  blocks = [f"ResNetBlock_{i}/{m}" for i in range(8) for m in (
      "Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1",
      *(("conv_proj", "norm_proj") if i in (2, 4, 6) else ()))]
  order = ("conv_init", "bn_init", *blocks, "Dense_0")
  model = models.ResNet18(num_classes=10, num_filters=4)
  return Case(lambda: model.init(KEY, jnp.ones((1, 32, 32, 3)), train=False), order, "same")


def _gemma() -> Case:
  transformer = corpus.gemma_transformer()
  config = transformer.TransformerConfig(
      num_layers=2, num_embed=32, embed_dim=8, hidden_dim=16, num_heads=2, head_dim=4,
      num_kv_heads=1,
  )
  # setup: embedder, layer_i (pre_attention_norm; attn: attn_vec_einsum, then
  # q_einsum, kv_einsum; pre_ffw_norm; mlp), final_norm. Its __call__ uses the
  # attention's einsums in another order (q, kv, attn_vec): the dict follows use
  order = ("embedder", *(f"layer_{i}/{m}" for i in range(2) for m in (
      "pre_attention_norm", "attn/attn_vec_einsum", "attn/q_einsum", "attn/kv_einsum",
      "pre_ffw_norm", "mlp")), "final_norm")
  model = transformer.Transformer(config)
  tokens, positions, mask = jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None], jnp.ones((1, 4, 4), bool)
  return Case(lambda: model.init(KEY, tokens, positions, None, mask), order, "use order")


def _griffin_config():
  common = corpus.recurrentgemma("jax").common
  kinds = common.TemporalBlockType
  return common.GriffinConfig(
      vocab_size=32, width=16, mlp_expanded_width=24, num_heads=2,
      block_types=(kinds.RECURRENT, kinds.RECURRENT, kinds.ATTENTION),
      embeddings_scale_by_sqrt_dim=True, attention_window_size=4, logits_soft_cap=30.0,
  )


def _griffin_order() -> tuple[str, ...]:
  recurrent = ("linear_y", "linear_x", "linear_out", "conv_1d", "rg_lru", "rg_lru/input_gate",
               "rg_lru/a_gate")
  attention = ("proj_q", "proj_k", "proj_v", "proj_final")

  def block(i, kind, parts):
    return (f"blocks.{i}/temporal_pre_norm", *(f"blocks.{i}/{kind}/{p}" for p in parts),
            f"blocks.{i}/channel_pre_norm", f"blocks.{i}/mlp_block/ffw_up",
            f"blocks.{i}/mlp_block/ffw_down")

  # setup: embedder, blocks.<i> (a list; each block's setup: temporal_pre_norm,
  # the recurrent or attention block, channel_pre_norm, mlp_block), final_norm
  return ("embedder", *block(0, "recurrent_block", recurrent),
          *block(1, "recurrent_block", recurrent), *block(2, "attention_block", attention),
          "final_norm")


def _griffin(gradient_checkpointing: bool) -> Case:
  griffin = corpus.recurrentgemma("jax")
  model = griffin.Griffin(_griffin_config(), gradient_checkpointing=gradient_checkpointing)
  tokens, positions = jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None]
  # with gradient checkpointing (its default) each block is wrapped in nn.remat,
  # which returns the block's variables sorted; without, the dict follows use:
  # the recurrent block declares linear_out before conv_1d and rg_lru, and uses it last
  fresh = "warns" if gradient_checkpointing else "use order"
  return Case(lambda: model.init(KEY, tokens, positions), _griffin_order(), fresh)


CASES: dict[str, Callable[[], Case]] = {
    "flax-imagenet-resnet18": _imagenet_resnet18,
    "flax-lm1b": _lm1b,
    "flax-wmt": _wmt,
    "flax-nlp_seq": _nlp_seq,
    "flax-sst2": _sst2,
    "flax-vae": _vae,
    "flax-seq2seq": _seq2seq,
    "flax-ppo": _ppo,
    "gemma-llm": _gemma,
    "recurrentgemma-griffin-remat": lambda: _griffin(True),
    "recurrentgemma-griffin": lambda: _griffin(False),
}


def _no_order_warning():
  """No lost-order warning, and no stacked block (none of these models stacks its layers)."""
  return no_stac_warning()


def _outcome(tree: Any) -> tuple[str, tuple[str, ...] | None]:
  """What stac makes of a dict: ("refused" | "warns" | "silent", module order)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      part = stac_optax.partition_modules(tree)
    except stac_optax.ModuleOrderError:
      return "refused", None
  warned = any(w.category is stac_optax.ModuleOrderWarning for w in caught)
  return ("warns" if warned else "silent"), part.module_names


@pytest.mark.parametrize("name", list(CASES))
def test_the_builder_gives_the_registration_order_and_a_sorted_dict_is_never_silent(name):
  case = CASES[name]()
  with _no_order_warning():
    part = stac_optax.partition_modules(case.build)
  assert part.module_names == case.order
  for n in (1, 3, len(case.order) // 2):
    assert stac_optax.partition_modules(part, last_n_modules=n).adamw_module_names == case.order[-n:]

  outcome, _ = _outcome(jax.eval_shape(case.build))  # sorted, as jax.jit(model.init) returns it
  assert outcome in ("refused", "warns")

  fresh: list[tuple[str, Any]] = []
  jax.eval_shape(lambda: fresh.append(_outcome(case.build())))  # the dict as init makes it
  outcome, order = fresh[0]
  if case.fresh == "same":
    assert (outcome, order) == ("silent", case.order)  # no false warning
  elif case.fresh == "warns":
    assert outcome == "warns" and order != case.order  # a lifted transform sorted a part
  else:
    assert outcome == "silent" and order != case.order  # first use: the builder is needed
    assert sorted(order) == sorted(case.order)


def test_recurrentgemma_griffin_orders_as_its_pytorch_twin_in_stac_optimizer():
  twin = corpus.recurrentgemma("torch").Griffin(_griffin_config())
  count = len(_griffin_order())
  flax_part = stac_optax.partition_modules(_griffin(True).build)
  for n in range(1, count + 1):
    theirs = stac_optimizer.partition_trainable_modules(twin, last_n_modules=n)
    mine = stac_optax.partition_modules(flax_part, last_n_modules=n)
    assert mine.adamw_module_names == tuple(m.replace(".", "/").replace("blocks/", "blocks.", 1)
                                            for m in theirs.adamw_module_names)
  default = stac_optimizer.partition_trainable_modules(twin)
  assert flax_part.adamw_module_names == tuple(
      m.replace(".", "/").replace("blocks/", "blocks.", 1) for m in default.adamw_module_names
  )


def _sizes(shapes) -> tuple[int, ...]:
  return tuple(sorted(int(np.prod(s)) for s in shapes))


def test_flax_imagenet_resnet18_orders_as_torchvision_resnet18_in_stac_optimizer(torchvision_resnet):  # noqa: F811
  twin = torchvision_resnet.resnet18(num_classes=10)
  theirs = stac_optimizer.partition_trainable_modules(twin, last_n_modules=1)
  model = corpus.flax_example("imagenet").ResNet18(num_classes=10, num_filters=64)
  mine = stac_optax.partition_modules(
      lambda: model.init(KEY, jnp.ones((1, 32, 32, 3)), train=False), last_n_modules=1
  )
  modules = dict(twin.named_modules())
  torch_order = [name for name, m in twin.named_modules()
                 if any(True for _ in m.parameters(recurse=False))]
  assert theirs.trainable_module_count == len(mine.module_names) == len(torch_order) == 41
  shapes = dict(mine.parameter_shapes)
  for flax_module, torch_module in zip(mine.modules, torch_order, strict=True):
    flax_sizes = _sizes(shapes[p] for p in flax_module.parameter_names)
    torch_sizes = _sizes(tuple(p.shape) for p in modules[torch_module].parameters(recurse=False))
    assert flax_sizes == torch_sizes, (flax_module.name, torch_module)
  assert theirs.adamw_module_names == ("fc",) and mine.adamw_module_names == ("Dense_0",)
  assert isinstance(modules["fc"], torch.nn.Linear)
