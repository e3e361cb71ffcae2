"""Stacked (scanned) layers count as one module per layer, as in the unrolled model.

Every stacked form (linen ``nn.scan``, an NNX block built under ``nnx.vmap``,
plain dicts with the layer axis at 0 or 1) is checked against its unrolled
twin: the same module names and cap for every cap size; the order inside a
stacked block; the layer axis read from logical axis names; refusals. The
steps are checked in ``test_stacked_steps.py``.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import stac_optax
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
