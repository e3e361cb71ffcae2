"""The compiled step grows linearly with the number of parameter leaves.

The measure is the instruction count of the optimized HLO of a jitted,
donated train step (update + ``optax.apply_updates``), which is deterministic
for a given XLA. It catches the guard's old quadratic form: per-leaf flags
combined by one ``jnp.all`` became a chain of scalar ``and`` operations that
XLA's fusion pass copied into every consumer of the step's flag, and the
count of the "default" step below grew by 226 instructions a leaf from 21 to
37 leaves and by 371 from 37 to 69 (``optax.adamw``: 51 and 51). The jaxpr
and the lowered StableHLO grew linearly even then: the copies are made by
the compiler. No timings here: ``benchmarks/compile.py`` measures those.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import stac_optax
from benchmarks import common

WD = 1e-2

# The cap is held at the last modules (final_norm and head), or holds every
# module, so that each added block adds leaves of one kind and a linear step
# grows by the same count per block.
CONFIGS = {
    "default": dict(last_n_modules=2),
    "0.1.x momentum": dict(
        sign_momentum=0.9, sign_lr_scale=0.75, last_n_modules=1, sign_weight_decay=WD,
        exclude_bias_from_weight_decay=False, exclude_1d_from_weight_decay=False),
    "amsgrad, all cap": dict(amsgrad=True, last_n_ratio=1.0),
    "maximize": dict(maximize=True, last_n_modules=2),
    "error_if_nonfinite": dict(error_if_nonfinite=True, last_n_modules=2),
    "frozen norms": dict(trainable=lambda name, leaf: "ln" not in name, last_n_modules=2),
}
BLOCKS = (1, 2, 4)  # 21, 37 and 69 leaves


def _instructions(tx, params) -> int:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(jnp.ones_like, params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
  return sum(" = " in line for line in compiled.as_text().splitlines())


def _counts(make):
  """(leaves, instructions) of the compiled step at each size of BLOCKS."""
  out = []
  for blocks in BLOCKS:
    params = common.transformer_params(blocks, d=8, ff=16, vocab=16)
    out.append((len(jax.tree.leaves(params)), _instructions(make(params), params)))
  return out


@pytest.fixture(scope="module")
def adamw_counts():
  return _counts(lambda params: optax.adamw(1e-3, weight_decay=WD))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_step_grows_linearly_in_the_number_of_leaves(config, adamw_counts):
  counts = _counts(lambda params: stac_optax.stac(params, 1e-3, weight_decay=WD, **CONFIGS[config]))
  (l0, c0), (l1, c1), (l2, c2) = counts
  per_leaf_small, per_leaf_large = (c1 - c0) / (l1 - l0), (c2 - c1) / (l2 - l1)
  # linear: each added leaf costs the same (the old guard: 1.6x more from 37 leaves on)
  assert per_leaf_large <= 1.1 * per_leaf_small, counts
  # and each leaf costs about what it costs optax.adamw (AMSGrad keeps a third buffer)
  (a1, n1), (a2, n2) = adamw_counts[1:]
  assert per_leaf_large <= 2 * (n2 - n1) / (a2 - a1), (counts, adamw_counts)
