"""How the registration-order checks do on real model definitions.

For each model of the corpus (``tests/corpus.py``: Flax's linen examples,
recurrentgemma's Griffin, gemma-llm's Gemma), at the small sizes the test
suite uses and at published sizes, everything abstract (``jax.eval_shape``,
no parameter memory):

* ``modules``: the counted modules the builder gives, with no warning (the
  test suite checks their order against the source at the small sizes);
* ``fresh``: what a fresh, unjitted ``model.init`` dict gives: ``same``
  (the registration order, no warning), ``false warning`` (right order, a
  warning), ``warns`` (wrong order, a warning), ``silent`` (wrong order, no
  warning);
* ``jitted``: what the sorted dict ``jax.jit(model.init)`` returns gives:
  ``refused``, ``warns`` or ``silent``; ``old_rule`` says what the previous
  rule (warn only at odds of 1 in 24 or less) would have done.

    python -m benchmarks.order_corpus [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import stac_optax
from tests import corpus
from tests import test_corpus as cases
from tests import test_linen_order as linen_order_tests

KEY = jax.random.key(0)


def _outcome(tree: Any) -> tuple[str, tuple[str, ...] | None, str]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      part = stac_optax.partition_modules(tree)
    except stac_optax.ModuleOrderError as error:
      return "refused", None, str(error)
  messages = [str(w.message) for w in caught if w.category is stac_optax.ModuleOrderWarning]
  return ("warns" if messages else "silent"), part, " ".join(messages)


def _old_rule(outcome: str, message: str) -> str:
  """What the 1-in-24 rule did with the same sorted tree."""
  if outcome != "warns":
    return outcome
  odds = re.search(r"once in ([\d,]+)", message)
  return "warns" if odds and int(odds.group(1).replace(",", "")) >= 24 else "silent"


def measure(build: Callable[[], Any]) -> dict[str, Any]:
  with warnings.catch_warnings():
    warnings.simplefilter("error", stac_optax.ModuleOrderWarning)
    built = stac_optax.partition_modules(build)
  fresh: list = []
  jax.eval_shape(lambda: fresh.append(_outcome(build())))
  outcome, fresh_part, _ = fresh[0]
  if fresh_part is not None and fresh_part.module_names == built.module_names:
    fresh_text = "false warning" if outcome == "warns" else "same"
  else:
    fresh_text = outcome
  jitted, jitted_part, message = _outcome(jax.eval_shape(build))
  return {
      "modules": len(built.module_names),
      "cap_size": len(built.adamw_module_names),
      "last_module": built.module_names[-1],
      "fresh": fresh_text,
      "fresh_cap_right": fresh_part is not None and fresh_part.adamw_module_names == built.adamw_module_names,
      "jitted": jitted,
      "jitted_cap_right": jitted_part is not None and jitted_part.adamw_module_names == built.adamw_module_names,
      "old_rule": _old_rule(jitted, message),
  }


def _large() -> dict[str, Callable[[], Any]]:
  """Published sizes (abstract: nothing is allocated)."""
  imagenet, lm1b, wmt = (corpus.flax_example(n) for n in ("imagenet", "lm1b", "wmt"))
  images = jnp.ones((1, 224, 224, 3))
  tokens = jnp.zeros((1, 8), jnp.int32)
  builders: dict[str, Callable[[], Any]] = {
      "flax-imagenet-resnet50": lambda: imagenet.ResNet50(num_classes=1000).init(KEY, images, train=False),
  }
  for layers in (6, 12):
    config = lm1b.TransformerConfig(vocab_size=30000, output_vocab_size=30000, num_layers=layers,
                                    deterministic=True)
    builders[f"flax-lm1b-{layers}-layers"] = (
        lambda config=config: lm1b.TransformerLM(config).init(KEY, tokens))
  config = wmt.TransformerConfig(vocab_size=32000, output_vocab_size=32000, share_embeddings=True,
                                 logits_via_embedding=True, deterministic=True)
  builders["flax-wmt-6+6-layers"] = lambda: wmt.Transformer(config).init(KEY, tokens, tokens)
  griffin = corpus.recurrentgemma("jax")
  preset = griffin.GriffinConfig.from_preset(griffin.Preset.RECURRENT_GEMMA_2B_V1, vocab_size=1024)
  model = griffin.Griffin(preset)
  builders["recurrentgemma-2b-griffin-remat"] = lambda: model.init(KEY, tokens, jnp.arange(8)[None])
  return builders


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the small sizes only")
  parser.add_argument("--out", default=None, help="write the JSON result here")
  args = parser.parse_args(argv)
  builders = {name: make().build for name, make in cases.CASES.items()}
  if not args.quick:
    builders.update(_large())
  models = {name: measure(build) for name, build in builders.items()}
  small = {  # the small everyday models of tests/test_linen_order.py (this project's)
      f"small-{name}": measure(lambda model=model, x=x: model.init(KEY, x))
      for name, (model, x) in linen_order_tests.SMALL.items()
  }
  fresh_right = [m for m in models.values() if m["fresh"] in ("same", "false warning")]
  result = {
      "benchmark": "order",
      "machine": "CPU, JAX " + jax.__version__,
      "models": models,
      "fresh_false_warnings": sum(m["fresh"] == "false warning" for m in fresh_right),
      "fresh_right_order": len(fresh_right),
      "jitted_silent": sum(m["jitted"] == "silent" for m in models.values()),
      "jitted_silent_old_rule": sum(m["old_rule"] == "silent" for m in models.values()),
      "small_models": small,
      "small_jitted_silent": sum(m["jitted"] == "silent" for m in small.values()),
      "small_jitted_silent_old_rule": sum(m["old_rule"] == "silent" for m in small.values()),
  }
  text = json.dumps(result, indent=2)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return result


if __name__ == "__main__":
  main()
