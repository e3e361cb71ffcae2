"""Stacked (scanned) layers count as one module per layer, as in the unrolled model.

Every stacked form (linen ``nn.scan``, an NNX block built under ``nnx.vmap``,
plain dicts with the layer axis at 0 or 1) is checked against its unrolled
twin: the same module names and cap for every cap size, the same parameters
after jitted, donated steps, the same optimizer state bytes.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import stac_optax
from stac_optax import stacked as stacked_lib
from tests import stacked_models as sm

CAPS = [
    {"last_n_ratio": 0.125},
    {"last_n_ratio": 0.25},
    {"last_n_ratio": 0.5},
    {"last_n_ratio": 1.0},
    {"last_n_modules": 2},  # blocks/5/norm, head: inside the last layer
    {"last_n_modules": 4},  # from blocks/4/norm
    {"last_n_modules": 8},  # from blocks/3/down
]


@pytest.fixture(scope="module")
def twin_partitions():
  model = sm.NNXUnrolledNet(nnx.Rngs(0))
  return {str(cap): stac_optax.partition_modules(model, **cap) for cap in CAPS}


def _stacked_forms():
  """(form name, stacked model or params, stac arguments) for each form."""
  params = sm.linen_scan_params()
  twin = sm.unrolled(params)
  return {
      "linen_scan": (params, {"stacked_modules": {"blocks": 0}, "module_order": sm.ORDER}),
      "nnx_vmap": (lambda: sm.NNXVmapNet(nnx.Rngs(0)), {"stacked_modules": {"blocks": 0}}),
      "dict_axis0": (sm.stack(twin, axis=0), {"stacked_modules": {"blocks": 0}}),
      "dict_axis1": (sm.stack(twin, axis=1), {"stacked_modules": {"blocks": 1}}),
  }


FORMS = ("linen_scan", "nnx_vmap", "dict_axis0", "dict_axis1")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cap", CAPS, ids=str)
def test_module_names_and_cap_equal_the_unrolled_twins(form, cap, twin_partitions):
  model, kwargs = _stacked_forms()[form]
  part = stac_optax.partition_modules(model, **kwargs, **cap)
  twin = twin_partitions[str(cap)]
  assert part.module_names == twin.module_names
  assert part.adamw_module_names == twin.adamw_module_names
  assert len(part.modules) == 2 + 3 * sm.LAYERS
  for mine, theirs in zip(part.modules, twin.modules, strict=True):
    assert sorted(mine.parameter_names) == sorted(theirs.parameter_names)


def test_the_issue_example_caps_blocks_5_down_norm_and_head():
  part = stac_optax.partition_modules(
      sm.linen_scan_params(), stacked_modules={"blocks": 0}, module_order=sm.ORDER,
      last_n_modules=3,
  )
  assert part.adamw_module_names == ("blocks/5/down", "blocks/5/norm", "head")
  # each block array whose last layer is in the cap is cut there
  assert part.splits_layers
  assert part.label_of("blocks/5/down/kernel") == "adamw"
  assert part.label_of("blocks/4/down/kernel") == "sign"
  assert part.label_of("blocks/5/up/kernel") == "sign"
  split = part.label_of("blocks/down/kernel")
  assert (split.trunk, split.cap) == ("sign", "adamw")
  assert part.label_of("blocks/up/kernel") == "sign"


def test_without_stacked_modules_a_scanned_model_is_five_modules():
  """What the mapping changes: without it, the stacked arrays are single modules."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stac_optax.ModuleOrderWarning)
    part = stac_optax.partition_modules(sm.linen_scan_params(), stacked_modules={})
  assert part.module_names == ("stem", "blocks/down", "blocks/norm", "blocks/up", "head")


# -- order inside a stacked block ---------------------------------------------


def test_sorted_submodules_of_nn_scan_warn_and_name_the_fix():
  with pytest.warns(stac_optax.ModuleOrderWarning, match="module_order") as record:
    part = stac_optax.partition_modules(sm.linen_scan_params(), stacked_modules={"blocks": 0})
  assert "'blocks/down', 'blocks/norm', 'blocks/up'" in str(record[0].message)
  assert record[0].filename == __file__  # points at the user's line
  assert part.module_names[1:4] == ("blocks/0/down", "blocks/0/norm", "blocks/0/up")


def test_a_linen_builder_records_the_order_inside_nn_scan():
  def build():
    return sm.LinenScanNet().init(jax.random.key(0), jnp.ones((1, sm.WIDTH)))

  with warnings.catch_warnings():
    warnings.simplefilter("error", stac_optax.ModuleOrderWarning)
    part = stac_optax.partition_modules(build, stacked_modules={"blocks": 0}, last_n_modules=3)
  twin = stac_optax.partition_modules(sm.NNXUnrolledNet(nnx.Rngs(0)), last_n_modules=3)
  assert part.module_names == twin.module_names
  assert part.adamw_module_names == ("blocks/5/down", "blocks/5/norm", "head")


@pytest.mark.parametrize("form", ["nnx_vmap", "dict_axis0"])
def test_recorded_or_unsorted_orders_do_not_warn(form):
  model, kwargs = _stacked_forms()[form]
  with warnings.catch_warnings():
    warnings.simplefilter("error", stac_optax.ModuleOrderWarning)
    part = stac_optax.partition_modules(model, **kwargs)
  assert part.module_names[1:4] == ("blocks/0/up", "blocks/0/down", "blocks/0/norm")


def test_nnx_vmap_block_keeps_its_order_through_nnx_split_and_merge():
  graphdef, state = nnx.split(sm.NNXVmapNet(nnx.Rngs(0)))
  rebuilt = nnx.merge(graphdef, state)
  part = stac_optax.partition_modules(rebuilt, stacked_modules={"blocks": 0}, last_n_modules=3)
  assert part.adamw_module_names == ("blocks/5/down", "blocks/5/norm", "head")


def test_module_order_may_name_every_layer():
  twin = stac_optax.partition_modules(sm.NNXUnrolledNet(nnx.Rngs(0)), last_n_modules=5)
  part = stac_optax.partition_modules(
      sm.linen_scan_params(), stacked_modules={"blocks": 0},
      module_order=twin.module_names, last_n_modules=5,
  )
  assert part.module_names == twin.module_names
  assert part.adamw_module_names == twin.adamw_module_names


def test_module_order_errors_name_both_forms():
  with pytest.raises(ValueError, match="each stacked sub-module once"):
    stac_optax.partition_modules(
        sm.linen_scan_params(), stacked_modules={"blocks": 0},
        module_order=("stem", "blocks/up", "head"),
    )
  with pytest.raises(ValueError, match="must be listed together"):
    stac_optax.partition_modules(
        sm.linen_scan_params(), stacked_modules={"blocks": 0},
        module_order=("blocks/up", "stem", "blocks/down", "blocks/norm", "head"),
    )


def test_a_layer_of_the_cap_before_a_layer_of_the_trunk_is_refused():
  twin = stac_optax.partition_modules(sm.NNXUnrolledNet(nnx.Rngs(0)))
  names = list(twin.module_names)
  names.remove("blocks/0/up")
  names.append("blocks/0/up")  # layer 0 of blocks/up last: in the cap, layers 1-5 not
  with pytest.raises(ValueError, match="last layers"):
    stac_optax.partition_modules(
        sm.linen_scan_params(), stacked_modules={"blocks": 0}, module_order=names,
        last_n_modules=1,
    )


# -- reading the layer axis from logical axis names -----------------------------


class _PartitionedBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    dense = lambda n, name, names: nn.Dense(  # noqa: E731
        n, name=name, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), names)
    )
    h = dense(sm.HIDDEN, "up", ("embed", "mlp"))(x)
    x = x + dense(sm.WIDTH, "down", ("mlp", "embed"))(nn.relu(h))
    return nn.LayerNorm(name="norm", scale_init=nn.with_partitioning(nn.initializers.ones, ("embed",)))(x), None


class _PartitionedNet(nn.Module):
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(sm.WIDTH, name="stem")(x)
    x, _ = nn.scan(
        _PartitionedBlock, variable_axes={"params": self.axis}, split_rngs={"params": True},
        length=sm.LAYERS, metadata_params={nn.PARTITION_NAME: "layers"},
    )(name="blocks")(x, None)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(2, name="head")(x)


@pytest.mark.parametrize("axis", [0, 1])
def test_the_layer_axis_is_read_from_linen_logical_axis_names(axis):
  def build():
    return _PartitionedNet(axis).init(jax.random.key(0), jnp.ones((1, sm.WIDTH)))

  order = ("stem", "blocks/up", "blocks/down", "blocks/norm", "final_norm", "head")
  part = stac_optax.partition_modules(build, module_order=order, last_n_modules=3)
  assert part.stacked_axes == {"blocks": axis}
  assert part.adamw_module_names == ("blocks/5/norm", "final_norm", "head")
  # the unboxed params (what training sees) get the same labels after a split
  params = nn.unbox(build()["params"])
  labels = part.labels(part.split(params))
  assert labels["blocks"]["norm"]["bias"].cap == "adamw"
  # {} turns the reading off; a wrong axis name matches nothing
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stac_optax.ModuleOrderWarning)
    flat = stac_optax.partition_modules(build, stacked_modules={})
  assert "blocks/up" in flat.module_names
  with pytest.raises(ValueError, match="matched no parameter"):
    stac_optax.partition_modules(build, stacked_modules="stack")


def test_the_layer_axis_is_read_from_nnx_transform_metadata():
  class Block(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
      self.up = nnx.Linear(sm.WIDTH, sm.HIDDEN, kernel_init=init, rngs=rngs)
      self.down = nnx.Linear(sm.HIDDEN, sm.WIDTH, rngs=rngs)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Linear(sm.WIDTH, sm.WIDTH, rngs=rngs)

      @nnx.split_rngs(splits=sm.LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(rngs):
        return Block(rngs)

      self.blocks = create(rngs)
      self.head = nnx.Linear(sm.WIDTH, 2, rngs=rngs)

  with jax.set_mesh(jax.make_mesh((1, 1), ("embed", "mlp"))):
    model = Net(nnx.Rngs(0))
  # only blocks/up carries the name: guessing would stack blocks/up alone
  with pytest.raises(ValueError, match=r"\{'blocks': 0\}"):
    stac_optax.partition_modules(model, last_n_modules=2)
  part = stac_optax.partition_modules(model, last_n_modules=2, stacked_modules={"blocks": 0})
  assert part.adamw_module_names == ("blocks/5/down", "head")

  class Marked(nnx.Module):  # every kernel and bias of the block carries it
    def __init__(self, rngs):
      kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
      bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",))
      self.up = nnx.Linear(sm.WIDTH, sm.HIDDEN, kernel_init=kernel, bias_init=bias, rngs=rngs)
      self.down = nnx.Linear(sm.HIDDEN, sm.WIDTH, kernel_init=kernel, bias_init=bias, rngs=rngs)

  Block = Marked  # noqa: F811
  with jax.set_mesh(jax.make_mesh((1, 1), ("embed", "mlp"))):
    model = Net(nnx.Rngs(0))
  part = stac_optax.partition_modules(model, last_n_modules=2)
  assert part.stacked_axes == {"blocks": 0}
  assert part.adamw_module_names == ("blocks/5/down", "head")


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stacked_modules", "error", "match"),
    [
        ({"block": 0}, ValueError, "not a module holding parameters"),
        ({"blocks": 3}, ValueError, "only 2 axes"),
        ({"blocks": -1}, ValueError, "non-negative"),
        ({"blocks": 1}, ValueError, "disagree on the number of layers"),
        ({"blocks": "0"}, TypeError, "not an int"),
        ({"blocks": 0, "blocks/up": 0}, ValueError, "nested stacking"),
        (["blocks"], TypeError, "must be a mapping"),
    ],
)
def test_bad_stacked_modules_are_refused(stacked_modules, error, match):
  with pytest.raises(error, match=match):
    stac_optax.stac(
        sm.stack(sm.unrolled(sm.linen_scan_params())), stacked_modules=stacked_modules
    )


def test_a_stacked_array_cut_by_the_cap_must_be_split_before_labels():
  params = sm.stack(sm.unrolled(sm.linen_scan_params()))
  part = stac_optax.partition_modules(params, stacked_modules={"blocks": 0}, last_n_modules=3)
  with pytest.raises(ValueError, match="partition.split"):
    part.labels(params)
  merged = part.merge(part.split(params))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merged, params))


def test_partition_round_trips_through_its_dict():
  part = stac_optax.partition_modules(
      sm.linen_scan_params(), stacked_modules={"blocks": 0}, module_order=sm.ORDER,
      last_n_modules=4,
  )
  again = stac_optax.STACPartition.from_dict(part.to_dict())
  assert again == part and again.difference(part) is None
  flat = stac_optax.partition_modules(sm.unrolled(sm.linen_scan_params()), last_n_modules=4)
  assert "stacked modules" in part.difference(flat)


# -- the steps ----------------------------------------------------------------

CONFIGS = {
    "default": {"last_n_modules": 4, "weight_decay": 0.1},
    "momentum_0.1.x": {
        "last_n_modules": 5, "sign_momentum": 0.9, "sign_lr_scale": 0.75,
        "weight_decay": 0.1, "sign_weight_decay": 0.1,
        "exclude_bias_from_weight_decay": False, "exclude_1d_from_weight_decay": False,
    },
    "amsgrad": {"last_n_modules": 8, "amsgrad": True, "weight_decay": 0.05},
    "frozen": {"last_n_modules": 4, "trainable": lambda name, _: "norm" not in name},
    "maximize_schedule": {
        "last_n_ratio": 0.5, "maximize": True,
        "learning_rate": optax.linear_schedule(1e-2, 1e-3, 12),
    },
}
STEPS = 12
NAN_STEP = 5


def _run(tx, params, grads):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _grads(twin, seed=0):
  out = []
  for i in range(STEPS):
    leaves, treedef = jax.tree.flatten(twin)
    keys = jax.random.split(jax.random.key(seed + i), len(leaves))
    g = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    if i == NAN_STEP:
      g["blocks"]["2"]["up"]["kernel"] = g["blocks"]["2"]["up"]["kernel"].at[0, 0].set(jnp.nan)
    out.append(g)
  return out


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_jitted_donated_steps_equal_the_unrolled_twins(config, axis):
  kwargs = dict(CONFIGS[config])
  learning_rate = kwargs.pop("learning_rate", 1e-2)
  twin = sm.unrolled(sm.linen_scan_params())
  params = sm.stack(twin, axis=axis)
  grads = _grads(twin)
  tx_twin = stac_optax.stac(twin, learning_rate, **kwargs)
  tx = stac_optax.stac(params, learning_rate, stacked_modules={"blocks": axis}, **kwargs)
  twin_after, twin_state = _run(tx_twin, jax.tree.map(jnp.copy, twin), grads)
  after, state = _run(tx, jax.tree.map(jnp.copy, params), [sm.stack(g, axis=axis) for g in grads])

  got = sm.unrolled(after, axis=axis)
  for (name, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(twin_after),
      strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(name))
  assert not np.allclose(got["blocks"]["0"]["up"]["kernel"], twin["blocks"]["0"]["up"]["kernel"])
  assert stac_optax.nonfinite_skipped_steps(state) == 1
  assert stac_optax.nonfinite_skipped_steps(twin_state) == 1
  assert _nbytes(state) == _nbytes(twin_state)


def test_the_cap_moments_exist_for_the_cap_layers_only():
  params = sm.stack(sm.unrolled(sm.linen_scan_params()))
  tx = stac_optax.stac(params, stacked_modules={"blocks": 0}, last_n_modules=3)
  state = tx.init(params)
  mu = state.inner_state.inner_states["adamw"].inner_state[0].mu
  down = mu["blocks"]["down"]["kernel"]
  assert isinstance(down, stacked_lib.LayerSplit)
  assert down.cap.shape == (1, sm.HIDDEN, sm.WIDTH)  # layer 5 only
  assert isinstance(mu["blocks"]["up"]["kernel"], optax.MaskedNode)  # all six in the trunk
  stac_optax.validate_state(state, params, stacked_modules={"blocks": 0}, last_n_modules=3)
  with pytest.raises(ValueError, match="module .blocks/5/up. .#16 of 20. is in this partition.s cap"):
    stac_optax.validate_state(state, params, stacked_modules={"blocks": 0}, last_n_modules=4)


def test_a_zero_gradient_leaves_a_stacked_norm_scale_unchanged():
  """Decay exemptions hold per layer: a stacked (L, d) scale is 1-D per layer."""
  params = sm.stack(sm.unrolled(sm.linen_scan_params()))
  for cap in (0, 3, 20):
    tx = stac_optax.stac(params, 0.1, stacked_modules={"blocks": 0}, last_n_modules=cap,
                         weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert not jnp.any(updates["blocks"]["norm"]["scale"]), cap
    assert jnp.all(updates["blocks"]["up"]["kernel"] != 0), cap  # 3-D kernels do decay
  mask = stac_optax.weight_decay_mask(params, stacked_modules={"blocks": 0})
  assert mask["blocks"]["norm"]["scale"] is False and mask["blocks"]["up"]["kernel"] is True
  assert stac_optax.weight_decay_mask(params)["blocks"]["norm"]["scale"] is True


def test_nnx_optimizer_trains_a_vmapped_model_like_its_unrolled_twin():
  model = sm.NNXVmapNet(nnx.Rngs(0))
  twin = sm.NNXUnrolledNet(nnx.Rngs(1))
  # same weights: copy each stacked layer into the twin
  weights = sm.unrolled(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  weights["blocks"] = {int(i): layer for i, layer in weights["blocks"].items()}
  twin_state = nnx.state(twin, nnx.Param)
  nnx.replace_by_pure_dict(twin_state, weights)
  nnx.update(twin, twin_state)
  kwargs = {"last_n_modules": 4, "weight_decay": 0.1}
  opt = nnx.Optimizer(model, stac_optax.stac(model, 1e-2, stacked_modules={"blocks": 0}, **kwargs),
                      wrt=nnx.Param)
  opt_twin = nnx.Optimizer(twin, stac_optax.stac(twin, 1e-2, **kwargs), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(3), (8, sm.WIDTH))

  def loss(m):
    return jnp.mean(m(x) ** 2)

  def twin_loss(m):
    h = m.stem(x)
    for block in m.blocks:
      h = block(h)
    return jnp.mean(m.head(h) ** 2)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(loss)(model))

  @nnx.jit
  def twin_step(model, opt):
    opt.update(model, nnx.grad(twin_loss)(model))

  for _ in range(10):
    step(model, opt)
    twin_step(twin, opt_twin)
  got = sm.unrolled(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = nnx.to_pure_dict(nnx.state(twin, nnx.Param))
  want["blocks"] = {str(i): layer for i, layer in want["blocks"].items()}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert not np.allclose(got["blocks"]["0"]["up"]["kernel"], weights["blocks"][0]["up"]["kernel"])
  assert _nbytes(opt.opt_state) == _nbytes(opt_twin.opt_state)


def test_sharded_stacked_arrays_keep_their_sharding_and_equal_one_device():
  """8 simulated devices, the layer axis or a feature axis sharded, Auto and
  Explicit meshes (in a subprocess: the device count is set before JAX starts)."""
  from tests.conftest import run_script_on_simulated_devices

  reports = run_script_on_simulated_devices("stacked_sharding_check.py")["reports"]
  assert len(reports) == 4
  for report in reports:
    assert report["devices"] == 8 and report["cut"] == "LayerSplit", report
    assert report["update_shardings_match"] and report["param_shardings_match"], report
    assert report["max_param_diff"] <= 1e-6 and report["max_state_diff"] <= 1e-6, report
    assert report["skipped"] == 1, report
    if report["sharded_over"] == "features":  # the cap moments stay split 8 ways
      assert report["cap_moment_spec"] == "P(None, None, 'x')", report
      assert report["cap_moment_devices"] == 8 and report["cap_moment_sharded"], report
