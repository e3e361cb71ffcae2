"""The peak memory of a whole jitted train step, in exact bytes.

XLA's buffer assignment of one donated train step (forward, backward and
update; ``benchmarks.memory.step_memory``) on a fixed model: 8 Dense layers
256 -> 256 with biases, ReLU, a squared loss, a batch of 8 rows, float32.
STAC's default cap is the last of the 8 layers. No step runs and nothing is
timed: the byte counts are a property of the compiled program (JAX 0.10.2,
XLA:CPU here). A change that makes the step keep a parameter-sized buffer
more (a whole gradient held for the guard, a copy of the moments) moves
them by at least 65,792 x 4 bytes and fails here.

    peak = arguments + outputs + temporaries - aliased bytes

- arguments: params, optimizer state and the batch;
- aliased: params and state, donated and written in place, so they count
  once;
- outputs: the new params and state (the aliased bytes), the loss (4 bytes)
  and XLA's table of output pointers (8 bytes per output array);
- temporaries: what backpropagation and the update keep alive at the worst
  moment (activations, weight gradients not yet consumed, and for the
  guarded step whatever waits for its finiteness flag).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import stac_optax
from benchmarks import memory

WIDTH, LAYERS, ROWS = 256, 8, 8
LAYER = (WIDTH * WIDTH + WIDTH) * 4  # one Dense layer's params: 263,168 bytes
PARAMS = LAYERS * LAYER  # 2,105,344
BATCH = 2 * ROWS * WIDTH * 4  # x and y: 16,384
CAP_STATE = 2 * LAYER + 4  # the last layer's two moments and the step count
STAC_STATE = CAP_STATE + 4  # and the skip counter
TRUNK_GRADIENTS = (LAYERS - 1) * LAYER  # 1,842,176
HELD_SIGNS = (LAYERS - 1) * WIDTH * WIDTH // 2  # the trunk kernels' signs, half a byte each
KEPT_WHOLE = (LAYERS - 1) * WIDTH * 4 + LAYER  # trunk biases (too small to hold) and the cap

# The temporaries of this compiled step. The unguarded step (and optax.adamw)
# holds the activations and about two layers' weight gradients at once: XLA
# consumes each gradient as backpropagation produces it. The guarded step
# holds, until its flag is known, the trunk kernels' signs (half a byte
# each), and the trunk biases' and the cap's gradients whole; what of that is
# live at the worst moment is the difference, 157,568 bytes, less than one
# layer's kernel (262,144).
TEMP_UNGUARDED = 639_044
TEMP_DEFAULT = 796_612


@pytest.fixture(scope="module")
def steps():
  params = memory.mlp_params(WIDTH, LAYERS)
  batch = memory.abstract_batch(ROWS, WIDTH, WIDTH)
  part = stac_optax.partition_modules(params)
  assert part.adamw_module_names == ("layer_7",)
  composed = optax.partition(
      {stac_optax.SIGN: stac_optax.sign_trunk(1e-3),
       stac_optax.ADAMW: optax.adamw(1e-3),
       stac_optax.FROZEN: stac_optax.keep_unchanged()},
      part.labels,
  )
  txs = {
      "default": stac_optax.stac(part),
      "unguarded": stac_optax.stac(part, skip_nonfinite=False),
      "composed without guard": composed,
  }
  return {name: memory.step_memory(tx, params, memory.mlp_loss, batch) for name, tx in txs.items()}


def _outputs(state_arrays: int) -> int:
  return PARAMS + STAC_STATE + 4 + 8 * (2 * LAYERS + state_arrays + 1)


@pytest.mark.parametrize("name", ["default", "unguarded"])
def test_arguments_outputs_and_aliases_are_params_state_and_batch(steps, name):
  r = steps[name]
  assert r["state_bytes"] == STAC_STATE, r
  assert r["argument_bytes"] == PARAMS + STAC_STATE + BATCH, r
  assert r["alias_bytes"] == PARAMS + STAC_STATE, r
  # outputs: 16 param arrays, count + 2 x 2 moment arrays + skip counter, the loss
  assert r["output_bytes"] == _outputs(state_arrays=6), r


def test_peak_of_the_default_and_the_unguarded_step_in_exact_bytes(steps):
  default, unguarded = steps["default"], steps["unguarded"]
  assert unguarded["temp_bytes"] == TEMP_UNGUARDED, unguarded
  assert default["temp_bytes"] == TEMP_DEFAULT, default
  fixed = BATCH + 8 * 23 + 4  # the batch, the output pointers and the loss
  assert unguarded["peak_bytes"] == PARAMS + STAC_STATE + fixed + TEMP_UNGUARDED
  assert default["peak_bytes"] == PARAMS + STAC_STATE + fixed + TEMP_DEFAULT


def test_the_guard_holds_the_trunk_signs_and_the_cap_gradient_not_the_trunk_gradients(steps):
  extra = steps["default"]["temp_bytes"] - steps["unguarded"]["temp_bytes"]
  # at most what must wait for the flag (499,712 bytes), far from the trunk's
  # gradients, which a guard holding whole gradients keeps
  assert 0 <= extra <= HELD_SIGNS + KEPT_WHOLE < TRUNK_GRADIENTS, extra


def test_stac_without_the_guard_peaks_as_the_composed_partition(steps):
  unguarded, composed = steps["unguarded"], steps["composed without guard"]
  assert unguarded["temp_bytes"] == composed["temp_bytes"]
  # the same buffers, but for the skip counter (4 bytes and its output pointer)
  assert unguarded["peak_bytes"] - composed["peak_bytes"] == 4 + 8


def test_the_held_signs_are_the_signs_bit_for_bit():
  from stac_optax import held_signs

  @jax.jit
  def round_trip(value):
    held = held_signs.hold_signs(value)
    finite = held_signs.hold_signs(jnp.nan_to_num(value, nan=1.0, posinf=1.0, neginf=-1.0))
    return (held.codes, held_signs.read_signs(held), held_signs.nonfinite_flag(held),
            held_signs.nonfinite_flag(finite))

  x = jnp.array([[-0.0, 0.0, 1.5, -2.0, jnp.nan], [jnp.inf, -jnp.inf, 3e-38, -1e-45, 7.0]])
  for dtype in (jnp.float32, jnp.bfloat16):
    for shape, packed in (((2, 5), (1, 5)), ((10,), (5,)), ((5, 2), (5, 1))):
      value = x.astype(dtype).reshape(shape)
      codes, signs, bad, good = round_trip(value)
      assert codes.dtype == jnp.uint8 and codes.shape == packed
      expected = jnp.sign(value)
      assert signs.dtype == expected.dtype and signs.shape == expected.shape
      nan = jnp.isnan(expected)
      assert bool(jnp.all(jnp.where(nan, jnp.isnan(signs), signs == expected)))
      assert bool(jnp.all(jnp.where(nan, True, jnp.signbit(signs) == jnp.signbit(expected))))
      assert bool(jnp.isnan(bad)) and float(good) == 0.0  # one NaN and two Infs; none
  odd = jnp.array([[1.0, -0.0, jnp.inf], [-3.0, 0.0, 2.0], [0.5, -0.5, -0.0]])
  held = held_signs.hold_signs(odd)  # no even axis: the first is padded
  assert held.codes.shape == (2, 3) and (held.axis, held.width) == (0, 3)
  signs = held_signs.read_signs(held)
  assert signs.tolist() == [[1.0, -0.0, 1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, -0.0]]
  assert jnp.signbit(signs).tolist() == [[False, True, False], [True, False, False], [False, True, True]]
